"""Configuration of the TimelyFreeze controller (:class:`TimelyFreezeConfig`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from tfz._validate import check_bool, check_int, check_number, is_int
from tfz.plan import PlanConfig

__all__ = ["TimelyFreezeConfig"]

_RESUMABLE = {"resumable": True}
"""Field metadata: a resumed run may use another value than the checkpoint's."""

MASK_LAYOUTS = ("auto", "cover", "arcs", "independent")
"""Values of ``TimelyFreezeConfig.mask_layout``."""

_LONGEST_UNIT = 50
"""``for_run`` never makes the phase unit longer than the paper's (long runs get its phases)."""


@dataclass(kw_only=True, frozen=True)
class TimelyFreezeConfig:
    """Phases, windows and freezing limits of :class:`tfz.controller.TimelyFreeze`.

    Step counts are optimizer steps. Length fields left at None derive from ``phase_unit``; the
    resolved values are the properties ``warmup``, ``monitor``, ``ramp`` and ``median_window``.

    With the defaults (the paper's experiment settings: ``phase_unit`` 50, a decision every 10 steps,
    the LP's cap 0.8, here on each stage's mean and each microbatch's ratio) a run goes: steps 0-49
    warm-up, 50-99 monitoring unfrozen, 100-149 monitoring with half of every step's microbatches
    partly frozen beside unfrozen ones (``monitoring``; every step still trains), the LP solves
    beside training from step 150, the plan takes effect at step 160 (``first_plan_step``, if the
    solve is done by then) and ramps in until it is fully applied at step 310 (``full_plan_step``).
    A run of a few dozen steps never gets there: use :meth:`for_run`
    (``TimelyFreezeConfig.for_run(total_steps=60)``), which scales the phases to the run. Small
    values (``phase_unit=2, check_every=1``) suit tests.
    """

    plan: PlanConfig = field(default_factory=PlanConfig)
    """The freeze-ratio LP's options (:class:`tfz.plan.PlanConfig`): ``max_freeze_ratio``, the cap on
    each stage's mean freeze ratio over its microbatches (default 0.8), ``weighting`` and
    ``action_cap`` (see ``cap_each_microbatch``)."""
    cap_each_microbatch: bool = True
    """Where ``plan.action_cap`` is None, cap each (stage, microbatch) ratio at ``max_freeze_ratio``
    (``plan`` then holds that cap). The LP alone caps only each stage's mean and its optimum may
    freeze a stage whole in most microbatches, so every row learns from the same few; the cap spreads
    the freezing over every microbatch for a 1-2% longer planned step (bench/RESULTS.md, "Settings
    chosen by measurement"). False: the paper's LP."""
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
    drift_threshold: float = field(default=0.1, metadata=_RESUMABLE)
    """Re-plan when a stage's summed measured time, or the slowest rank's batch time (with batch times),
    differs from the plan's prediction by more than this relative amount, on the same side, in at
    least 3/4 of the steps of a full window."""
    replan: bool = field(default=True, metadata=_RESUMABLE)
    """Check for drift in the stable phase and re-plan (False: the plan is solved once)."""
    block_rows: int = 64
    """Rows per freezable unit of a linear layer (``tfz.masks.StageUnits``)."""
    include_tensors: bool = False
    """Also count non-linear parameters (norms, embeddings) as whole-tensor units."""
    seed: int = 0
    """Seed of the mask selection, shared by all ranks."""
    monitoring: Literal["partial", "frozen"] = "partial"
    """How the second monitoring half measures what freezing saves. ``partial``: every B/W action
    runs at the ``monitor_ratios`` (by default unfrozen or 0.8 frozen), its microbatches taking
    turns over them step by step, so every step still trains (with the covering layout every unit
    trains in some microbatch of every step); each action's time is fitted as ``a + b x`` in the
    active fraction x of its masks (``tfz.controller.estimates.fit_linear``). ``frozen``: the
    paper's window, every unit frozen but ``keep_trainable_units`` of the last stage (no learning
    for ``monitor_steps`` steps), the bound extrapolated from that one level."""
    monitor_ratios: tuple[float, ...] | None = None
    """Freeze ratios of the ``partial`` monitoring half, each in [0, 1], at least one above 0
    (default, :attr:`monitor_levels`: (0, 0.8), or (0.4, 0.8) when a half records one step only);
    microbatch m of stage s runs at ``levels[(k + m) % len]`` in its k-th step, so a stage's mean is
    about their mean. A 0 level runs some microbatches unfrozen beside the partly frozen ones of
    the same steps; an action that ran at both in the recorded steps is then fitted from this half
    alone, so both ends of its line are measured at the same moments, and a change of the machine's
    speed between the halves does not tilt it (the unfrozen half still gives the batch time behind
    the gap, and the line of an action that met one level only)."""
    keep_trainable_units: int = 1
    """``frozen`` monitoring: units of the last stage left trainable in the all-frozen window (the
    other stages freeze everything); the measured lower bound is extrapolated to full freezing."""
    async_solve: bool = field(default=True, metadata=_RESUMABLE)
    """Solve in a background thread while training continues (False: solve at once, e.g. in tests)."""
    mask_layout: Literal["auto", "cover", "arcs", "independent"] = "auto"
    """How a stage's microbatch masks relate within a step. ``cover``: trainable units take turns
    over one circle (``tfz.masks.select_covering``), so every unit trains in some microbatch when the
    ratios allow; ``arcs``: the same turns on a circle per layer (``tfz.masks.select_row_arcs``), so
    every microbatch trains one contiguous run of rows of every layer and the masked dW needs no
    gather; ``independent``: one draw per microbatch (``tfz.masks.select``). ``auto``: cover with the
    default random policy, independent with other policies (a metric's preference would be lost if
    every unit took a turn). ``arcs`` draws at random and takes no policy."""

    def __post_init__(self):
        if not isinstance(self.plan, PlanConfig):
            raise TypeError(f"plan must be a tfz.plan.PlanConfig, got {type(self.plan).__name__}")
        ints = {
            "phase_unit": (1, False),
            "warmup_steps": (0, True),
            "monitor_steps": (1, True),
            "ramp_steps": (0, True),
            "check_every": (1, False),
            "discard_steps": (0, False),
            "window": (1, True),
            "block_rows": (1, False),
            "seed": (0, False),
            "keep_trainable_units": (0, False),
        }
        for name, (minimum, optional) in ints.items():
            object.__setattr__(self, name, check_int(name, getattr(self, name), minimum, optional=optional))
        threshold = check_number("drift_threshold", self.drift_threshold, low=0.0, low_open=True)
        object.__setattr__(self, "drift_threshold", threshold)
        for name in ("replan", "include_tensors", "async_solve", "cap_each_microbatch"):
            object.__setattr__(self, name, check_bool(name, getattr(self, name)))
        if self.cap_each_microbatch and self.plan.action_cap is None:
            capped = dataclasses.replace(self.plan, action_cap=self.plan.max_freeze_ratio)
            object.__setattr__(self, "plan", capped)
        if self.monitoring not in ("partial", "frozen"):
            raise ValueError(f"monitoring must be 'partial' or 'frozen', got {self.monitoring!r}")
        if self.monitor_ratios is not None:
            object.__setattr__(self, "monitor_ratios", _checked_levels(self.monitor_ratios))
        if self.mask_layout not in MASK_LAYOUTS:
            names = ", ".join(map(repr, MASK_LAYOUTS))
            raise ValueError(f"mask_layout must be one of {names}, got {self.mask_layout!r}")
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
        levels = self.monitor_ratios
        if levels is not None and self.paired_monitoring and self.median_window < len(levels):
            raise ValueError(
                f"monitor_ratios {levels} hold a 0, so every action must run at each of them within "
                f"the {self.median_window} recorded step(s) of a monitoring half; give a longer window "
                "or ratios without a 0"
            )

    @classmethod
    def for_run(cls, total_steps: int, **overrides: Any) -> TimelyFreezeConfig:
        """A config whose phases fit a run of ``total_steps`` optimizer steps.

        ``phase_unit`` is a tenth of the run (at least the shortest unit that records two steps in a
        monitoring half, at most the paper's 50), ``check_every`` a third
        of the unit (1 to 10) and the ramp one unit, so the plan takes effect after about 30% of the
        run and is fully applied by its middle; at 60 steps: phase unit 6, plan from step 20, fully
        applied from step 26.
        ``overrides`` set any field (the derived ones follow an overridden ``phase_unit``).

        Raises ValueError, naming the minimum ``total_steps``, when the plan would not be fully
        applied by the middle of the run (``full_plan_step > total_steps / 2``).
        """
        total = check_int("total_steps", total_steps, 1)
        config = cls._fitted(total, overrides)
        if 2 * config.full_plan_step > total:
            need = cls._shortest_run(total, overrides)
            raise ValueError(
                f"a run of {total} steps is too short for freezing to take effect: the plan would be "
                f"fully applied at step {config.full_plan_step} (phase_unit {config.phase_unit}, "
                f"check_every {config.check_every}, ramp {config.ramp}), after the middle of the run; "
                f"for_run needs total_steps >= {need} with these settings"
            )
        return config

    @classmethod
    def _fitted(cls, total: int, overrides: dict[str, Any]) -> TimelyFreezeConfig:
        discard = overrides.get("discard_steps", cls.__dataclass_fields__["discard_steps"].default)
        shortest = (int(discard) if is_int(discard) else 1) + 2  # two recorded steps per half
        unit = overrides.get("phase_unit", min(_LONGEST_UNIT, max(shortest, total // 10)))
        derived = {"phase_unit": unit}
        if is_int(unit):
            unit = int(unit)
            derived.update(check_every=max(1, min(10, unit // 3)), ramp_steps=unit)
        return cls(**{**derived, **overrides})

    @classmethod
    def _shortest_run(cls, total: int, overrides: dict[str, Any]) -> int:
        """The fewest steps, more than ``total``, for which :meth:`for_run` applies the plan by the
        middle of the run. The fitted phase unit stops growing at ``10 * _LONGEST_UNIT`` steps; beyond
        that the plan's steps are fixed, so the answer is found without counting up to it."""
        grows = 10 * _LONGEST_UNIT
        for t in range(total + 1, grows + 1):
            if 2 * cls._fitted(t, overrides).full_plan_step <= t:
                return t
        fixed = cls._fitted(max(total + 1, grows + 1), overrides).full_plan_step
        return max(total + 1, grows + 1, 2 * fixed)

    @property
    def max_freeze_ratio(self) -> float:
        """``plan.max_freeze_ratio``: the cap on each stage's mean freeze ratio."""
        return self.plan.max_freeze_ratio

    @property
    def warmup(self) -> int:
        """Resolved ``warmup_steps``."""
        return self.phase_unit if self.warmup_steps is None else self.warmup_steps

    @property
    def monitor_levels(self) -> tuple[float, ...]:
        """Resolved ``monitor_ratios``: (0, 0.8) when a monitoring half records at least two steps,
        so that every action runs both unfrozen and partly frozen in it, else (0.4, 0.8)."""
        if self.monitor_ratios is not None:
            return self.monitor_ratios
        return (0.0, 0.8) if self.median_window >= 2 else (0.4, 0.8)

    @property
    def paired_monitoring(self) -> bool:
        """Partial monitoring with a 0 level: an action's bounds come from the partly frozen half."""
        return self.monitoring == "partial" and 0.0 in self.monitor_levels

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

    @property
    def first_plan_step(self) -> int:
        """Steps (from the first) before the plan takes effect, when the initial solve is done by the
        first decision step after its submission at ``warmup + 2 * monitor``."""
        submitted = self.warmup + 2 * self.monitor
        return (submitted // self.check_every + 1) * self.check_every

    @property
    def full_plan_step(self) -> int:
        """Steps before the plan is fully applied (the end of the ramp), under the same assumption."""
        return self.first_plan_step + self.ramp

    def to_dict(self) -> dict[str, Any]:
        """Field values (plain types; ``plan`` as a nested dict)."""
        return dataclasses.asdict(self)

    def pinned(self) -> dict[str, Any]:
        """The fields a resumed run must share with its checkpoint (they decide phases, estimates,
        plans and masks), flattened as ``{"phase_unit": 50, "plan.max_freeze_ratio": 0.8, ...}``."""
        out = {}
        for f in dataclasses.fields(self):
            if f.metadata.get("resumable"):
                continue
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = list(value)  # as a checkpoint holds it after JSON
            if isinstance(value, PlanConfig):
                out.update({f"{f.name}.{k}": v for k, v in dataclasses.asdict(value).items()})
            else:
                out[f.name] = value
        return out


def _checked_levels(levels) -> tuple[float, ...]:
    """``monitor_ratios`` as a tuple of distinct ratios in [0, 1], one above 0 (ValueError naming it)."""
    if not isinstance(levels, (tuple, list)) or not levels:
        raise ValueError(f"monitor_ratios must be a non-empty tuple of ratios in [0, 1], got {levels!r}")
    checked = tuple(check_number(f"monitor_ratios[{i}]", r, low=0.0, high=1.0) for i, r in enumerate(levels))
    if len(set(checked)) != len(checked):
        raise ValueError(f"monitor_ratios must not repeat a ratio, got {levels!r}")
    if not any(checked):
        raise ValueError(f"monitor_ratios must hold a ratio above 0, got {levels!r}")
    return checked
