"""Configuration of the TimelyFreeze controller (:class:`TimelyFreezeConfig`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["TimelyFreezeConfig"]


def _int(name: str, value: Any, minimum: int, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "None or an integer" if optional else "an integer"
        raise ValueError(f"{name} must be {kind} >= {minimum}, got {value!r}")


@dataclass(kw_only=True, frozen=True)
class TimelyFreezeConfig:
    """Phases, windows and freezing limits of :class:`tfz.controller.TimelyFreeze`.

    Defaults are the paper's experiment settings (max_freeze_ratio 0.8, phase_unit 50, a decision
    every 10 steps). Step counts are optimizer steps. Length fields left at None derive from
    ``phase_unit``; the resolved values are the properties ``warmup``, ``monitor``, ``ramp`` and
    ``median_window``. Small values (``phase_unit=2, check_every=1``) suit tests and CPU demos.
    """

    max_freeze_ratio: float = 0.8
    """Cap on each stage's mean freeze ratio over its microbatches (the LP's per-stage constraint)."""
    phase_unit: int = 50
    """Unit of the phase lengths below (warm-up, each monitoring half, ramp = 3 units)."""
    warmup_steps: int | None = None
    """Steps without monitoring or freezing at the start (default ``phase_unit``)."""
    monitor_steps: int | None = None
    """Length of each monitoring half, upper bound then lower bound (default ``phase_unit``)."""
    ramp_steps: int | None = None
    """Steps over which the planned ratios ramp up linearly after the solve (default 3 * phase_unit;
    0 applies the plan at once). The ramp factor moves at decision steps (``check_every``)."""
    check_every: int = 10
    """Steps between decisions: mask redraws, polls for a finished solve, drift checks."""
    discard_steps: int = 1
    """Steps not recorded at the start of each monitoring half and after a plan takes effect, so that
    the first step after a change (allocator, caches, autotuning) does not enter the medians."""
    window: int | None = None
    """Steps in the median window of a monitoring half and of the drift check (default: every
    recorded step of a half, ``monitor - discard_steps``)."""
    drift_threshold: float = 0.1
    """Re-plan when a stage's summed measured time differs from the plan's prediction by more than this
    relative amount, on the same side, in at least 3/4 of the steps of a full window."""
    replan: bool = True
    """Check for drift in the stable phase and re-plan (False: the plan is solved once)."""
    block_rows: int = 64
    """Rows per freezable unit of a linear layer (``tfz.masks.StageUnits``)."""
    include_tensors: bool = False
    """Also count non-linear parameters (norms, embeddings) as whole-tensor units."""
    seed: int = 0
    """Seed of the mask selection, shared by all ranks."""
    weighting: Literal["count", "duration"] = "count"
    """How the LP takes a stage's mean ratio (``tfz.plan.PlanConfig.weighting``)."""
    keep_trainable_units: int = 1
    """Units of the last stage left trainable during the lower-bound window (the other stages freeze
    everything); the measured lower bound is extrapolated to full freezing."""
    async_solve: bool = True
    """Solve in a background thread while training continues (False: solve at once, e.g. in tests)."""
    mask_layout: Literal["auto", "cover", "independent"] = "auto"
    """How a stage's microbatch masks relate within a step. ``cover``: trainable units take turns
    over one circle (``tfz.masks.select_covering``), so every unit trains in some microbatch when the
    ratios allow; ``independent``: one draw per microbatch (``tfz.masks.select``). ``auto``: cover with
    the default random policy, independent with other policies (a metric's preference would be lost
    if every unit took a turn)."""

    def __post_init__(self):
        cap = self.max_freeze_ratio
        if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not 0.0 <= cap <= 1.0:
            raise ValueError(f"max_freeze_ratio must be a number in [0, 1], got {cap!r}")
        _int("phase_unit", self.phase_unit, 1)
        _int("warmup_steps", self.warmup_steps, 0, optional=True)
        _int("monitor_steps", self.monitor_steps, 1, optional=True)
        _int("ramp_steps", self.ramp_steps, 0, optional=True)
        _int("check_every", self.check_every, 1)
        _int("discard_steps", self.discard_steps, 0)
        _int("window", self.window, 1, optional=True)
        _int("block_rows", self.block_rows, 1)
        _int("seed", self.seed, 0)
        _int("keep_trainable_units", self.keep_trainable_units, 0)
        dt = self.drift_threshold
        if isinstance(dt, bool) or not isinstance(dt, (int, float)) or not (dt > 0 and math.isfinite(dt)):
            raise ValueError(f"drift_threshold must be a finite number > 0, got {dt!r}")
        for name in ("replan", "include_tensors", "async_solve"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.weighting not in ("count", "duration"):
            raise ValueError(f"weighting must be 'count' or 'duration', got {self.weighting!r}")
        if self.mask_layout not in ("auto", "cover", "independent"):
            raise ValueError(
                f"mask_layout must be 'auto', 'cover' or 'independent', got {self.mask_layout!r}"
            )
        recorded = self.monitor - self.discard_steps
        if recorded < 1:
            raise ValueError(
                f"discard_steps ({self.discard_steps}) leaves no recorded step in a monitoring half of "
                f"{self.monitor} steps"
            )
        if self.window is not None and self.window > recorded:
            raise ValueError(
                f"window ({self.window}) exceeds the recorded steps of a monitoring half "
                f"(monitor {self.monitor} - discard_steps {self.discard_steps} = {recorded})"
            )

    @property
    def warmup(self) -> int:
        """Resolved ``warmup_steps``."""
        return self.phase_unit if self.warmup_steps is None else self.warmup_steps

    @property
    def monitor(self) -> int:
        """Resolved ``monitor_steps`` (each half)."""
        return self.phase_unit if self.monitor_steps is None else self.monitor_steps

    @property
    def ramp(self) -> int:
        """Resolved ``ramp_steps``."""
        return 3 * self.phase_unit if self.ramp_steps is None else self.ramp_steps

    @property
    def median_window(self) -> int:
        """Resolved ``window``."""
        return self.monitor - self.discard_steps if self.window is None else self.window

    def to_dict(self) -> dict[str, Any]:
        """Field values (plain types)."""
        return dataclasses.asdict(self)
