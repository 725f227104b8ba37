"""Per-rank action orders of the schedules tfz knows, identical to what torch executes.

Every builder returns compute actions only, in the order each rank runs them (no bubbles, no
communication). For the schedules torch ships, the orders equal the compute actions torch 2.13's
runtime executes for the same (ranks, microbatches, stages per rank); ``tests/test_schedule.py``
checks this against torch itself. Overlapped F&B pairs (DualPipeV) are written as their two
sub-actions, forward first, so they run and simulate as the sum of their parts. ``zbh1`` is tfz's
own (torch has no ZB-H1 class); it runs on torch through its CSV export.

This module must not import torch: the planner works without it.
"""

from __future__ import annotations

from collections import Counter, deque

from tfz.schedule.action import Action
from tfz.schedule.schedule import Schedule, make_schedule

__all__ = [
    "dualpipev",
    "gpipe",
    "interleaved_1f1b",
    "interleaved_zero_bubble",
    "min_microbatches",
    "one_f_one_b",
    "zbh1",
    "zbv",
]


def min_microbatches(name: str, ranks: int) -> int:
    """Smallest microbatch count schedule ``name`` accepts with ``ranks`` ranks (torch's rules).

    ``1f1b`` needs one per rank, ``dualpipev`` one per stage (``2 * ranks``), the others one. The
    interleaved schedules have a second rule, see :func:`interleaved_1f1b`.
    """
    return {"1f1b": ranks, "dualpipev": 2 * ranks}.get(name, 1)


def _check_counts(name: str, ranks: int, microbatches: int, stages_per_rank: int | None = None) -> None:
    if ranks < 1:
        raise ValueError(f"{name}: ranks must be >= 1, got {ranks}")
    if stages_per_rank is not None and stages_per_rank < 1:
        raise ValueError(f"{name}: stages per rank must be >= 1, got {stages_per_rank}")
    least = min_microbatches(name, ranks)
    if microbatches < least:
        raise ValueError(f"{name} with {ranks} ranks needs at least {least} microbatches, got {microbatches}")


def gpipe(ranks: int, microbatches: int) -> Schedule:
    """All forwards, then all full backwards in microbatch order (torch ``ScheduleGPipe``)."""
    _check_counts("gpipe", ranks, microbatches)
    orders = [
        [Action(r, "F", m) for m in range(microbatches)] + [Action(r, "B", m) for m in range(microbatches)]
        for r in range(ranks)
    ]
    return make_schedule("gpipe", orders, microbatches)


def one_f_one_b(ranks: int, microbatches: int) -> Schedule:
    """1F1B as torch's ``Schedule1F1B._step_microbatches`` runs it (needs microbatches >= ranks).

    Rank r first runs ``min(M, P - r)`` forwards (the last rank one), then alternates B, F until the
    forwards are done, then drains the backwards. torch's own IR for this class
    (``_get_pipeline_order``) is off by one on the last rank; this follows the executed loop.
    """
    _check_counts("1f1b", ranks, microbatches)
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


def zbh1(ranks: int, microbatches: int) -> Schedule:
    """ZB-H1, the handcrafted schedule of the zero-bubble paper (Qi et al. 2023, Fig. 3), 1 stage per rank.

    Backward is split into I (input gradient, on the critical path) and W (weight gradient). Rank r
    warms up like 1F1B with ``min(M, P - r)`` forwards, then repeats ``I, W, F``, except that its W
    passes lag its I passes by ``r`` microbatches: the deferred W passes fill the drain bubble. At most
    ``P`` microbatches are between their F and W on every rank, the peak of 1F1B (rank 0). With
    F = I = W the makespan is ``3M + P - 1`` against 1F1B's ``3(M + P - 1)``: a third of the bubble.
    """
    _check_counts("zbh1", ranks, microbatches)
    orders = []
    for r in range(ranks):
        warmup = min(microbatches, ranks - r)
        order = [Action(r, "F", m) for m in range(warmup)]
        fwd = warmup
        for m in range(microbatches):
            order.append(Action(r, "I", m))
            if m >= r:
                order.append(Action(r, "W", m - r))
            if fwd < microbatches:
                order.append(Action(r, "F", fwd))
                fwd += 1
        order.extend(Action(r, "W", m) for m in range(max(0, microbatches - r), microbatches))
        orders.append(order)
    return make_schedule("zbh1", orders, microbatches)


