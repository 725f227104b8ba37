"""Per-rank orders from torch's own pipeline schedules, and replay of tfz schedules on torch's runtime.

No process group is needed: torch's schedule classes are instantiated with recording stand-in stages
and their step loops are run with communication turned into no-ops, so the recorded compute calls
(``forward_one_chunk``, ``backward_one_chunk``, ``backward_weight_one_chunk``) are exactly the order
torch executes on each rank. torch is imported inside the functions only.

Why executed orders and not torch's IR: ``Schedule1F1B._get_pipeline_order`` (torch 2.13) is off by
one on the last rank (its forwards run microbatches 1..M instead of 0..M-1), while the hand-written
loop ``Schedule1F1B._step_microbatches`` that really runs is correct. ``from_torch(..., source="ir")``
returns the IR for comparison.

The CSV reader/writer lives in :mod:`tfz.schedule.csv_io` (torch-free) and is re-exported here.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from tfz import _torch_compat
from tfz._validate import check_int
from tfz.schedule.action import KINDS, Action
from tfz.schedule.csv_io import _placement, dump_csv, load_csv
from tfz.schedule.limits import check_size
from tfz.schedule.schedule import Schedule

__all__ = ["TORCH_NAMES", "dump_csv", "from_torch", "instantiate_torch", "load_csv", "replay_on_torch"]

TORCH_NAMES = {
    "ScheduleGPipe": "gpipe",
    "Schedule1F1B": "1f1b",
    "ScheduleInterleaved1F1B": "interleaved1f1b",
    "ScheduleInterleavedZeroBubble": "interleavedzb",
    "ScheduleZBVZeroBubble": "zbv",
    "ScheduleDualPipeV": "dualpipev",
}
"""torch schedule class name -> tfz schedule name."""


class _RecordingStage:
    """Stand-in for a ``PipelineStage``: records compute calls into ``log``, communicates nothing."""

    submod = None
    has_backward = False

    def __init__(self, stage_index: int, num_stages: int, rank: int, num_ranks: int, log: list[Action]):
        self.stage_index = stage_index
        self.num_stages = num_stages
        self.group_rank = rank
        self.group_size = num_ranks
        self.device = "cpu"
        self.stage_index_to_group_rank: dict[int, int] = {}
        self.output_chunks: list = []
        self._log = log

    @property
    def is_first(self) -> bool:
        return self.stage_index == 0

    @property
    def is_last(self) -> bool:
        return self.stage_index == self.num_stages - 1

    # compute: record only
    def forward_one_chunk(self, fwd_chunk_id, args=None, kwargs=None, save_forward_output=True):
        self._log.append(Action(self.stage_index, "F", fwd_chunk_id))

    def backward_one_chunk(self, bwd_chunk_id, loss=None, full_backward=True, last_backward=False):
        self._log.append(Action(self.stage_index, "B" if full_backward else "I", bwd_chunk_id))

    def backward_weight_one_chunk(self, bwd_chunk_id, last_backward=False):
        self._log.append(Action(self.stage_index, "W", bwd_chunk_id))


def _comm_stand_in(name: str):
    """A recording stage's ``name``: communicates nothing (``*_ops`` methods return no ops)."""
    returns_ops = name.endswith("_ops")

    def method(self, *args, **kwargs):
        return [] if returns_ops else None

    method.__name__ = name
    return method


for _name in _torch_compat.STAGE_COMM_METHODS:  # communication and bookkeeping: nothing to do
    setattr(_RecordingStage, _name, _comm_stand_in(_name))
del _name


def _schedule_class(schedule):
    from torch.distributed.pipelining import schedules as ts

    if isinstance(schedule, str):
        cls = getattr(ts, schedule, None)  # a class name such as "ScheduleZBVZeroBubble"
        if isinstance(cls, type) and issubclass(cls, _torch_compat.schedule_base_class()):
            return cls
        return ts.get_schedule_class(schedule)  # "ZBVZeroBubble"; ValueError listing torch's names
    if isinstance(schedule, type) and issubclass(schedule, _torch_compat.schedule_base_class()):
        return schedule
    raise TypeError(f"expected a torch schedule class or name, got {schedule!r}")


def _instantiate(cls, stages, microbatches: int, what: str):
    """``cls(stages, microbatches)`` with torch's complaints turned into ValueError."""
    import logging

    log = logging.getLogger("torch.distributed.pipelining.schedules")
    level = log.level
    log.setLevel(logging.ERROR)  # torch logs "Using <class>" and bubble warnings at INFO/WARNING
    try:
        return cls(stages, microbatches)
    except (ValueError, AssertionError, RuntimeError) as err:
        raise ValueError(f"torch's {cls.__name__} rejects {what}: {err}") from None
    finally:
        log.setLevel(level)


def _compute_actions(row) -> list[Action]:
    """tfz actions of one rank of a torch IR: bubbles dropped, overlapped pairs expanded."""
    out = []
    for a in row:
        if a is None:
            continue
        for sub in a.sub_actions or (a,):
            kind = sub.computation_type.value
            if kind in KINDS:
                out.append(Action(sub.stage_index, kind, sub.microbatch_index))
    return out


def _run_step(sched) -> None:
    """Run ``sched``'s per-step loop once with stages marked as initialized (no metadata exchange)."""
    _torch_compat.run_schedule_loop(sched)


