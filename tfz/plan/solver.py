"""Structured solve of the freeze-ratio LP: reduced LP, network-simplex start basis, one simplex run.

Measured on this 2-core machine (bench/RESULTS.md): the generic formulation takes ~25 s at 16k
actions and several minutes at 65k because dual simplex needs ~3 pivots per action from the slack
basis and each pivot costs O(actions) (a tree basis has dense inverse columns). Three things cut it:

1. *Reduced LP* (:func:`tfz.plan.problem.build_lp`): program-order chains, undominated cross-rank
   edges, one makespan row per rank, no cap row where the cap cannot bind (2-5x).
2. *Start basis from the network problem* (:mod:`tfz.plan.network`): without the stage caps the LP
   is project crashing, whose dual is a min-cost flow; its network simplex (compiled with numba)
   solves 16k actions in ~0.2 s and its optimal tree is a basis of the LP that is optimal but for
   the few binding caps, so HiGHS repairs it in ~1k pivots instead of ~45k (5-7x).
3. *Both phases in one run*: minimise ``T + eps * sum r`` (``eps`` = 1e-3 of the mean saving of an
   action), then re-optimise with objective ``T`` (usually 0 pivots: exact ``T*``), then bound
   ``T <= T*`` and minimise ``sum r`` (exact phase 2, from the same basis). Whatever ``eps`` does,
   the last two steps make the result the exact lexicographic optimum; ``eps`` only sets how much
   work is left to them.

Without numba the start is HiGHS's slack basis (same result, slower). ``warm_start=plan`` restarts
step 3 from the plan's basis instead of building a network start.
"""

from __future__ import annotations

import time

import numpy as np

from tfz.dag import DAG
from tfz.plan._finish import finish_plan
from tfz.plan._highs import make_highs, run_checked, set_cost
from tfz.plan.problem import LP, PlanConfig, PlanProblem, build_lp

try:
    from tfz.plan.network import network_basis
except ImportError:  # numba missing: start from HiGHS's slack basis

    def network_basis(problem, lp, kappa, alpha=1.0, deadline=None):
        return None


from tfz.plan.result import Plan

__all__ = ["solve"]

EPS = 1e-3


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
    k = len(lp.ratio_actions)
    state = getattr(warm_start, "_warm_state", None)
    warm = state is not None and state[0] == sig
    if warm:
        eps = state[1]
    else:
        eps = EPS * float(np.mean(problem.delta[lp.ratio_actions])) if k else 0.0
    start_cost = lp.phase1_cost()
    start_cost[lp.r_cols] = eps
    h = make_highs(lp, start_cost)
    start = state[2] if warm else (network_basis(problem, lp, np.full(k, eps)) if k else None)
    if start is not None:
        h.setBasis(start)
    run_checked(h, "start (makespan + eps * total freezing)")
    basis = h.getBasis()
    set_cost(h, lp.phase1_cost())
    t_star, _ = run_checked(h, "phase 1 (makespan)")
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
        warm_state=(sig, eps, basis),
    )
