"""No freezing's validation loss at another method's training time, measured rather than read off a curve.

Every method trains in lockstep, so no freezing (the reference) passes a faster method's total
training time T some steps before its own end. Its loss there is measured on its weights saved
after the steps around T, evaluated after training, and interpolated between them (:func:`around`:
the evaluated steps nearest T on either side, one step apart unless memory ran short). A loss
curve evaluated every few steps is convex, so a straight line between its points sits above it:
read there, the reference looks worse than it was and the faster method looks ahead (by 0.3% of
the loss between points 20 steps apart in the demo's runs; bench/RESULTS.md).

Times are the steps' cumulative milliseconds (:func:`cumulative_ms`); the workers and the report
compute them from the same per-step maxima over the ranks. While training,
:class:`ReferenceSnapshots` keeps only the saved steps that may still be needed: an end T is at
least the method's time so far, so a step followed by an evaluated or saved step that ended before
every other method's time so far can never be nearest to one. At most ``limit`` are kept: past it,
every other one is dropped and saving goes on at twice the spacing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

__all__ = ["ReferenceSnapshots", "around", "cumulative_ms"]


def cumulative_ms(step_ms: Sequence[float]) -> np.ndarray:
    """float64 [steps + 1]: training time after 0, 1, ... steps."""
    return np.concatenate([[0.0], np.cumsum(np.asarray(step_ms, dtype=np.float64))])


def around(ends: np.ndarray, points: Sequence[int], t: float) -> tuple[int, int, float] | None:
    """``(lo, hi, w)``: of the steps ``points`` (ascending), the last that ended at or before ``t`` and
    the next (``ends[step]``: its cumulative time), with the weight of ``hi`` in a linear
    interpolation; None when ``t`` lies outside them."""
    if len(points) < 2 or not ends[points[0]] <= t <= ends[points[-1]]:
        return None
    times = ends[np.asarray(points)]
    i = min(int(np.searchsorted(times, t, side="right")) - 1, len(points) - 2)
    return points[i], points[i + 1], float((t - times[i]) / (times[i + 1] - times[i]))


class ReferenceSnapshots:
    """The reference's weights after the steps that may be nearest another method's end.

    Call :meth:`step_done` after every step with every method's step time (the same on every rank)
    and a function returning the reference's weights; after training, :meth:`steps_to_evaluate`
    gives the saved steps nearest the other methods' ends, and :meth:`weights` their weights. Steps
    in ``evaluated`` (the regular evaluations) are never saved.
    """

    def __init__(self, reference: str, methods: Iterable[str], evaluated: Iterable[int], limit: int = 24):
        self.reference = reference
        self.others = [m for m in methods if m != reference]
        if not self.others:
            raise ValueError(f"no method beside the reference {reference!r} to compare with")
        self.evaluated = frozenset(evaluated)
        self.limit = limit
        self.spacing = 1
        self.step_ms: dict[str, list[float]] = {m: [] for m in (reference, *self.others)}
        self._saved: dict[int, Any] = {}

    def step_done(self, step_ms: dict[str, float], weights: Callable[[], Any]) -> None:
        for method, times in self.step_ms.items():
            times.append(float(step_ms[method]))
        steps = len(self.step_ms[self.reference])
        if steps not in self.evaluated and steps % self.spacing == 0:
            self._saved[steps] = weights()
        if len(self._saved) > self.limit:
            self.spacing *= 2
            self._saved = {k: w for k, w in self._saved.items() if k % self.spacing == 0}
        ends = cumulative_ms(self.step_ms[self.reference])
        soonest = min(cumulative_ms(self.step_ms[m])[-1] for m in self.others)
        passed = [p for p in self._points() if ends[p] < soonest]
        for k in [k for k in self._saved if passed and k < passed[-1]]:
            del self._saved[k]

    def _points(self) -> list[int]:
        steps = len(self.step_ms[self.reference])
        return sorted(self._saved.keys() | {k for k in self.evaluated if k <= steps})

    @property
    def saved_steps(self) -> list[int]:
        return sorted(self._saved)

    def nearest(self) -> dict[str, tuple[int, int, float] | None]:
        """Every other method's :func:`around` on the reference's evaluated and saved steps."""
        ends, points = cumulative_ms(self.step_ms[self.reference]), self._points()
        return {m: around(ends, points, cumulative_ms(self.step_ms[m])[-1]) for m in self.others}

    def steps_to_evaluate(self) -> list[int]:
        """The saved steps nearest some other method's end, ascending."""
        wanted = {k for b in self.nearest().values() if b is not None for k in b[:2]}
        return sorted(wanted & self._saved.keys())

    def weights(self, step: int) -> Any:
        return self._saved[step]
