"""Structured solve of the freeze-ratio LP: a network simplex with one side column per stage cap.

The LP's dual is a min-cost flow (project crashing) plus one column per stage cap
(:mod:`tfz.plan.flow`). :func:`solve` runs a primal simplex on it that keeps the network structure
(the native extension ``tfz.plan._sidesimplex``, ``csrc/sidesimplex.cpp``): its basis is a forest
plus the basic cap columns, so most pivots cost a tree path and a moved subtree, and a pivot through
the cap columns one pass over the forest, instead of the LU updates of a generic solver whose every
pivot is dense for a tree basis. Both phases are one run: the supplies are ``b1 + eps b2`` with an
infinitesimal ``eps``, carried as separate components, so the result is the exact lexicographic
optimum (minimal makespan, then minimal total ratio), not an eps-weighted approximation. The solver
works on durations divided by the largest one (:meth:`~tfz.plan.problem.PlanProblem.scaled`), so the
answer does not depend on the time unit.

The simplex first solves the uncapped problem, cold from the longest-path tree under the
all-frozen durations, then the capped one from that optimum along a homotopy in the caps (all of
them descend together from the largest stage mean to ``max_freeze_ratio``,
:meth:`~tfz.plan.flow.FlowProblem.capped_start`); should that stop without an optimum, the plain
simplex redoes the capped stage from the uncapped optimum. Warm (``warm_start=plan``) after a small drift
(no duration moved by more than 0.2%, :data:`FINAL_START_DRIFT`), it restarts from the plan's final
optimal basis under the new durations (arcs and cap columns whose value turned negative are swapped
for their reverses), which takes few pivots. After a larger drift the optimum has moved too far for
that (2% changes 15% of the optimal basis): the uncapped stage restarts from the plan's uncapped
optimum and the capped stage runs as cold (bench/RESULTS.md).

Without the native extension (built without a C++ compiler), when some action saves under
:data:`FLOW_MIN_SAVED` of the largest duration, or when the flow solve stops without a verified
optimum or its plan does not simulate to the makespan it claims, the reduced LP goes to HiGHS
(:func:`_solve_highs`), which is exact too but slower.
"""

from __future__ import annotations

import hashlib
import time

import numpy as np

from tfz.dag import DAG
from tfz.plan import flow
from tfz.plan._finish import finish_plan
from tfz.plan._highs import PlanSolveError, make_highs, run_checked, run_phase2, set_cost
from tfz.plan.problem import LP, PlanConfig, PlanProblem, build_lp
from tfz.plan.result import Plan
from tfz.plan.warm import FlowWarmState, HighsWarmState

__all__ = ["solve"]

EPS = 1e-3
"""HiGHS fallback: the start objective is ``T + EPS * mean(delta) * sum r``."""

FINAL_START_DRIFT = 0.002
"""A warm solve restarts from the previous plan's final basis when no duration moved by more than
this share of its action's unfrozen duration, else from the plan's uncapped optimum. Measured at
16k / 65k actions (bench/RESULTS.md): after every duration moved by up to 0.01% / 0.1% the final
basis needs 300-2400 pivots, 4-21x faster than cold; after 0.5% it needs 2.2k / 11k pivots, slower
than the uncapped restart at 16k (0.59 vs 0.32 s) and barely faster than cold at 65k."""
FINAL_START_PIVOTS = 1.0
FINAL_START_MIN_PIVOTS = 64
"""... and gives up for the uncapped restart after this many times the pivots through the cap columns
(the costly ones) that the last full solve's capped stage took, or the minimum: by then the restart
costs about what the capped stage from the uncapped optimum does."""

