"""The generic formulation solved by HiGHS: the test oracle and the benchmark baseline.

Every DAG edge is a row, every action has a row ``T >= t_v + d_v``, and both phases are cold
dual-simplex solves of separate models: phase 1 minimises T, phase 2 minimises ``sum r`` with
``T <= T*`` (retried up to ``T* (1 + 1e-9)`` should HiGHS call that infeasible,
:data:`~tfz.plan._highs.PHASE2_RETRY_SLACKS`). Nothing is shared with :mod:`tfz.plan.solver` but the
validated data, divided by the largest duration as there (HiGHS's tolerances are absolute).
"""

from __future__ import annotations

import time

import numpy as np

from tfz.dag import DAG
from tfz.plan._finish import finish_plan
from tfz.plan._highs import make_highs, run_checked, run_phase2
from tfz.plan.problem import PlanConfig, PlanProblem, build_lp
from tfz.plan.result import Plan

__all__ = ["solve_generic"]


def solve_generic(dag: DAG, unfrozen, frozen, config: PlanConfig | None = None, *, action_cap=None) -> Plan:
    """Lexicographic optimum (min makespan, then min total ratio) of the plain formulation; with
    ``config.makespan_slack``, the second phase allows the makespan (1 + slack) T*."""
    t0 = time.perf_counter()
    problem = PlanProblem.create(dag, unfrozen, frozen, config, action_cap)
    scaled, factor = problem.scaled()
    lp = build_lp(scaled, reduced=False)
    h1 = make_highs(lp, lp.phase1_cost())
    t_star, _ = run_checked(h1, "phase 1 (makespan)")
    t1 = time.perf_counter()
    budget = problem.config.makespan_budget(t_star)
    h2 = make_highs(lp, lp.phase2_cost())
    x, budget = run_phase2(h2, lp.t_col, budget)
    t2 = time.perf_counter()
    raw = np.zeros(dag.num_actions)
    raw[lp.ratio_actions] = x[lp.r_cols]
    return finish_plan(
        problem, raw, budget * factor, solver="generic", seconds=t2 - t0, phase_seconds=(t1 - t0, t2 - t1)
    )
