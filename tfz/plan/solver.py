"""Structured solve of the freeze-ratio LP: a network simplex with one side column per stage cap.

The LP's dual is a min-cost flow (project crashing) plus one column per stage cap
(:mod:`tfz.plan.flow`). :func:`solve` runs a primal simplex on it that keeps the network structure
(:mod:`tfz.plan._sidesimplex`, compiled with numba): its basis is a forest plus the basic cap
columns, so most pivots cost a tree path and a moved subtree, and a pivot through the cap columns
one pass over the forest, instead of the LU updates of a generic solver whose every pivot is dense
for a tree basis. Both phases are one run: the supplies are ``b1 + eps b2`` with an infinitesimal
``eps``, carried as separate components, so the result is the exact lexicographic optimum (minimal
makespan, then minimal total ratio), not an eps-weighted approximation.

The simplex first solves the uncapped problem, cold from the longest-path tree under the
all-frozen durations, then lets the cap columns enter. Warm (``warm_start=plan``), the uncapped
stage restarts from the plan's uncapped optimum under the new durations (arcs whose flow turned
negative are swapped for their reverses) and takes a tenth of the cold time; the capped stage runs
as cold. Restarting the capped stage from the plan's final basis was measured slower than cold:
after durations drift by 2%, 15% of the optimal basis changes, and the swapped arcs distort the
potentials (bench/RESULTS.md).

The earlier path (reduced LP in HiGHS from the uncapped network optimum) remains the fallback when
numba is missing or the flow solve stops without a verified optimum; bench/RESULTS.md has the
measurements of both.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import numpy as np

from tfz.dag import DAG
from tfz.plan._finish import finish_plan
from tfz.plan._highs import make_highs, run_checked, set_cost
from tfz.plan.problem import LP, PlanConfig, PlanProblem, build_lp
from tfz.plan.result import Plan

try:
    from tfz.plan.flow import FlowBasis, FlowProblem, FlowSolveError
    from tfz.plan.network import network_basis
except ImportError:  # numba missing: HiGHS from its slack basis
    FlowProblem = None

    def network_basis(problem, lp, kappa, alpha=1.0, deadline=None):
        return None


__all__ = ["solve"]

EPS = 1e-3


@dataclass(frozen=True, eq=False)
class _FlowState:
    """What a plan keeps for a warm re-plan: the flow problem's structure and its uncapped optimum."""

    signature: bytes
    basis: FlowBasis


def _flow_signature(fp) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for arr in (fp.tail, fp.head, fp.side_stage, fp.net.ratio_actions):
        h.update(np.ascontiguousarray(arr, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.digest()


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
    ``warm_start``: a plan of the same DAG (same freezable actions and cappable stages) to start
    from; otherwise, or when it does not fit, the solve starts cold.
    Raises ValueError on bad input and :class:`~tfz.plan.PlanSolveError` if the LP solver fails.
    """
    t0 = time.perf_counter()
    problem = PlanProblem.create(dag, unfrozen, frozen, config, action_cap)
    if FlowProblem is not None:
        plan = _solve_flow(problem, warm_start, t0)
        if plan is not None:
            return plan
    return _solve_highs(problem, warm_start, t0)


def _solve_flow(problem: PlanProblem, warm_start: Plan | None, t0: float) -> Plan | None:
    """The side-column simplex; None when it stops without a verified optimum."""
    fp = FlowProblem.build(problem)
    sig = _flow_signature(fp)
    state = getattr(warm_start, "_warm_state", None)
    warm = isinstance(state, _FlowState) and state.signature == sig
    try:
        if warm:
            basis = state.basis.copy()
            try:
                fp.optimize(basis, price_sides=False)
            except FlowSolveError:
                warm = False
        if not warm:
            basis = fp.cold_basis()
            fp.optimize(basis, price_sides=False)
        uncapped = basis.copy()
        t1 = time.perf_counter()
        pi, _ = fp.optimize(basis)
    except (FlowSolveError, np.linalg.LinAlgError):
        return None
    t2 = time.perf_counter()
    ratios, makespan = fp.ratios(pi)
    return finish_plan(
        problem,
        ratios,
        makespan,
        solver="structured",
        seconds=t2 - t0,
        phase_seconds=(t1 - t0, t2 - t1),
        warm=warm,
        warm_state=_FlowState(sig, uncapped),
    )


def _signature(lp: LP) -> tuple:
    return (lp.A.shape, lp.A.nnz, len(lp.ratio_actions), tuple(lp.stage_rows.tolist()))


def _solve_highs(problem: PlanProblem, warm_start: Plan | None, t0: float) -> Plan:
    """The reduced LP in HiGHS: minimise ``T + eps sum r`` from the uncapped network optimum's basis,
    then re-optimise ``T`` (exact ``T*``) and, with ``T <= T*``, ``sum r`` from the same basis."""
    lp = build_lp(problem, reduced=True)
    sig = _signature(lp)
    k = len(lp.ratio_actions)
    state = getattr(warm_start, "_warm_state", None)
    warm = isinstance(state, tuple) and state[0] == sig
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
    raw = np.zeros(problem.num_actions)
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
