"""No freezing's validation loss at another method's training time, measured rather than read off a curve.

Every method trains in lockstep, so no freezing (the reference) passes a faster method's total
training time T some steps before its own end. Its loss there is measured on its weights saved
after the two steps around T (:func:`bracket`), evaluated after training and interpolated across
that single step. A loss curve evaluated every few steps is convex, so a straight line between its
points sits above it: read there, the reference looks worse than it was and the faster method looks
ahead (by 0.3% of the loss between points 20 steps apart in the demo's runs; bench/RESULTS.md).

Times are the steps' cumulative milliseconds (:func:`cumulative_ms`); the workers and the report
compute them from the same per-step maxima over the ranks, so both pick the same steps. While
training, :class:`ReferenceSnapshots` keeps only the saved steps that may still be needed: an end T
is at least the method's time so far, so a step whose successor ended before every other method's
time so far can never bracket one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

__all__ = ["ReferenceSnapshots", "bracket", "cumulative_ms"]


def cumulative_ms(step_ms: Sequence[float]) -> np.ndarray:
    """float64 [steps + 1]: training time after 0, 1, ... steps."""
    return np.concatenate([[0.0], np.cumsum(np.asarray(step_ms, dtype=np.float64))])


def bracket(reference_ms: Sequence[float], t_ms: float) -> tuple[int, int, float] | None:
    """``(j, j + 1, w)``: the reference's steps whose cumulative times enclose ``t_ms`` and the weight
    of step ``j + 1`` in a linear interpolation; None when ``t_ms`` lies outside its run."""
    times = cumulative_ms(reference_ms)
    if len(times) < 2 or not times[0] <= t_ms <= times[-1]:
        return None
    j = min(int(np.searchsorted(times, t_ms, side="right")) - 1, len(times) - 2)
    return j, j + 1, float((t_ms - times[j]) / (times[j + 1] - times[j]))


class ReferenceSnapshots:
    """The reference's weights after the steps that may bracket another method's end.

    Call :meth:`step_done` after every step with every method's step time (the same on every rank)
    and a function returning the reference's weights; after training, :meth:`steps_to_evaluate`
    gives the saved steps that bracket the other methods' ends, and :meth:`weights` their weights.
    Steps in ``evaluated`` (the regular evaluations) are never saved.
    """

    def __init__(self, reference: str, methods: Iterable[str], evaluated: Iterable[int]):
        self.reference = reference
        self.others = [m for m in methods if m != reference]
        if not self.others:
            raise ValueError(f"no method beside the reference {reference!r} to compare with")
        self.evaluated = frozenset(evaluated)
        self.step_ms: dict[str, list[float]] = {m: [] for m in (reference, *self.others)}
        self._saved: dict[int, Any] = {}

    def step_done(self, step_ms: dict[str, float], weights: Callable[[], Any]) -> None:
        for method, times in self.step_ms.items():
            times.append(float(step_ms[method]))
        steps = len(self.step_ms[self.reference])
        if steps not in self.evaluated:
            self._saved[steps] = weights()
        reference = cumulative_ms(self.step_ms[self.reference])
        soonest = min(cumulative_ms(self.step_ms[m])[-1] for m in self.others)
        for k in [k for k in self._saved if k < steps and reference[k + 1] < soonest]:
            del self._saved[k]

    @property
    def saved_steps(self) -> list[int]:
        return sorted(self._saved)

    def brackets(self) -> dict[str, tuple[int, int, float] | None]:
        """Every other method's bracket on the reference's steps (None past the reference's end)."""
        reference = self.step_ms[self.reference]
        return {m: bracket(reference, cumulative_ms(self.step_ms[m])[-1]) for m in self.others}

    def steps_to_evaluate(self) -> list[int]:
        """The bracketing steps that no regular evaluation covers, ascending (all saved)."""
        wanted = {k for b in self.brackets().values() if b is not None for k in b[:2]}
        steps = sorted(wanted - self.evaluated)
        missing = [k for k in steps if k not in self._saved]
        if missing:
            raise RuntimeError(f"reference weights after step(s) {missing} were not kept")
        return steps

    def weights(self, step: int) -> Any:
        return self._saved[step]
