"""tfz.plan.network (network simplex of the uncapped LP) against HiGHS on the same LP."""

import dataclasses

import numpy as np
import pytest

pytest.importorskip("numba")

from tfz.dag import build_dag, simulate  # noqa: E402
from tfz.plan._highs import make_highs, run_checked  # noqa: E402
from tfz.plan.network import TensionNetwork  # noqa: E402
from tfz.plan.problem import PlanProblem, build_lp  # noqa: E402
from tfz.schedule import SCHEDULES, build_schedule  # noqa: E402


def _problem(name, seed):
    try:
        sched = build_schedule(name, 3, 6)
    except ValueError as exc:
        if "unknown schedule" in str(exc):
            pytest.skip(f"schedule {name} not available yet")
        raise
    dag = build_dag(sched)
    rng = np.random.default_rng(seed)
    n = dag.num_actions
    fr = dag.kind_mask("B", "W")
    up = rng.uniform(0.5, 3.0, n)
    low = np.where(fr, up * rng.uniform(0.1, 0.9, n), up)
    low = np.where(fr & (rng.random(n) < 0.1), up, low)
    caps = rng.uniform(0.2, 1.0, n) if seed % 2 else None
    return PlanProblem.create(dag, up, low, action_cap=caps), rng


def _highs_uncapped(problem, kappa, alpha, deadline):
    lp = build_lp(problem)
    keep = np.ones(lp.A.shape[0], dtype=bool)
    keep[lp.stage_rows] = False
    col_hi = lp.col_hi.copy()
    if deadline is not None:
        col_hi[lp.t_col] = deadline
    lp = dataclasses.replace(lp, A=lp.A[keep], row_lo=lp.row_lo[keep], row_hi=lp.row_hi[keep], col_hi=col_hi)
    cost = np.zeros(lp.A.shape[1])
    cost[lp.t_col] = alpha
    cost[lp.r_cols] = kappa
    return run_checked(make_highs(lp, cost), "uncapped")[0]


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("seed", range(3))
def test_network_matches_highs(name, seed):
    problem, rng = _problem(name, seed)
    net = TensionNetwork.build(problem)
    fidx = net.ratio_actions
    k = len(fidx)
    dag = problem.dag
    # phase-1 type: min T + kappa r
    kappa = rng.uniform(0, 0.3, k)
    r, T, _, tree = net.solve(kappa, 1.0, None, problem.unfrozen)
    ref = _highs_uncapped(problem, kappa, 1.0, None)
    assert T + kappa @ r[fidx] == pytest.approx(ref, rel=1e-9)
    assert simulate(dag, problem.durations(r)).makespan <= T * (1 + 1e-12)
    assert np.all(r >= 0) and np.all(r <= problem.cap + 1e-12)
    # the same from the previous tree (dual simplex) with other prices
    kappa2 = rng.uniform(0, 0.3, k)
    r2, T2, _, _ = net.solve(kappa2, 1.0, None, tree=tree)
    assert T2 + kappa2 @ r2[fidx] == pytest.approx(_highs_uncapped(problem, kappa2, 1.0, None), rel=1e-9)
    # phase-2 type: min sum (1 + kappa) r with T <= D, cold and from the phase-1 tree
    low = simulate(dag, problem.durations(problem.cap)).makespan
    D = low + 0.3 * (simulate(dag, problem.unfrozen).makespan - low)
    price = 1 + kappa
    want = _highs_uncapped(problem, price, 0.0, D)
    for kw in ({"durations": problem.unfrozen}, {"tree": tree}):
        r3, T3, _, _ = net.solve(price, 0.0, D, **kw)
        assert price @ r3[fidx] == pytest.approx(want, rel=1e-9, abs=1e-9)
        assert simulate(dag, problem.durations(r3)).makespan <= D * (1 + 1e-9)


def test_deadline_below_all_frozen_raises():
    problem, _ = _problem("1f1b", 0)
    net = TensionNetwork.build(problem)
    k = len(net.ratio_actions)
    low = simulate(problem.dag, problem.durations(problem.cap)).makespan
    with pytest.raises(RuntimeError, match="unbounded|infeasible"):
        net.solve(np.ones(k), 0.0, 0.9 * low, problem.unfrozen)