def _rounds_fit(ranks: int, microbatches: int) -> bool:
    """torch's rule for interleaved schedules: the microbatches are a multiple of max(1, M // P)."""
    return microbatches % max(1, microbatches // ranks) == 0


def _rounds(name: str, ranks: int, microbatches: int) -> int:
    """Microbatches per round of torch's interleaved schedules (``M // max(1, M // P)``); ValueError
    naming the nearest counts below and above that fit (a multiple of P always does, so each is at
    most P away)."""
    rounds = max(1, microbatches // ranks)
    if not _rounds_fit(ranks, microbatches):
        lo = next(m for m in range(microbatches - 1, 0, -1) if _rounds_fit(ranks, m))
        hi = next(m for m in range(microbatches + 1, microbatches + ranks + 1) if _rounds_fit(ranks, m))
        raise ValueError(
            f"{name} with {ranks} ranks and {microbatches} microbatches: the microbatches must be a "
            f"multiple of the number of rounds max(1, {microbatches} // {ranks}) = {rounds} (as torch "
            f"requires); nearby valid counts: {lo}, {hi}"
        )
    return microbatches // rounds


def _interleaved(name: str, ranks: int, microbatches: int, stages_per_rank: int, zero_bubble: bool):
    """torch's interleaved 1F1B / zero-bubble (ZB1P) orders with loop placement.

    Forwards visit the rank's stages round-robin in blocks of ``per_round`` microbatches, backwards
    visit them in reverse. Warmup runs ``(V - 1) * per_round + k * (P - 1 - r)`` forwards (k = 2 for
    1F1B, 1 for ZB), then each step runs one forward and one backward. The zero-bubble variant
    splits backwards into I and W and lets W lag I by ``r`` backwards.
    """
    _check_counts(name, ranks, microbatches, stages_per_rank)
    if stages_per_rank < 2:
        raise ValueError(f"{name} needs at least 2 stages per rank, got {stages_per_rank}")
    per_round = _rounds(name, ranks, microbatches)
    orders = [
        _interleaved_rank(r, ranks, microbatches, stages_per_rank, per_round, zero_bubble)
        for r in range(ranks)
    ]
    return make_schedule(name, orders, microbatches, stages_per_rank, "loop")


def _interleaved_rank(r: int, ranks: int, microbatches: int, v: int, per_round: int, zero_bubble: bool):
    n_ops = microbatches * v  # forwards (and backwards) on this rank
    warmup = min((v - 1) * per_round + (1 if zero_bubble else 2) * (ranks - 1 - r), n_ops)
    p = _RankProgram()
    done: list[Action] = []  # backwards so far

    def forward_stage(k: int) -> int:
        return ((k // per_round) % v) * ranks + r

    for k in range(warmup):
        p.add(forward_stage(k), "F")
    for j in range(n_ops):
        if warmup + j < n_ops:
            p.add(forward_stage(warmup + j), "F")
        s = (v - 1 - (j // per_round) % v) * ranks + r
        p.add(s, "I" if zero_bubble else "B")
        done.append(p.order[-1])
        if zero_bubble and j >= r:
            p.order.append(done[j - r]._replace(kind="W"))
    if zero_bubble:
        p.order.extend(a._replace(kind="W") for a in done[max(0, n_ops - r) :])
    return p.order


def interleaved_1f1b(ranks: int, microbatches: int, stages_per_rank: int = 2) -> Schedule:
    """Interleaved 1F1B (torch ``ScheduleInterleaved1F1B``), loop placement, full backwards.

    Like torch: any microbatch count >= 1, but when ``M >= P`` it must be a multiple of
    ``M // P`` (the number of rounds); e.g. P = 4 accepts 8, 10, 12, 15 but not 9, 11, 13, 14.
    """
    return _interleaved("interleaved1f1b", ranks, microbatches, stages_per_rank, zero_bubble=False)


def interleaved_zero_bubble(ranks: int, microbatches: int, stages_per_rank: int = 2) -> Schedule:
    """Interleaved zero bubble, ZB1P (torch ``ScheduleInterleavedZeroBubble``), loop placement, I/W.

    Same microbatch rules as :func:`interleaved_1f1b`.
    """
    return _interleaved("interleavedzb", ranks, microbatches, stages_per_rank, zero_bubble=True)


def _check_v(name: str, stages_per_rank: int) -> None:
    if stages_per_rank != 2:
        raise ValueError(f"{name} needs exactly 2 stages per rank, got {stages_per_rank}")


class _RankProgram:
    """One rank's order under construction, with per-(stage, kind) microbatch counters."""

    def __init__(self) -> None:
        self.order: list[Action] = []
        self.next: Counter[tuple[int, str]] = Counter()
        self.pending_w: deque[Action] = deque()

    def add(self, stage: int, kind: str, counter: str | None = None) -> int:
        """Append ``stage kind m`` with m read from (and advancing) the ``counter`` kind's count."""
        key = (stage, counter or kind)
        m = self.next[key]
        self.order.append(Action(stage, kind, m))
        self.next[key] += 1
        return m

    def backward(self, stage: int, split: bool) -> None:
        """A full backward, or an I whose W is queued; B and I share one counter per stage."""
        m = self.add(stage, "I" if split else "B", counter="bwd")
        if split:
            self.pending_w.append(Action(stage, "W", m))

    def weight(self) -> None:
        """The oldest queued W, if any."""
        if self.pending_w:
            self.order.append(self.pending_w.popleft())

    def pair(self, f_stage: int, b_stage: int) -> None:
        """An overlapped F&B pair, as its forward then its full backward."""
        self.add(f_stage, "F")
        self.backward(b_stage, split=False)


def zbv(ranks: int, microbatches: int, stages_per_rank: int = 2) -> Schedule:
    """ZB-V (torch ``ScheduleZBVZeroBubble``): V placement, rank r holds stages r and 2P-1-r, I/W.

    Any microbatch count >= 1. Like torch, the order is built for ``max(M, 2P - 1)`` microbatches and
    the actions of microbatches >= M are then dropped.
    """
    _check_counts("zbv", ranks, microbatches, stages_per_rank)
    _check_v("zbv", stages_per_rank)
    n = max(2 * ranks - 1, microbatches)
    orders = []
    for r in range(ranks):
        a, b = r, 2 * ranks - 1 - r  # first (down) and second (up) chunk
        p = _RankProgram()
        for _ in range(2 * (ranks - r) - 1):
            p.add(a, "F")
        for _ in range(r):
            p.add(b, "F")
            p.add(a, "F")
        for _ in range(ranks - r):
            p.add(b, "F")
            p.add(b, "I")
            p.add(b, "W")
        while p.next[b, "F"] < p.next[a, "F"] or p.next[a, "F"] < n:
            if p.next[a, "F"] < n:
                p.add(a, "F")
            p.add(a, "I")
            p.add(a, "W")
            p.add(b, "F")
            p.add(b, "I")
            p.add(b, "W")
        for _ in range(r):
            p.add(a, "I")
            p.add(b, "I")
        for _ in range(ranks - r):
            p.add(a, "I")
            p.add(a, "W")
        for s in (b, a):
            while p.next[s, "W"] < p.next[s, "I"]:
                p.add(s, "W")
        orders.append([x for x in p.order if x.microbatch < microbatches])
    return make_schedule("zbv", orders, microbatches, 2, "v")


def dualpipev(ranks: int, microbatches: int, stages_per_rank: int = 2) -> Schedule:
    """DualPipeV (torch ``ScheduleDualPipeV``): V placement, needs microbatches >= 2 * ranks.

    The main phase pairs a forward of one chunk with a full backward of the other
    (torch's ``OVERLAP_F_B``); each pair is written as its forward followed by its backward.
    Backwards are full (B) except at the edges, where I runs first and its W is queued to fill
    later gaps.
    """
    _check_counts("dualpipev", ranks, microbatches, stages_per_rank)
    _check_v("dualpipev", stages_per_rank)
    orders = [_dualpipev_rank(r, ranks, microbatches) for r in range(ranks)]
    return make_schedule("dualpipev", orders, microbatches, 2, "v")


def _dualpipev_rank(r: int, ranks: int, microbatches: int) -> list[Action]:
    a, b = r, 2 * ranks - 1 - r
    p = _RankProgram()
    for _ in range(2 * (ranks - r - 1)):
        p.add(a, "F")
    for _ in range(r + 1):
        p.add(a, "F")
        p.add(b, "F")
    for _ in range(ranks - r - 1):
        p.backward(b, split=True)
        p.weight()
        p.add(b, "F")
    for _ in range(microbatches - 2 * ranks + r + 1):
        p.pair(a, b)  # torch does not overlap the first one on the last rank; same order
        p.pair(b, a)
    for _ in range(ranks - r - 1):
        p.backward(b, split=False)
        p.pair(b, a)
    split = False
    half = (r + 1) // 2
    for i in range(r + 1):
        if i == half and r % 2 == 1:
            split = True
        p.backward(b, split)
        if i == half and r % 2 == 0:
            split = True
        p.backward(a, split)
    for _ in range(ranks - r - 1):
        p.weight()
        p.backward(a, split)
    for _ in range(r + 1):
        p.weight()
    return p.order
