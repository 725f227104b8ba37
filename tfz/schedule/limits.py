"""Size limits: how many actions a schedule may have before tfz refuses to build it.

Building a schedule, its DAG and a simulation costs about :data:`BYTES_PER_ACTION` bytes and a few
microseconds per action (``bench/RESULTS.md``), so sizes are estimated from the schedule's name and
counts before anything is allocated, and a size over :data:`MAX_ACTIONS` is refused with the estimate
(``1f1b`` with 10^9 ranks x 10^9 microbatches would need 10^12 GB). :func:`check_size` is the one
check; :func:`tfz.schedule.build_schedule`, :func:`tfz.dag.build_dag`, the CSV reader and the CLI call
it, and so can any code that is about to start ranks for a schedule (``tfz demo``).

Solving the freeze-ratio LP grows faster than linearly with the actions, so ``tfz plan`` has lower
limits (:data:`MAX_PLAN_ACTIONS`).
"""

from __future__ import annotations

import os
from typing import NamedTuple

from tfz._validate import check_int, short_repr

__all__ = [
    "BYTES_PER_ACTION",
    "MAX_ACTIONS",
    "MAX_PLAN_ACTIONS",
    "SizeEstimate",
    "check_actions",
    "check_size",
    "estimate_size",
    "read_capped",
]

MAX_ACTIONS = 2_000_000
"""Most actions (F, B, I, W over all ranks) of a schedule tfz builds: about 1.2 GB and 10-20 s to build,
validate and simulate on one CPU core."""

BYTES_PER_ACTION = 600
"""Memory per action of a schedule, its DAG and one simulation (measured: 525 MB at 10^6 actions,
1.37 GB at 3 x 10^6, Python 3.11)."""

MAX_PLAN_ACTIONS = {"structured": 262_144, "generic": 32_768}
"""Most actions ``tfz plan`` solves, per solver. The structured solver grows faster than linearly: on
the 2-core CI machine (uniform times) 7 s at 65,536 actions, 15 s at 131,072 and 64 s at 262,128;
the generic HiGHS formulation needs about 70 kB per action (1.2 GB at 16,384)."""

_SPLIT = frozenset({"zbh1", "interleavedzb", "zbv", "dualpipev"})
"""Schedules whose backward is (or may be) split into I and W: 3 actions per (stage, microbatch)."""


class SizeEstimate(NamedTuple):
    """Upper bound on a schedule's actions and the memory they take to build and simulate."""

    actions: int
    bytes: int

    def describe(self) -> str:
        """``"2e+18 actions (about 1.2e+12 GB)"``."""
        return f"{_count(self.actions)} actions (about {_gigabytes(self.bytes)} to build)"


def estimate_size(name: str, ranks: int, microbatches: int, stages_per_rank: int = 1) -> SizeEstimate:
    """Actions of schedule ``name`` (at most; exact except for dualpipev) and their memory.

    Every (stage, microbatch) has a forward and a full backward B, or I and W for split-backward
    schedules; there are ``ranks * stages_per_rank`` stages. Python integers: never overflows.
    """
    per_pair = 3 if str(name).lower() in _SPLIT else 2
    actions = int(ranks) * int(stages_per_rank) * int(microbatches) * per_pair
    return SizeEstimate(actions, actions * BYTES_PER_ACTION)


def check_actions(actions: int, what: str, limit: int = MAX_ACTIONS, *, limit_name: str = "") -> None:
    """ValueError when ``actions`` exceeds ``limit``; ``what`` describes the schedule in the message."""
    if actions > limit:
        est = SizeEstimate(actions, actions * BYTES_PER_ACTION)
        named = f" ({limit_name})" if limit_name else ""
        raise ValueError(
            f"{what} has {est.describe()}; the limit is {limit:,} actions{named}. "
            "Use fewer ranks, stages or microbatches"
        )


def check_size(
    name: str,
    ranks: int,
    microbatches: int,
    stages_per_rank: int = 1,
    *,
    limit: int = MAX_ACTIONS,
    limit_name: str = "tfz.schedule.MAX_ACTIONS",
) -> SizeEstimate:
    """The :func:`estimate_size` of a schedule, or ValueError naming the sizes when it exceeds ``limit``.

    Call it before building anything (or starting ranks) for the schedule.
    """
    ranks = check_int("ranks", ranks, 1)
    microbatches = check_int("microbatches", microbatches, 1)
    stages_per_rank = check_int("stages per rank", stages_per_rank, 1)
    est = estimate_size(name, ranks, microbatches, stages_per_rank)
    v = f" x {short_repr(stages_per_rank)} stages per rank" if stages_per_rank != 1 else ""
    what = f"{name} with {short_repr(ranks)} ranks{v} x {short_repr(microbatches)} microbatches"
    check_actions(est.actions, what, limit, limit_name=limit_name)
    return est


def read_capped(path: str | os.PathLike, limit: int, what: str, limit_name: str) -> bytes:
    """The bytes of file ``path``, or ValueError when it holds more than ``limit`` (checked from its
    size first, and by reading at most ``limit + 1`` bytes, so /dev/zero ends too). OSError if it
    cannot be read."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        raw = fh.read(limit + 1) if size <= limit else b""
    if size > limit or len(raw) > limit:
        amount = f"{size:,}" if size > limit else f"at least {limit + 1:,}"
        raise ValueError(
            f"{os.fspath(path)}: {amount} bytes is larger than {what} may be ({limit:,} bytes, {limit_name})"
        )
    return raw


def _count(n: int) -> str:
    """``1,234,567`` up to 10^9, ``2e+18`` above, ``1e+400`` beyond a float."""
    if n < 10**9:
        return f"{n:,}"
    digits = str(n)
    return f"{digits[0]}.{digits[1]}e+{len(digits) - 1}" if len(digits) > 300 else f"{float(n):.2g}"


def _gigabytes(nbytes: int) -> str:
    return f"{_count(nbytes // 10**9)} GB" if nbytes >= 10**18 else f"{nbytes / 1e9:.2g} GB"
