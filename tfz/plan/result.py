"""The result of a freeze-ratio solve: :class:`Plan` (ratios, makespans, stage means; JSON)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tfz._validate import check_bool, check_choice, check_number, check_ratio, short_repr
from tfz.plan.warm import WarmState
from tfz.schedule.action import Action

__all__ = ["FORMAT", "VERSION", "Plan"]

FORMAT = "tfz-plan"
VERSION = 1


@dataclass(frozen=True, eq=False)
class Plan:
    """Freeze ratio of every action and what it buys.

    ``ratios`` is float64 [n] aligned with ``names`` (the DAG's action names), 0 for actions that
    cannot freeze. Makespans are in the unit of the durations given to the solver.
    """

    names: tuple[str, ...]
    ratios: np.ndarray
    makespan_planned: float
    """Batch time of the planned durations (list-scheduling simulation)."""
    makespan_unfrozen: float
    makespan_all_frozen: float
    """Batch time with every freezable action fully frozen (ignoring the caps)."""
    stage_mean_ratio: tuple[float, ...]
    """Weighted mean ratio per stage over all its B/W actions (see ``weighting``): the share of the
    stage's weight-gradient work (FLOPs with ``"count"``, time with ``"duration"``) the masks skip."""
    total_ratio: float
    """Sum of all ratios: the phase-2 objective."""
    solve_seconds: float
    status: str
    """``"optimal"`` (a failed solve raises instead of returning a plan)."""
    max_freeze_ratio: float
    weighting: str
    solver: str
    """``"structured"`` (tfz.plan.solve) or ``"generic"`` (the plain HiGHS formulation)."""
    schedule: str = ""
    phase_seconds: tuple[float, float] = (0.0, 0.0)
    """Seconds of the two solver stages: for ``tfz.plan.solve``, the uncapped optimum and then the
    capped one (both phases at once; a warm restart from the previous final basis: set-up, then the
    restart); for the generic solver and the HiGHS fallback, phase 1 (makespan) and phase 2 (total
    freezing)."""
    warm: bool = False
    """Whether the solve started from a previous plan's solver state."""
    makespan_slack: float = 0.0
    """``PlanConfig.makespan_slack`` of the solve: the makespan was allowed (1 + slack) T*."""
    cannot_gain: tuple[str, ...] = ()
    """B/W actions whose frozen time is not below their unfrozen time: freezing them gains nothing, so
    their ratio is 0, and they count at 0 in their stage's mean."""
    _warm_state: WarmState | None = field(default=None, repr=False, compare=False)

    @property
    def num_actions(self) -> int:
        return len(self.names)

    @property
    def ratio_by_action(self) -> dict[str, float]:
        """Ratio per action name, every action included."""
        return dict(zip(self.names, self.ratios.tolist()))

    @property
    def speedup(self) -> float:
        """makespan_unfrozen / makespan_planned."""
        return self.makespan_unfrozen / self.makespan_planned if self.makespan_planned > 0 else 1.0

    def durations(self, unfrozen, frozen) -> np.ndarray:
        """float64 [n]: planned durations ``U - r (U - L)`` for arrays aligned with ``names``."""
        up = np.asarray(unfrozen, dtype=np.float64)
        low = np.asarray(frozen, dtype=np.float64)
        if up.shape != self.ratios.shape or low.shape != self.ratios.shape:
            raise ValueError(f"durations must have shape {self.ratios.shape}, got {up.shape} and {low.shape}")
        return up - self.ratios * (up - low)

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "schedule": self.schedule,
            "solver": self.solver,
            "status": self.status,
            "max_freeze_ratio": self.max_freeze_ratio,
            "weighting": self.weighting,
            "makespan_slack": self.makespan_slack,
            "makespan_unfrozen": self.makespan_unfrozen,
            "makespan_all_frozen": self.makespan_all_frozen,
            "makespan_planned": self.makespan_planned,
            "speedup": self.speedup,
            "total_ratio": self.total_ratio,
            "stage_mean_ratio": list(self.stage_mean_ratio),
            "solve_seconds": self.solve_seconds,
            "phase_seconds": list(self.phase_seconds),
            "warm": self.warm,
            "cannot_gain": list(self.cannot_gain),
            "ratios": self.ratio_by_action,
        }

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: Any) -> Plan:
        """Inverse of :meth:`to_dict`; ValueError naming the bad field."""
        if not isinstance(d, dict):
            raise ValueError(f"plan: expected a JSON object, got {type(d).__name__}")
        if d.get("format") != FORMAT:
            raise ValueError(f"plan.format: expected {FORMAT!r}, got {d.get('format')!r}")
        if d.get("version") != VERSION:
            raise ValueError(f"plan.version: expected {VERSION}, got {d.get('version')!r}")
        ratios = d.get("ratios")
        if not isinstance(ratios, dict):
            raise ValueError("plan.ratios: expected an object keyed by action name")
        values = np.array([check_ratio(f"plan.ratios.{k}", v) for k, v in ratios.items()], dtype=np.float64)

        cannot_gain = d.get("cannot_gain", [])
        if not isinstance(cannot_gain, list) or any(
            not isinstance(name, str) or name not in ratios for name in cannot_gain
        ):
            raise ValueError("plan.cannot_gain: expected a list of action names of plan.ratios")

        stages = set()
        for name in ratios:
            try:
                stages.add(Action.parse(name).stage)
            except ValueError as exc:
                raise ValueError(f"plan.ratios: {exc}") from None

        def num(key, low=None):
            if key not in d:
                raise ValueError(f"plan.{key}: missing")
            return check_number(f"plan.{key}", d[key], low=low)

        def nums(key, default, length=None, check=check_number):
            values = d.get(key, default)
            if not isinstance(values, list) or (length is not None and len(values) != length):
                size = "a list of numbers" if length is None else f"a list of {length} numbers"
                raise ValueError(f"plan.{key}: expected {size}, got {short_repr(values)}")
            return tuple(check(f"plan.{key}[{i}]", v) for i, v in enumerate(values))

        def text(key, default=""):
            value = d.get(key, default)
            if not isinstance(value, str):
                raise ValueError(f"plan.{key}: expected a string, got {short_repr(value)}")
            return value

        num_stages = max(stages) + 1 if stages else 0
        stage_mean = nums("stage_mean_ratio", [], check=check_ratio)
        if len(stage_mean) != num_stages:
            raise ValueError(
                f"plan.stage_mean_ratio: expected one ratio per stage of plan.ratios ({num_stages}), "
                f"got {len(stage_mean)}"
            )
        return cls(
            names=tuple(ratios),
            ratios=values,
            makespan_planned=num("makespan_planned", low=0.0),
            makespan_unfrozen=num("makespan_unfrozen", low=0.0),
            makespan_all_frozen=num("makespan_all_frozen", low=0.0),
            stage_mean_ratio=stage_mean,
            total_ratio=num("total_ratio"),
            solve_seconds=num("solve_seconds"),
            status=text("status"),
            max_freeze_ratio=check_ratio("plan.max_freeze_ratio", d.get("max_freeze_ratio")),
            weighting=check_choice("plan.weighting", d.get("weighting", "count"), ("count", "duration")),
            solver=text("solver"),
            schedule=text("schedule"),
            phase_seconds=nums("phase_seconds", [0.0, 0.0], length=2),
            warm=check_bool("plan.warm", d.get("warm", False)),
            makespan_slack=check_ratio("plan.makespan_slack", d.get("makespan_slack", 0.0)),
            cannot_gain=tuple(cannot_gain),
        )

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"plan: invalid JSON ({exc.msg} at line {exc.lineno})") from None
        return cls.from_dict(d)
