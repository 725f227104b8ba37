"""A plan solve that runs beside training, and the flat float64 form in which a plan is broadcast."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import numpy as np

from tfz.dag import DAG
from tfz.plan import Plan, PlanConfig, PlanSolveError

__all__ = ["SolveJob", "pack_plan", "packed_size", "solve_with_retry", "unpack_plan"]

logger = logging.getLogger("tfz.controller")

RETRY_GRID = 1e-6
"""Relative grid (of the mean unfrozen time) the durations are rounded to for the retry."""

_SOLVERS = ("structured", "generic")
_HEADER = 9


class SolveJob:
    """Runs ``fn(*args, **kwargs)`` in a daemon thread (``background=True``) or at once."""

    def __init__(self, fn: Callable[..., Plan], args: tuple, kwargs: dict, *, background: bool):
        self._fn, self._args, self._kwargs = fn, args, kwargs
        self._result: Plan | None = None
        self._error: BaseException | None = None
        self._finished = threading.Event()
        if background:
            threading.Thread(target=self._run, name="tfz-plan-solve", daemon=True).start()
        else:
            self._run()

    def _run(self) -> None:
        try:
            self._result = self._fn(*self._args, **self._kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the training thread
            self._error = exc
        finally:
            self._finished.set()

    def done(self) -> bool:
        return self._finished.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._finished.wait(timeout)

    @property
    def error(self) -> BaseException | None:
        return self._error

    @property
    def result(self) -> Plan:
        """The plan; raises the solver's exception, or RuntimeError while it runs."""
        if not self.done():
            raise RuntimeError("the plan solve has not finished")
        if self._error is not None:
            raise self._error
        return self._result


def solve_with_retry(
    solver: Callable[..., Plan],
    dag: DAG,
    upper: np.ndarray,
    lower: np.ndarray,
    config: PlanConfig,
    warm: Plan | None,
) -> Plan:
    """``solver(dag, upper, lower, config, warm_start=warm)``; on :class:`~tfz.plan.PlanSolveError` one
    cold retry with the durations rounded to ``RETRY_GRID`` of their mean (far below timer noise).

    The LP solver occasionally stops ("Infeasible"/"Unknown" in phase 2) on measured inputs whose
    phase-1 optimum sits within its tolerance of the phase-2 bound; slightly different inputs solve.
    The first error is raised when the retry fails too.
    """
    try:
        return solver(dag, upper, lower, config, warm_start=warm)
    except PlanSolveError as first:
        q = RETRY_GRID * float(np.mean(upper)) if np.mean(upper) > 0 else RETRY_GRID
        up = np.round(upper / q) * q
        low = np.minimum(np.round(lower / q) * q, up)
        logger.warning("tfz.controller: plan solve failed (%s); retrying on a %.0e grid", first, RETRY_GRID)
        try:
            return solver(dag, up, low, config, warm_start=None)
        except PlanSolveError:
            raise first from None


def pack_plan(plan: Plan, num_stages: int) -> np.ndarray:
    """float64 [9 + S + 2n]: makespans, totals, timings, warm flag, solver code, stage means, ratios,
    then 1.0 for each action that cannot gain from freezing."""
    code = _SOLVERS.index(plan.solver) if plan.solver in _SOLVERS else -1
    means = np.zeros(num_stages)
    means[: len(plan.stage_mean_ratio)] = plan.stage_mean_ratio
    head = [
        plan.makespan_planned,
        plan.makespan_unfrozen,
        plan.makespan_all_frozen,
        plan.total_ratio,
        plan.solve_seconds,
        plan.phase_seconds[0],
        plan.phase_seconds[1],
        float(plan.warm),
        float(code),
    ]
    cannot_gain = np.isin(np.asarray(plan.names, dtype=object), plan.cannot_gain).astype(np.float64)
    return np.concatenate([np.asarray(head, dtype=np.float64), means, plan.ratios, cannot_gain])


def packed_size(dag: DAG) -> int:
    return _HEADER + dag.num_stages + 2 * dag.num_actions


def unpack_plan(values: np.ndarray, dag: DAG, config: PlanConfig) -> Plan:
    """Inverse of :func:`pack_plan` for the plan of ``dag`` solved with ``config``."""
    S = dag.num_stages
    head = values[:_HEADER].tolist()
    code = int(head[8])
    n = dag.num_actions
    ratios = values[_HEADER + S : _HEADER + S + n]
    cannot_gain = tuple(name for name, flag in zip(dag.names, values[_HEADER + S + n :]) if flag)
    return Plan(
        names=dag.names,
        ratios=np.array(ratios, dtype=np.float64),
        makespan_planned=head[0],
        makespan_unfrozen=head[1],
        makespan_all_frozen=head[2],
        stage_mean_ratio=tuple(values[_HEADER : _HEADER + S].tolist()),
        total_ratio=head[3],
        solve_seconds=head[4],
        status="optimal",
        max_freeze_ratio=config.max_freeze_ratio,
        weighting=config.weighting,
        solver=_SOLVERS[code] if 0 <= code < len(_SOLVERS) else "unknown",
        schedule=dag.schedule.name,
        phase_seconds=(head[5], head[6]),
        warm=bool(head[7]),
        cannot_gain=cannot_gain,
    )
