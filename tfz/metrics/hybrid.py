"""TimelyFreeze + metric: the LP decides how much each (stage, microbatch) freezes, a metric decides which.

:class:`MetricGuidedPolicy` is a :class:`tfz.masks.SelectionPolicy`. ``tfz.masks.select`` fills the
stage's budget ``ratio * total`` in the order the policy ranks the units (first fit, then one best-fit
unit), so the realised fraction obeys the same bound as with random selection whatever the order:
|realised − ratio| <= max unit weight / (2 total). The metric only changes the order:

- ``mode="rank"`` (default): candidates first, strongest first (APF: lowest P; AutoFreeze: front
  layers first), ties in random order; then the other units in uniform random order.
- ``mode="sample"``: weighted sampling without replacement, weight 1 for candidates and
  ``other_weight`` (0.01) otherwise, as in the TimelyFreeze authors' ``timelyapf`` / ``timelyauto``
  (Efraimidis-Spirakis keys Exp(1) / weight, which give the successive-sampling order).

**Why "rank" is the default.** With weights 1 vs 0.01 the first draw is a non-candidate with
probability 0.01 m / (c + 0.01 m) for c candidates and m other units. TimelyFreeze's units are whole
tensors (m is a few dozen per stage, so 0.01 m is small); tfz's are row blocks, and a LLaMA-1B stage has
about 1,500 of them: with 10% candidates, 8% of even the first draw goes to a non-candidate, and the
share grows as candidates are used up, so the metric's choice is diluted exactly when it matters.
"rank" freezes every candidate before any other unit whenever the budget allows (with equal-weight
units; first fit may add a smaller non-candidate when the next candidate does not fit) and, when the
budget is smaller than the candidates, the most stable ones: the same ones in every microbatch, which
is what the metric asks for. Variety across microbatches then comes from the non-candidates and from
ties. "sample" remains for comparisons with the authors' numbers.

**Identical on all ranks.** The only randomness is the ``rng`` that ``select`` passes in, seeded by
(seed, stage, microbatch, step); the metric state of a stage lives on the rank that holds it and is a
function of that stage's weights and gradients (see :mod:`tfz.metrics.base` for data-parallel
replicas). No communication is needed.

Call ``observe(step, stage_modules)`` every step after ``optimizer.step()``; ``state_dict`` holds the
metric's state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tfz._validate import check_number
from tfz.masks import Unit
from tfz.metrics.apf import APFConfig, APFMetric
from tfz.metrics.autofreeze import AutoFreezeConfig, AutoFreezeMetric
from tfz.metrics.base import FreezeMetric, check_stage, unit_positions

__all__ = ["MetricGuidedPolicy"]

_MODES = ("rank", "sample")


class MetricGuidedPolicy:
    """Order units for ``tfz.masks.select`` by a metric's candidates (module docstring)."""

    def __init__(self, metric: FreezeMetric, mode: str = "rank", *, other_weight: float = 0.01):
        if not isinstance(metric, FreezeMetric):
            raise TypeError(f"metric must implement tfz.metrics.FreezeMetric, got {type(metric).__name__}")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        self.metric = metric
        self.mode = mode
        self.other_weight = check_number("other_weight", other_weight, low=0.0, high=1.0, low_open=True)
        self._positions: dict[int, tuple[Any, Any, np.ndarray]] = {}

    @classmethod
    def apf(
        cls, config: APFConfig | None = None, *, mode: str = "rank", **overrides: Any
    ) -> MetricGuidedPolicy:
        """TimelyFreeze + APF."""
        return cls(APFMetric(config, **overrides), mode)

    @classmethod
    def autofreeze(
        cls, config: AutoFreezeConfig | None = None, *, mode: str = "rank", **overrides: Any
    ) -> MetricGuidedPolicy:
        """TimelyFreeze + AutoFreeze."""
        return cls(AutoFreezeMetric(config, **overrides), mode)

    def _lookup(self, units: Sequence[Unit], stage: int) -> np.ndarray | None:
        known = self.metric.units(stage)
        if known is None:
            return None
        cached = self._positions.get(stage)
        if cached is not None and cached[0] is units and cached[1] is known:
            return cached[2]
        positions = unit_positions(known, units, stage=stage)
        self._positions[stage] = (units, known, positions)
        return positions

    def rank(
        self, units: Sequence[Unit], *, stage: int, microbatch: int, rng: np.random.Generator
    ) -> np.ndarray:
        """A permutation of ``range(len(units))`` (int [n_units]), most preferred to freeze first."""
        stage = check_stage(stage)
        n = len(units)
        positions = self._lookup(units, stage)
        if positions is None:  # stage not observed yet: no candidates
            candidate = np.zeros(n, dtype=bool)
            score = np.zeros(n)
        else:
            candidate = np.asarray(self.metric.candidates(stage), dtype=bool)[positions]
            score = np.asarray(self.metric.scores(stage), dtype=np.float64)[positions]
        if self.mode == "sample":
            weights = np.where(candidate, 1.0, self.other_weight)
            return np.argsort(rng.exponential(size=n) / weights, kind="stable")
        ties = rng.random(n)
        strength = np.where(candidate, -np.nan_to_num(score, nan=-np.inf), 0.0)
        return np.lexsort((ties, strength, ~candidate))

    def observe(self, step: int, stage_modules: Mapping[int, Any]) -> None:
        """Forward one optimizer step to the metric."""
        self.metric.observe(step, stage_modules)

    def state_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "other_weight": self.other_weight, "metric": self.metric.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping) or "metric" not in state:
            raise ValueError(f"state must be a mapping with a 'metric' entry, got {state!r:.200}")
        if state.get("mode") != self.mode or state.get("other_weight") != self.other_weight:
            raise ValueError(
                f"state is for mode={state.get('mode')!r}, other_weight={state.get('other_weight')!r}; "
                f"this policy has mode={self.mode!r}, other_weight={self.other_weight!r}"
            )
        self.metric.load_state_dict(state["metric"])
        self._positions = {}

    def __repr__(self) -> str:
        return f"MetricGuidedPolicy({type(self.metric).__name__}, mode={self.mode!r})"
