"""Standalone APF and AutoFreeze baselines: freeze the metric's candidates in every microbatch.

A freezer is a :class:`tfz.masks.MaskProvider`: ``masks_for(stage, microbatch)`` returns the same
:class:`tfz.masks.StageMasks` for every microbatch of a stage, whose frozen units are exactly the
metric's current candidates (the frozen fraction is whatever that gives; ``StageMasks.ratio`` holds it
too). This is how the TimelyFreeze paper runs APF and AutoFreeze on their own: not pipeline-aware,
the same parameters frozen for the whole step. The frozen rows get no weight gradient in any
microbatch, so ``tfz.optim``'s hooks keep their weights and optimizer state unchanged, and frozen whole
tensors keep ``grad = None`` (AdamW skips them).

The masks object of a stage is rebuilt only when the candidates change (the runtime caches its
prepared form per object). Before a stage has been observed ``masks_for`` returns None (nothing
frozen). Call ``observe(step, stage_modules)`` after every ``optimizer.step()``, before ``zero_grad()``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from tfz._validate import check_int
from tfz.masks import StageMasks
from tfz.metrics.apf import APFConfig, APFMetric
from tfz.metrics.autofreeze import AutoFreezeConfig, AutoFreezeMetric
from tfz.metrics.base import FreezeMetric, check_stage

__all__ = ["APFFreezer", "AutoFreezeFreezer", "MetricFreezer"]


class MetricFreezer:
    """Freeze exactly ``metric``'s candidates, in every microbatch (module docstring)."""

    def __init__(self, metric: FreezeMetric):
        if not isinstance(metric, FreezeMetric):
            raise TypeError(f"metric must implement tfz.metrics.FreezeMetric, got {type(metric).__name__}")
        self.metric = metric
        self._masks: dict[int, StageMasks] = {}

    def masks_for(self, stage: int, microbatch: int) -> StageMasks | None:
        """The stage's masks (the same object for every microbatch), None before it is observed."""
        stage = check_stage(stage)
        check_int("microbatch", microbatch, 0)
        units = self.metric.units(stage)
        if units is None:
            return None
        frozen = np.asarray(self.metric.candidates(stage), dtype=bool)
        cached = self._masks.get(stage)
        if cached is not None and cached.units is units and np.array_equal(cached.frozen, frozen):
            return cached
        fraction = float(units.weights[frozen].sum()) / units.total
        masks = self._masks[stage] = StageMasks(units=units, ratio=fraction, frozen=frozen)
        return masks

    def frozen_fraction(self, stage: int) -> float:
        """Weight fraction of ``stage`` frozen now (0.0 before it is observed): the stage's freeze ratio."""
        masks = self.masks_for(stage, 0)
        return 0.0 if masks is None else masks.frozen_fraction

    def observe(self, step: int, stage_modules: Mapping[int, Any]) -> None:
        """Forward one optimizer step to the metric."""
        self.metric.observe(step, stage_modules)

    def state_dict(self) -> dict[str, Any]:
        return {"metric": self.metric.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping) or "metric" not in state:
            raise ValueError(f"state must be a mapping with a 'metric' entry, got {state!r:.200}")
        self.metric.load_state_dict(state["metric"])
        self._masks = {}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.metric.config!r})"
            if hasattr(self.metric, "config")
            else (f"{type(self).__name__}({self.metric!r})")
        )


class APFFreezer(MetricFreezer):
    """Pure APF: ``APFFreezer(APFConfig(...))`` or ``APFFreezer(threshold=0.01, ...)``."""

    def __init__(self, config: APFConfig | None = None, **overrides: Any):
        super().__init__(APFMetric(config, **overrides))


class AutoFreezeFreezer(MetricFreezer):
    """Pure AutoFreeze: ``AutoFreezeFreezer(AutoFreezeConfig(...))`` or ``(percentile=80, ...)``."""

    def __init__(self, config: AutoFreezeConfig | None = None, **overrides: Any):
        super().__init__(AutoFreezeMetric(config, **overrides))
