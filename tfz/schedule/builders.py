"""Per-rank action orders of the schedules tfz knows, identical to what torch executes."""

from __future__ import annotations

from tfz.schedule.action import Action
from tfz.schedule.schedule import Schedule, make_schedule


def _check_counts(name: str, ranks: int, microbatches: int, min_microbatches: int = 1) -> None:
    if ranks < 1:
        raise ValueError(f"{name}: ranks must be >= 1, got {ranks}")
    if microbatches < min_microbatches:
        raise ValueError(f"{name} with {ranks} ranks needs at least {min_microbatches} microbatches, got {microbatches}")


def gpipe(ranks: int, microbatches: int) -> Schedule:
    """All forwards, then all full backwards in microbatch order (torch ``ScheduleGPipe``)."""
    _check_counts("gpipe", ranks, microbatches)
    orders = [
        [Action(r, "F", m) for m in range(microbatches)] + [Action(r, "B", m) for m in range(microbatches)]
        for r in range(ranks)
    ]
    return make_schedule("gpipe", orders, microbatches)


def one_f_one_b(ranks: int, microbatches: int) -> Schedule:
    """1F1B as torch's ``Schedule1F1B._step_microbatches`` runs it.

    Rank r first runs ``min(M, P - r)`` forwards (the last rank one), then alternates B, F until the
    forwards are done, then drains the backwards. torch's own IR for this class
    (``_get_pipeline_order``) is off by one on the last rank; this follows the executed loop.
    """
    _check_counts("1f1b", ranks, microbatches, min_microbatches=ranks)
    orders = []
    for r in range(ranks):
        warmup = min(microbatches, ranks - r)
        order = [Action(r, "F", m) for m in range(warmup)]
        fwd = warmup
        for bwd in range(microbatches):
            order.append(Action(r, "B", bwd))
            if fwd < microbatches:
                order.append(Action(r, "F", fwd))
                fwd += 1
        orders.append(order)
    return make_schedule("1f1b", orders, microbatches)
