"""torch's compute-only schedule CSV: read and write (no torch needed).

Format (``_PipelineScheduleRuntime._load_csv`` / ``_dump_csv`` with ``format="compute_only"``): one
row per rank, one cell per action in run order, each cell an ``_Action`` string such as ``0F0``,
``3I1`` or ``2W0``. Empty cells are bubbles (torch writes ``None`` as an empty cell) and are skipped.
Rows may have different lengths. A cell ``(0F3;3B1)OVERLAP_F_B`` (an overlapped pair, as torch
dumps DualPipeV) is read as its sub-actions in order.

The number of microbatches and the stage -> rank placement are inferred from the actions. Structural
errors raise ValueError naming the row, column and text; whether every (stage, microbatch) is complete
and the orders are deadlock-free is checked by ``tfz.dag.build_dag``.
"""

from __future__ import annotations

import csv
import io
import os
import re
from pathlib import Path

from tfz._validate import short_repr
from tfz.schedule.action import Action
from tfz.schedule.limits import MAX_ACTIONS, check_actions, read_capped
from tfz.schedule.schedule import Schedule, stage_ranks

__all__ = ["MAX_CSV_BYTES", "dump_csv", "load_csv", "parse_rows"]

MAX_CSV_BYTES = 64 * 2**20
"""Largest schedule CSV :func:`load_csv` reads (64 MiB: more than :data:`MAX_ACTIONS` cells of up to
32 characters each)."""

_NON_COMPUTE = re.compile(r"^\d+(UNSHARD|RESHARD|REDUCE_GRAD|SEND_F|RECV_F|SEND_B|RECV_B)\d*$")
_OVERLAP = re.compile(r"^\((.*)\)\s*OVERLAP_F_B$")


def _cell_actions(text: str, where: str) -> list[Action]:
    """Actions of one non-empty cell; ``where`` names it in errors."""
    m = _OVERLAP.match(text)
    parts = m.group(1).split(";") if m else [text]
    out = []
    for part in parts:
        part = part.strip()
        try:
            out.append(Action.parse(part))
        except ValueError:
            if _NON_COMPUTE.match(part):
                raise ValueError(
                    f"{where}: {part!r} is a communication/FSDP action; a compute-only schedule CSV "
                    "holds F, B, I and W actions only"
                ) from None
            raise ValueError(
                f"{where}: malformed action {short_repr(text)}: expected <stage><F|B|I|W><microbatch> "
                "(e.g. '2F0', '3W1') or '(<F action>;<B action>)OVERLAP_F_B'"
            ) from None
    if m and not out:
        raise ValueError(f"{where}: overlapped pair {text!r} has no sub-actions")
    return out


_V_NAMES = ("zbv", "dualpipev")
"""Built-in schedules with V placement: with 1 rank (or 1 stage per rank) loop and V place alike, and
the name decides, so that a saved schedule loads back equal."""


def _placement(stage_to_rank: tuple[int, ...], num_ranks: int, name: str = "") -> str:
    if len(stage_to_rank) % num_ranks == 0:
        v = len(stage_to_rank) // num_ranks
        styles = ("v", "loop") if name in _V_NAMES else ("loop", "v")
        for style in styles:
            if stage_to_rank == stage_ranks(num_ranks, v, style):
                return style
    return "custom"


def parse_rows(rows: list[list[str]], source: str = "<rows>", name: str = "csv") -> Schedule:
    """A schedule from CSV rows (one list of cell texts per rank); ``source`` names the input in errors.

    More than :data:`tfz.schedule.MAX_ACTIONS` actions are refused.
    """
    if not rows:
        raise ValueError(f"{source}: empty schedule file: no rows (expected one row per rank)")
    orders: list[list[Action]] = []
    first_seen: dict[int, tuple[int, str]] = {}  # stage -> (rank, where it was first seen)
    count = 0
    for r, row in enumerate(rows):
        order: list[Action] = []
        for c, cell in enumerate(row):
            text = cell.strip()
            if not text:
                continue  # a bubble
            where = f"{source}: row {r + 1} (rank {r}), column {c + 1}"
            for a in _cell_actions(text, where):
                seen = first_seen.setdefault(a.stage, (r, f"{where}: {text!r}"))
                if seen[0] != r:
                    raise ValueError(
                        f"stage {a.stage} is on two ranks: rank {seen[0]} ({seen[1]}) and rank {r} "
                        f"({where}: {text!r})"
                    )
                order.append(a)
        count += len(order)
        check_actions(
            count, f"{source} (after row {r + 1})", MAX_ACTIONS, limit_name="tfz.schedule.MAX_ACTIONS"
        )
        if not order:
            raise ValueError(
                f"{source}: row {r + 1} (rank {r}) has no actions; every rank needs a row of actions"
            )
        orders.append(order)
    num_stages = max(first_seen) + 1
    if len(first_seen) < num_stages:
        missing = next(s for s in range(num_stages) if s not in first_seen)
        raise ValueError(
            f"{source}: stage {missing} appears in no row, but stages up to {num_stages - 1} are used; "
            "every stage needs its actions"
        )
    stage_to_rank = tuple(first_seen[s][0] for s in range(num_stages))
    num_microbatches = 1 + max(a.microbatch for order in orders for a in order)
    return Schedule(
        name=name,
        num_microbatches=num_microbatches,
        stage_to_rank=stage_to_rank,
        orders=tuple(tuple(o) for o in orders),
        placement=_placement(stage_to_rank, len(orders), name),
    )


def load_csv(path: str | os.PathLike, name: str | None = None) -> Schedule:
    """Read torch's compute-only schedule CSV; ``name`` defaults to the file's stem.

    Raises ValueError for an empty file, a file over :data:`MAX_CSV_BYTES`, a row without actions, a
    malformed or non-compute cell (naming row, column and text), a stage on two ranks, a stage that
    appears nowhere, or more than :data:`tfz.schedule.MAX_ACTIONS` actions.
    """
    path = Path(path)
    raw = read_capped(path, MAX_CSV_BYTES, "a schedule CSV", "tfz.schedule.csv_io.MAX_CSV_BYTES")
    try:
        rows = list(csv.reader(io.StringIO(raw.decode("utf-8"), newline="")))
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a UTF-8 text file") from None
    except csv.Error as err:
        raise ValueError(f"{path}: not a readable CSV file: {err}") from None
    return parse_rows(rows, str(path), name or path.stem)


def dump_csv(schedule: Schedule, path: str | os.PathLike) -> None:
    """Write ``schedule`` as torch's compute-only CSV (loadable by ``_PipelineScheduleRuntime._load_csv``)."""
    if not isinstance(schedule, Schedule):
        raise TypeError(f"dump_csv needs a tfz.schedule.Schedule, got {type(schedule).__name__}")
    for r, order in enumerate(schedule.orders):
        if not order:
            raise ValueError(
                f"rank {r} of schedule {schedule.name!r} has no actions; a CSV row cannot be empty"
            )
        for a in order:
            if not isinstance(a, Action):
                raise TypeError(f"rank {r} of schedule {schedule.name!r} holds {a!r}, not an Action")
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        for order in schedule.orders:
            writer.writerow([str(a) for a in order])
