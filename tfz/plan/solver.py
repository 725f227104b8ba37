"""Structured solve of the freeze-ratio LP: reduced formulation, one simplex run for both phases.

The LP is the reduced formulation of :func:`tfz.plan.problem.build_lp` (program-order chains,
undominated cross-rank edges, one makespan row per rank, no cap row where the cap cannot bind):
about 2 rows per action instead of 3 to 4, which alone makes dual simplex (HiGHS) 2-5x faster.

The two phases share one model and one basis:

1. *start*: minimise ``T + eps * sum r`` (``eps`` = 1e-5 of the mean saving of an action). For a
   small enough ``eps`` its optimal basis is optimal for both phases; the next two steps make the
   result exact whatever ``eps`` did.
2. *phase 1*: objective ``T`` from that basis (usually 0 iterations): ``T*``, exact.
3. *phase 2*: bound ``T <= T*``, objective ``sum r`` (usually a few iterations): exact.

Compared with running phase 2 from phase 1's basis this halves the cold time, since phase 1's
optimum is very degenerate and phase 2 would otherwise walk far along its optimal face.
A plan keeps the basis of step 2, so a re-plan after the durations moved (``warm_start=plan``)
starts from it (measured: about 30x fewer iterations than cold after a 2% change).
"""

from __future__ import annotations

import time

import numpy as np

from tfz.dag import DAG
from tfz.plan._finish import finish_plan
from tfz.plan._highs import make_highs, run_checked, set_cost
from tfz.plan.problem import LP, PlanConfig, PlanProblem, build_lp
from tfz.plan.result import Plan

__all__ = ["solve"]

EPS = 1e-5


def _signature(lp: LP) -> tuple:
    return (lp.A.shape, lp.A.nnz, len(lp.ratio_actions), tuple(lp.stage_rows.tolist()))


def solve(
    dag: DAG,
    unfrozen,
    frozen,
    config: PlanConfig | None = None,
    *,
    action_cap=None,
    warm_start: Plan | None = None,
) -> Plan:
    """Lexicographic optimum: minimal makespan, then minimal total ratio at that makespan.

    ``unfrozen``/``frozen``: float arrays [n] aligned with ``dag.actions`` (any time unit).
    ``action_cap``: optional scalar or array [n] in [0, 1] overriding ``config.action_cap``.
    ``warm_start``: a plan of the same DAG (same freezable actions and binding caps) to start from;
    otherwise, or when it does not fit, the solve starts cold.
    Raises ValueError on bad input and :class:`~tfz.plan.PlanSolveError` if the LP solver fails.
    """
    t0 = time.perf_counter()
    problem = PlanProblem.create(dag, unfrozen, frozen, config, action_cap)
    lp = build_lp(problem, reduced=True)
    sig = _signature(lp)
    start_cost = lp.phase1_cost()
    if len(lp.ratio_actions):
        start_cost[lp.r_cols] = EPS * float(np.mean(problem.delta[lp.ratio_actions]))
    h = make_highs(lp, start_cost)
    warm = False
    state = getattr(warm_start, "_warm_state", None)
    if state is not None and state[0] == sig:
        h.setBasis(state[1])
        warm = True
    run_checked(h, "start (makespan + eps * total freezing)")
    set_cost(h, lp.phase1_cost())
    t_star, _ = run_checked(h, "phase 1 (makespan)")
    basis = h.getBasis()  # phase 2's basis would carry T at its phase-2 bound: a poor start
    t1 = time.perf_counter()
    h.changeColBounds(lp.t_col, 0.0, t_star)
    set_cost(h, lp.phase2_cost())
    _, x = run_checked(h, "phase 2 (total freezing)")
    t2 = time.perf_counter()
    raw = np.zeros(dag.num_actions)
    raw[lp.ratio_actions] = x[lp.r_cols]
    return finish_plan(
        problem,
        raw,
        t_star,
        solver="structured",
        seconds=t2 - t0,
        phase_seconds=(t1 - t0, t2 - t1),
        warm=warm,
        warm_state=(sig, basis),
    )
