"""Pipeline schedules as per-rank action orders (``tfz.schedule``, the bottom of the data path).

``build_schedule(name, ranks, microbatches)`` gives the order torch runs for the schedules it ships
(identical action by action) and tfz's own ZB-H1. ``load_csv`` / ``dump_csv`` read and write torch's
compute-only schedule CSV; ``tfz.schedule.torch_io`` imports orders from torch's schedule classes and
replays schedules on torch's runtime (it imports torch lazily).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from tfz._validate import check_int
from tfz.schedule import builders
from tfz.schedule.action import FREEZABLE_KINDS, KINDS, Action
from tfz.schedule.csv_io import dump_csv, load_csv
from tfz.schedule.limits import MAX_ACTIONS, check_size, estimate_size
from tfz.schedule.schedule import Schedule, make_schedule, stage_ranks

__all__ = [
    "Action",
    "FREEZABLE_KINDS",
    "KINDS",
    "MAX_ACTIONS",
    "SCHEDULES",
    "Schedule",
    "build_schedule",
    "check_size",
    "dump_csv",
    "estimate_size",
    "load_csv",
    "make_schedule",
    "stage_ranks",
]


class _Entry(NamedTuple):
    builder: Callable[..., Schedule]
    default_v: int
    """Stages per rank when none is given."""
    min_v: int
    max_v: int | None
    """Largest stages per rank, None for no limit."""

    def allowed(self) -> str:
        if self.max_v == self.min_v:
            return f"exactly {self.min_v}"
        return f">= {self.min_v}" if self.max_v is None else f"{self.min_v}..{self.max_v}"


_BUILDERS: dict[str, _Entry] = {
    "gpipe": _Entry(builders.gpipe, 1, 1, 1),
    "1f1b": _Entry(builders.one_f_one_b, 1, 1, 1),
    "interleaved1f1b": _Entry(builders.interleaved_1f1b, 2, 2, None),
    "interleavedzb": _Entry(builders.interleaved_zero_bubble, 2, 2, None),
    "zbh1": _Entry(builders.zbh1, 1, 1, 1),
    "zbv": _Entry(builders.zbv, 2, 2, 2),
    "dualpipev": _Entry(builders.dualpipev, 2, 2, 2),
}
"""name -> builder, default stages per rank and the allowed range."""

# torch's class names (``get_schedule_class`` keys, lower case) for the same schedules
_ALIASES = {"interleavedzerobubble": "interleavedzb", "zbvzerobubble": "zbv"}

SCHEDULES = ("gpipe", "1f1b", "interleaved1f1b", "interleavedzb", "zbh1", "zbv", "dualpipev")
"""Schedule names accepted by :func:`build_schedule` and the CLI."""


def build_schedule(
    name: str,
    ranks: int,
    microbatches: int,
    stages_per_rank: int | None = None,
    *,
    max_actions: int = MAX_ACTIONS,
) -> Schedule:
    """Per-rank orders of schedule ``name`` for ``ranks`` ranks and ``microbatches`` microbatches.

    ``stages_per_rank`` defaults to the schedule's own (1, or 2 for interleaved and V schedules).
    Raises ValueError for an unknown name (listing the choices), counts < 1, a stages-per-rank value
    the schedule does not support, more than ``max_actions`` actions (default :data:`MAX_ACTIONS`;
    refused with the estimate before anything is built, see :mod:`tfz.schedule.limits`), or too few
    microbatches (naming the minimum).
    """
    key = str(name).lower()
    key = _ALIASES.get(key, key)
    if key not in _BUILDERS:
        raise ValueError(f"unknown schedule {name!r}; choose one of: {', '.join(SCHEDULES)}")
    entry = _BUILDERS[key]
    ranks = check_int("ranks", ranks, 1)
    microbatches = check_int("microbatches", microbatches, 1)
    v = entry.default_v if stages_per_rank is None else check_int("stages per rank", stages_per_rank, 1)
    if v < entry.min_v or (entry.max_v is not None and v > entry.max_v):
        raise ValueError(f"{key} supports stages per rank {entry.allowed()}, got {v}")
    named = "tfz.schedule.MAX_ACTIONS" if max_actions == MAX_ACTIONS else ""
    check_size(key, ranks, microbatches, v, limit=max_actions, limit_name=named)
    return entry.builder(ranks, microbatches) if entry.max_v == 1 else entry.builder(ranks, microbatches, v)
