"""Pipeline schedules as per-rank action orders (``tfz.schedule``, the bottom of the data path)."""

from __future__ import annotations

from tfz.schedule import builders
from tfz.schedule.action import FREEZABLE_KINDS, KINDS, Action
from tfz.schedule.schedule import Schedule, make_schedule, stage_ranks

__all__ = [
    "Action",
    "FREEZABLE_KINDS",
    "KINDS",
    "SCHEDULES",
    "Schedule",
    "build_schedule",
    "make_schedule",
    "stage_ranks",
]

# name -> (builder, default stages per rank, allowed stages per rank or None for any >= 1)
_BUILDERS = {
    "gpipe": (builders.gpipe, 1, (1,)),
    "1f1b": (builders.one_f_one_b, 1, (1,)),
}

SCHEDULES = ("gpipe", "1f1b", "interleaved1f1b", "interleavedzb", "zbh1", "zbv", "dualpipev")
"""Schedule names accepted by :func:`build_schedule` and the CLI."""


def build_schedule(name: str, ranks: int, microbatches: int, stages_per_rank: int | None = None) -> Schedule:
    """Per-rank orders of schedule ``name`` for ``ranks`` ranks and ``microbatches`` microbatches."""
    key = name.lower()
    if key not in _BUILDERS:
        raise ValueError(f"unknown schedule {name!r}; choose one of: {', '.join(SCHEDULES)}")
    builder, default_v, allowed_v = _BUILDERS[key]
    v = default_v if stages_per_rank is None else stages_per_rank
    if allowed_v is not None and v not in allowed_v:
        raise ValueError(f"{key} supports stages per rank {list(allowed_v)}, got {v}")
    if v < 1:
        raise ValueError(f"stages per rank must be >= 1, got {v}")
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
        raise ValueError(f"ranks must be an integer >= 1, got {ranks!r}")
    if isinstance(microbatches, bool) or not isinstance(microbatches, int) or microbatches < 1:
        raise ValueError(f"microbatches must be an integer >= 1, got {microbatches!r}")
    return builder(ranks, microbatches) if allowed_v == (1,) else builder(ranks, microbatches, v)
