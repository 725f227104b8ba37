"""Turn raw LP ratios into a :class:`~tfz.plan.result.Plan`: clip, enforce the caps, simulate."""

from __future__ import annotations

import numpy as np

from tfz.dag import simulate
from tfz.plan._highs import PlanSolveError
from tfz.plan.problem import PlanProblem
from tfz.plan.result import Plan
from tfz.plan.warm import WarmState

__all__ = ["finish_plan"]

_REL_TOL = 1e-7


def finish_plan(
    problem: PlanProblem,
    raw: np.ndarray,
    target: float,
    *,
    solver: str,
    seconds: float,
    phase_seconds: tuple[float, float],
    warm: bool = False,
    warm_state: WarmState | None = None,
) -> Plan:
    """Plan from raw ratios [n] of an optimal LP solution whose makespan is ``target``.

    Ratios are clipped to their bounds and a stage over its cap by rounding is scaled down to it, so
    the plan satisfies every constraint exactly; its makespan is then simulated. A makespan above
    ``target`` by more than 1e-7 of the unfrozen makespan means the solver's answer was not what it
    claimed and raises :class:`PlanSolveError`.
    """
    r = np.clip(np.where(problem.freezable, raw, 0.0), 0.0, problem.cap)
    stage = problem.dag.stage
    total, budget = problem.stage_budget()
    used = np.bincount(stage, weights=problem.weight * r, minlength=len(total))
    over = used > budget
    if over.any():
        scale = np.ones(len(total))
        scale[over] = budget[over] / used[over]
        r = r * scale[stage]
    planned = simulate(problem.dag, problem.durations(r)).makespan
    unfrozen = simulate(problem.dag, problem.unfrozen).makespan
    if planned > target + _REL_TOL * unfrozen:
        raise PlanSolveError(
            f"{solver}: planned makespan {planned!r} exceeds the LP optimum {target!r}", "inconsistent"
        )
    all_frozen = simulate(problem.dag, problem.frozen).makespan
    return Plan(
        names=problem.dag.names,
        ratios=r,
        makespan_planned=float(planned),
        makespan_unfrozen=float(unfrozen),
        makespan_all_frozen=float(all_frozen),
        stage_mean_ratio=tuple(problem.stage_mean(r).tolist()),
        cannot_gain=tuple(problem.dag.names[i] for i in np.flatnonzero(problem.cannot_gain)),
        total_ratio=float(r.sum()),
        solve_seconds=float(seconds),
        status="optimal",
        max_freeze_ratio=problem.max_freeze_ratio,
        weighting=problem.config.weighting,
        makespan_slack=problem.config.makespan_slack,
        solver=solver,
        schedule=problem.dag.schedule.name,
        phase_seconds=phase_seconds,
        warm=warm,
        _warm_state=warm_state,
    )