def _schedule(name, num_microbatches, stage_to_rank, orders) -> Schedule:
    return Schedule(
        name=name,
        num_microbatches=num_microbatches,
        stage_to_rank=tuple(stage_to_rank),
        orders=tuple(tuple(o) for o in orders),
        placement=_placement(tuple(stage_to_rank), len(orders), name),
    )


def _resolve(schedule, ranks, microbatches, stages_per_rank):
    """(class, single-stage?, stages per rank, description) after checking the arguments."""
    from torch.distributed.pipelining.schedules import PipelineScheduleSingle

    cls = _schedule_class(schedule)
    single = issubclass(cls, PipelineScheduleSingle)
    ranks = check_int("ranks", ranks, 1)
    microbatches = check_int("microbatches", microbatches, 1)
    v = check_int("stages per rank", (1 if single else 2) if stages_per_rank is None else stages_per_rank, 1)
    if single and v != 1:
        raise ValueError(f"{cls.__name__} runs one stage per rank, got stages per rank {v}")
    check_size(TORCH_NAMES.get(cls.__name__, cls.__name__), ranks, microbatches, v)
    return cls, single, v, f"ranks={ranks}, microbatches={microbatches}, stages per rank={v}"


def instantiate_torch(schedule, ranks: int, microbatches: int, stages_per_rank: int | None = None):
    """An instance of torch schedule ``schedule`` (class or name) as rank 0 sees it, built on
    stand-in stages without a process group: its ``pipeline_order`` IR and ``_dump_csv`` work."""
    cls, single, v, what = _resolve(schedule, ranks, microbatches, stages_per_rank)
    if single:
        return _instantiate(cls, _RecordingStage(0, ranks, 0, ranks, []), microbatches, what)
    stages = [_RecordingStage(i, ranks * v, 0, ranks, []) for i in range(v)]
    return _instantiate(cls, stages, microbatches, what)


def from_torch(
    schedule, ranks: int, microbatches: int, stages_per_rank: int | None = None, *, source: str = "executed"
) -> Schedule:
    """Per-rank compute orders of a torch schedule class, its class name or its ``get_schedule_class`` name.

    ``source="executed"`` (default) runs the class's own step loop per rank with recording stages:
    the orders are what torch executes. ``source="ir"`` returns torch's ``pipeline_order`` IR instead
    (bubbles dropped, ``OVERLAP_F_B`` pairs expanded into their sub-actions, F first); for
    ``Schedule1F1B`` this IR is wrong on the last rank (see the module docstring).

    ``stages_per_rank`` defaults to 1 for single-stage classes and 2 otherwise. The stage -> rank
    placement is inferred from the actions. Raises ValueError when torch rejects the sizes.
    """
    if source not in ("executed", "ir"):
        raise ValueError(f"source must be 'executed' or 'ir', got {source!r}")
    cls, single, v, what = _resolve(schedule, ranks, microbatches, stages_per_rank)
    name = TORCH_NAMES.get(cls.__name__, cls.__name__.removeprefix("Schedule").lower())
    num_stages = ranks * v
    probe = instantiate_torch(cls, ranks, microbatches, v)
    if single:
        stage_to_rank = list(range(ranks))
    else:
        mapping = probe.stage_index_to_group_rank  # inferred by torch from its IR
        stage_to_rank = [mapping[s] for s in range(num_stages)]
    if source == "ir":
        orders = [_compute_actions(probe.pipeline_order[r]) for r in range(ranks)]
        return _schedule(name, microbatches, stage_to_rank, orders)
    orders = []
    for r in range(ranks):
        log: list[Action] = []
        stages = [
            _RecordingStage(s, num_stages, r, ranks, log) for s in range(num_stages) if stage_to_rank[s] == r
        ]
        _run_step(_instantiate(cls, stages[0] if single else stages, microbatches, what))
        orders.append(log)
    return _schedule(name, microbatches, stage_to_rank, orders)


def replay_on_torch(schedule: Schedule, csv_path: str | os.PathLike | None = None) -> Schedule:
    """Run ``schedule`` through torch's ``_PipelineScheduleRuntime`` and return what it executes.

    The schedule is written with :func:`dump_csv` (to ``csv_path`` or a temporary file), loaded on
    every rank with ``_PipelineScheduleRuntime._load_csv`` (torch's validation and send/recv lowering
    run there, which rejects incomplete or deadlocking orders), and each rank's step loop is run with
    recording stages. The placement of the result is the one torch infers from the file. Raises
    ValueError when torch rejects the file.
    """
    runtime_class = _torch_compat.runtime_schedule_class()
    P, S, M = schedule.num_ranks, schedule.num_stages, schedule.num_microbatches
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(csv_path) if csv_path is not None else Path(tmp) / "schedule.csv"
        dump_csv(schedule, path)
        orders = []
        mapping: dict[int, int] = {}
        for r in range(P):
            log: list[Action] = []
            stages = [_RecordingStage(s, S, r, P, log) for s in schedule.stages_of(r)]
            runtime = _instantiate(runtime_class, stages, M, f"ranks={P}, microbatches={M}")
            try:
                _torch_compat.load_schedule_csv(runtime, path)
            except (ValueError, AssertionError, RuntimeError) as err:
                raise ValueError(
                    f"torch's _PipelineScheduleRuntime rejects schedule {schedule.name!r}: {err}"
                ) from None
            mapping = runtime.stage_index_to_group_rank  # inferred by torch from the file
            _run_step(runtime)
            orders.append(log)
    return _schedule(schedule.name, M, [mapping[s] for s in range(S)], orders)
