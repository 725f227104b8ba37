"""Thin helpers around highspy: pass an :class:`~tfz.plan.problem.LP`, run, check the status."""

from __future__ import annotations

import os
import sys

import numpy as np

from tfz.plan.problem import LP

__all__ = ["PlanSolveError", "make_highs", "run_checked", "run_phase2", "set_cost"]

_TOL = 1e-9

PHASE2_RETRY_SLACKS = tuple(10.0**-k for k in range(15, 8, -1))
"""Phase 2 bounds the makespan by phase 1's ``T*`` exactly; when HiGHS calls that infeasible or
stops with 'Unknown' (``T*`` is itself rounded, and its tolerances are absolute), it is retried under
``T* (1 + slack)`` with these slacks in turn, the smallest first (1e-15 up to 1e-9)."""


class PlanSolveError(RuntimeError):
    """The LP solver failed or reported a status other than optimal; ``status`` holds it."""

    def __init__(self, message: str, status: str):
        super().__init__(message)
        self.status = status


_banner_shown = False


def _new_highs():
    """``highspy.Highs()``; the first one of a process prints a banner on fd 1, which is muted so
    that ``tfz plan --json`` keeps stdout clean."""
    global _banner_shown
    import highspy

    if _banner_shown:
        return _quiet(highspy.Highs())
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        h = highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)
    _banner_shown = True
    return _quiet(h)


def _quiet(h):
    # one thread everywhere: HiGHS refuses to run when instances ask for different thread counts
    h.setOptionValue("output_flag", False)
    h.setOptionValue("threads", 1)
    return h


def make_highs(lp: LP, cost: np.ndarray):
    """A silent ``highspy.Highs`` (dual simplex) holding ``lp`` with objective ``cost``."""
    import highspy

    h = _new_highs()
    h.setOptionValue("solver", "simplex")
    h.setOptionValue("primal_feasibility_tolerance", _TOL)
    h.setOptionValue("dual_feasibility_tolerance", _TOL)
    model = highspy.HighsLp()
    model.num_col_, model.num_row_ = lp.A.shape[1], lp.A.shape[0]
    model.col_cost_ = np.asarray(cost, dtype=np.float64)
    model.col_lower_ = lp.col_lo
    model.col_upper_ = lp.col_hi
    model.row_lower_ = lp.row_lo
    model.row_upper_ = lp.row_hi
    model.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    model.a_matrix_.start_ = lp.A.indptr.astype(np.int32)
    model.a_matrix_.index_ = lp.A.indices.astype(np.int32)
    model.a_matrix_.value_ = lp.A.data
    h.passModel(model)
    return h


def set_cost(h, cost: np.ndarray) -> None:
    """Replace the whole objective of ``h``."""
    h.changeColsCost(len(cost), np.arange(len(cost), dtype=np.int32), np.asarray(cost, dtype=np.float64))


def run_checked(h, what: str) -> tuple[float, np.ndarray]:
    """Run ``h``; return (objective, column values) or raise :class:`PlanSolveError`."""
    import highspy

    h.run()
    status = h.getModelStatus()
    if status != highspy.HighsModelStatus.kOptimal:
        name = h.modelStatusToString(status)
        raise PlanSolveError(f"{what}: the LP solver stopped with status {name!r}", name)
    info = h.getInfo()
    return float(info.objective_function_value), np.asarray(h.getSolution().col_value, dtype=np.float64)


def run_phase2(h, t_col: int, budget: float) -> tuple[np.ndarray, float]:
    """Minimise the loaded phase-2 objective of ``h`` under ``T <= budget`` (column ``t_col``); return
    (column values, the bound used), looser by the first of :data:`PHASE2_RETRY_SLACKS` that is
    solved when the exact bound was not."""
    slacks = (0.0, *PHASE2_RETRY_SLACKS)
    for i, slack in enumerate(slacks):
        bound = budget * (1.0 + slack)
        h.changeColBounds(t_col, 0.0, bound)
        try:
            return run_checked(h, "phase 2 (total freezing)")[1], bound
        except PlanSolveError as e:
            if e.status not in ("Infeasible", "Unknown") or i == len(slacks) - 1:
                raise