FLOW_MIN_SAVED = 1e-6
"""The side-column simplex runs only when every freezable action saves at least this share of the
largest duration when frozen. Below, its cap-column coefficients and phase-2 supplies (inverse saved
times) span too many orders of magnitude for its tolerances: on random schedules with short actions
(saved times 1e-3 to 1e-14 of the largest) its plans were up to 3e-5 above the minimal makespan
whenever the smallest saved time was under 3e-7, never at 1e-6 or more. HiGHS solves those."""


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
    Raises ValueError on bad input (durations included that float64 cannot hold next to the largest
    one) and :class:`~tfz.plan.PlanSolveError` if the LP solver fails.
    """
    t0 = time.perf_counter()
    problem = PlanProblem.create(dag, unfrozen, frozen, config, action_cap)
    scaled, factor = problem.scaled()
    if warm_start is not None and not isinstance(warm_start, Plan):
        raise TypeError(f"warm_start must be a tfz.plan.Plan or None, got {type(warm_start).__name__}")
    state = None if warm_start is None else warm_start._warm_state
    if flow.NATIVE and problem.config.makespan_slack == 0.0 and _flow_conditioned(scaled):
        try:
            plan = _solve_flow(problem, scaled, factor, state, t0)
        except PlanSolveError as e:
            if e.status != "inconsistent":
                raise
            plan = None  # its ratios do not give the makespan it claims: HiGHS below
        if plan is not None:
            return plan
    return _solve_highs(problem, scaled, factor, state, t0)


def _flow_conditioned(scaled: PlanProblem) -> bool:
    """Whether every freezable action of ``scaled`` saves at least :data:`FLOW_MIN_SAVED`."""
    return float(np.min(scaled.delta[scaled.freezable], initial=1.0)) >= FLOW_MIN_SAVED


def _solve_flow(problem: PlanProblem, scaled: PlanProblem, factor: float, state, t0: float) -> Plan | None:
    """The side-column simplex; None when it stops without a verified optimum."""
    fp = flow.FlowProblem.build(scaled)
    sig = _flow_signature(fp)
    warm = isinstance(state, FlowWarmState) and state.signature == sig
    if warm and _drift(state, problem) <= FINAL_START_DRIFT:
        t1 = time.perf_counter()
        basis = state.final.copy()
        budget = max(int(FINAL_START_PIVOTS * state.capped_pivots), FINAL_START_MIN_PIVOTS)
        try:
            pi, _ = fp.optimize(basis, max_side_pivots=budget)
        except flow.FlowSolveError:
            pass  # the optimum moved too far: restart from the uncapped optimum below
        else:
            new = FlowWarmState(
                sig, state.uncapped, basis, state.capped_pivots, *_durations(problem), "final"
            )
            return _finish_flow(problem, fp, factor, pi, t0, t1, new)
    try:
        if warm:
            basis = state.uncapped.copy()
            try:
                pi, _ = fp.optimize(basis, price_sides=False)
            except flow.FlowSolveError:
                warm = False
        if not warm:
            basis = fp.cold_basis()
            pi, _ = fp.optimize(basis, price_sides=False)
        uncapped = basis.copy()
        t1 = time.perf_counter()
        pi, stats = _capped(fp, basis, pi)
    except flow.FlowSolveError:
        return None
    start = "uncapped" if warm else "cold"
    new = FlowWarmState(sig, uncapped, basis, stats.side_pivots, *_durations(problem), start)
    return _finish_flow(problem, fp, factor, pi, t0, t1, new)


def _capped(fp, basis, pi):
    """The capped stage from the uncapped optimum ``basis`` (potentials ``pi``), updated in place: the
    homotopy in the caps, or the plain simplex when that stops without an optimum (a badly
    conditioned cap-column matrix on its way)."""
    start = fp.capped_start(pi)
    if start is None:
        return fp.optimize(basis)
    uncapped = basis.copy()
    try:
        return fp.optimize(basis, start=start)
    except flow.FlowSolveError:
        basis.parent, basis.pred = uncapped.parent, uncapped.pred
        basis.side_basic, basis.side_flip = uncapped.side_basic, uncapped.side_flip
        return fp.optimize(basis)


def _flow_signature(fp) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for arr in (fp.tail, fp.head, fp.side_stage, fp.net.ratio_actions):
        h.update(np.ascontiguousarray(arr, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.digest()


def _durations(problem: PlanProblem) -> tuple[np.ndarray, np.ndarray]:
    return problem.unfrozen.copy(), problem.frozen.copy()


def _drift(state: FlowWarmState, problem: PlanProblem) -> float:
    """Largest duration change since ``state``'s solve, relative to the action's unfrozen duration."""
    if state.unfrozen.shape != problem.unfrozen.shape:
        return np.inf
    scale = np.maximum(state.unfrozen, problem.unfrozen)
    change = np.maximum(np.abs(problem.unfrozen - state.unfrozen), np.abs(problem.frozen - state.frozen))
    rel = np.divide(change, scale, out=np.zeros_like(change), where=scale > 0)
    return float(np.max(rel, initial=0.0))


def _finish_flow(problem, fp, factor: float, pi, t0: float, t1: float, state: FlowWarmState) -> Plan:
    t2 = time.perf_counter()
    ratios, makespan = fp.ratios(pi)
    return finish_plan(
        problem,
        ratios,
        makespan * factor,
        solver="structured",
        seconds=t2 - t0,
        phase_seconds=(t1 - t0, t2 - t1),
        warm=state.start != "cold",
        warm_state=state,
    )


def _highs_signature(lp: LP) -> tuple:
    return (lp.A.shape, lp.A.nnz, len(lp.ratio_actions), tuple(lp.stage_rows.tolist()))


def _solve_highs(problem: PlanProblem, scaled: PlanProblem, factor: float, state, t0: float) -> Plan:
    """The reduced LP in HiGHS: minimise ``T + eps sum r`` (from the previous plan's basis when warm),
    then re-optimise ``T`` (exact ``T*``) and, with ``T <= (1 + makespan_slack) T*``, ``sum r`` from
    the same basis (retried under a bound up to 1e-9 looser should HiGHS call it infeasible)."""
    lp = build_lp(scaled, reduced=True)
    sig = _highs_signature(lp)
    k = len(lp.ratio_actions)
    warm = isinstance(state, HighsWarmState) and state.signature == sig
    eps = state.eps if warm else (EPS * float(np.mean(scaled.delta[lp.ratio_actions])) if k else 0.0)
    start_cost = lp.phase1_cost()
    start_cost[lp.r_cols] = eps
    h = make_highs(lp, start_cost)
    if warm:
        h.setBasis(state.basis)
    run_checked(h, "start (makespan + eps * total freezing)")
    basis = h.getBasis()
    set_cost(h, lp.phase1_cost())
    t_star, _ = run_checked(h, "phase 1 (makespan)")
    t1 = time.perf_counter()
    budget = problem.config.makespan_budget(t_star)
    set_cost(h, lp.phase2_cost())
    x, budget = run_phase2(h, lp.t_col, budget)
    t2 = time.perf_counter()
    raw = np.zeros(problem.num_actions)
    raw[lp.ratio_actions] = x[lp.r_cols]
    return finish_plan(
        problem,
        raw,
        budget * factor,
        solver="structured",
        seconds=t2 - t0,
        phase_seconds=(t1 - t0, t2 - t1),
        warm=warm,
        warm_state=HighsWarmState(sig, eps, basis),
    )
