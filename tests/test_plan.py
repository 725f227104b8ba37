"""tfz.plan against independent references: path enumeration, the generic LP, closed forms."""

import json
import re

import numpy as np
import pytest
from _plan_cases import random_times, schedule
from scipy.optimize import linprog

from tfz.dag import build_dag, simulate
from tfz.plan import Plan, PlanConfig, PlanSolveError, solve, solve_generic
from tfz.plan._highs import make_highs, run_checked
from tfz.plan.problem import LP, PlanProblem, build_lp, reduced_edges
from tfz.schedule import SCHEDULES, build_schedule

REL = 1e-6


def _paths(dag):
    """Every source -> sink path (lists of node ids), by depth-first search over all edges."""
    ptr, idx = dag.succs
    indeg = np.bincount(dag.dst, minlength=dag.num_actions)
    out = []

    def walk(v, path):
        path.append(v)
        nxt = idx[ptr[v] : ptr[v + 1]]
        if len(nxt) == 0:
            out.append(list(path))
        for w in nxt.tolist():
            walk(w, path)
        path.pop()

    for s in np.flatnonzero(indeg == 0).tolist():
        walk(s, [])
    return out


def _path_lp(dag, up, low, cap, weighting="count", action_cap=None, slack=0.0):
    """Both phases on the path formulation (no start times): T >= sum over each path; the second
    phase allows T <= (1 + slack) T*."""
    n = dag.num_actions
    delta = up - low
    fr = dag.kind_mask("B", "W") & (delta > 0)
    f = np.flatnonzero(fr)
    k = len(f)
    col = {v: j for j, v in enumerate(f.tolist())}
    rows, rhs = [], []
    for p in _paths(dag):
        row = np.zeros(k + 1)
        row[k] = -1.0
        const = 0.0
        for v in p:
            const += up[v]
            if v in col:
                row[col[v]] -= delta[v]
        rows.append(row)
        rhs.append(-const)
    # the stage mean runs over every B/W action of the stage, those that cannot gain at ratio 0
    bw = dag.kind_mask("B", "W")
    a = np.where(bw, up if weighting == "duration" else 1.0, 0.0)
    for s in range(dag.num_stages):
        sel = dag.stage[f] == s
        if sel.any():
            row = np.zeros(k + 1)
            row[:k][sel] = a[f][sel]
            rows.append(row)
            rhs.append(cap * a[dag.stage == s].sum())
    ub = np.ones(k) if action_cap is None else np.broadcast_to(action_cap, (n,))[f]
    bounds = [(0.0, float(b)) for b in ub] + [(0.0, None)]
    A, b = np.array(rows), np.array(rhs)
    c1 = np.zeros(k + 1)
    c1[k] = 1.0
    r1 = linprog(c1, A_ub=A, b_ub=b, bounds=bounds, method="highs")
    assert r1.status == 0
    t_star = r1.fun
    c2 = np.r_[np.ones(k), 0.0]
    bounds[-1] = (0.0, t_star * (1 + slack) * (1 + 1e-12))
    r2 = linprog(c2, A_ub=A, b_ub=b, bounds=bounds, method="highs")
    assert r2.status == 0
    return t_star, r2.fun


def _stage_means(dag, ratios, up, low, weighting):
    w = np.where(dag.kind_mask("B", "W"), up if weighting == "duration" else 1.0, 0.0)
    tot = np.bincount(dag.stage, weights=w, minlength=dag.num_stages)
    num = np.bincount(dag.stage, weights=w * ratios, minlength=dag.num_stages)
    return np.divide(num, tot, out=np.zeros_like(tot), where=tot > 0)


def _check_plan(plan, dag, up, low, cap, weighting="count", action_cap=None):
    r = plan.ratios
    assert r.shape == (dag.num_actions,)
    assert np.all(r >= 0) and np.all(r <= 1)
    fixed = ~dag.kind_mask("B", "W") | (up == low)
    assert np.all(r[fixed] == 0)
    if action_cap is not None:
        assert np.all(r <= np.broadcast_to(action_cap, r.shape) + 1e-12)
    means = _stage_means(dag, r, up, low, weighting)
    assert np.all(means <= cap + 1e-9), means
    np.testing.assert_allclose(plan.stage_mean_ratio, means, rtol=0, atol=1e-12)
    sim = simulate(dag, up - r * (up - low))
    assert plan.makespan_planned == pytest.approx(sim.makespan, rel=1e-12)
    assert plan.makespan_unfrozen == pytest.approx(simulate(dag, up).makespan, rel=1e-12)
    assert plan.makespan_all_frozen == pytest.approx(simulate(dag, low).makespan, rel=1e-12)
    assert plan.total_ratio == pytest.approx(r.sum(), rel=1e-12)
    assert plan.status == "optimal"


TINY = {"gpipe": (2, 3, None), "1f1b": (2, 3, None), "zbh1": (2, 3, None)}


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("seed", range(4))
def test_tiny_matches_path_enumeration(name, seed):
    P, M, V = TINY.get(name, (2, 2, None))
    dag = build_dag(schedule(name, P, M, V))
    rng = np.random.default_rng(seed)
    up, low = random_times(dag, rng)
    cap = [0.8, 0.5, 0.3, 0.95][seed]
    weighting = "duration" if seed % 2 else "count"
    t_ref, s_ref = _path_lp(dag, up, low, cap, weighting)
    config = PlanConfig(max_freeze_ratio=cap, weighting=weighting)
    for plan in (solve(dag, up, low, config), solve_generic(dag, up, low, config)):
        _check_plan(plan, dag, up, low, cap, weighting)
        assert plan.makespan_planned == pytest.approx(t_ref, rel=REL)
        assert plan.total_ratio == pytest.approx(s_ref, rel=REL, abs=1e-9)


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "zbh1", "interleaved1f1b"])
@pytest.mark.parametrize("slack", [0.01, 0.05, 0.3])
def test_makespan_slack_matches_path_enumeration(name, slack):
    """The second phase with a makespan budget (1 + slack) T*: both solvers against the path LP; the
    plan uses the budget (or freezes nothing when the unfrozen batch fits it) and freezes no more
    than the lexicographic optimum."""
    P, M, V = TINY.get(name, (2, 2, None))
    dag = build_dag(schedule(name, P, M, V))
    rng = np.random.default_rng(int(slack * 1000) + len(name))
    up, low = random_times(dag, rng)
    t_ref, s_ref = _path_lp(dag, up, low, 0.8, slack=slack)
    exact = solve(dag, up, low, PlanConfig())
    config = PlanConfig(makespan_slack=slack)
    for plan in (solve(dag, up, low, config), solve_generic(dag, up, low, config)):
        _check_plan(plan, dag, up, low, 0.8, "count")
        assert plan.makespan_slack == slack
        assert plan.total_ratio == pytest.approx(s_ref, rel=REL, abs=1e-9)
        budget = min((1 + slack) * t_ref, plan.makespan_unfrozen)
        assert plan.makespan_planned == pytest.approx(budget, rel=REL)
        assert plan.total_ratio <= exact.total_ratio + 1e-9
        assert Plan.from_json(plan.to_json()).makespan_slack == slack
    with pytest.raises(ValueError, match=r"makespan_slack must be .*got 1.5"):
        PlanConfig(makespan_slack=1.5)


def _sizes(name):
    if name in ("gpipe", "1f1b", "zbh1"):
        return [(2, 5, None), (3, 4, None), (4, 8, None), (3, 11, None)]
    return [(2, 4, None), (3, 6, None), (4, 8, None), (2, 6, 3)]


@pytest.mark.parametrize("name", SCHEDULES)
def test_random_matches_generic(name):
    rng = np.random.default_rng(sum(map(ord, name)))
    for P, M, V in _sizes(name):
        try:
            dag = build_dag(schedule(name, P, M, V))
        except ValueError:  # e.g. a stage count the schedule does not allow
            dag = build_dag(schedule(name, P, M))
        for trial in range(3):
            up, low = random_times(dag, rng, equal_share=0.2 * trial)
            cap = float(rng.choice([0.0, 0.25, 0.6, 0.8, 1.0]))
            weighting = ["count", "duration"][trial % 2]
            action_cap = None if trial < 2 else rng.uniform(0.3, 1.0, dag.num_actions)
            config = PlanConfig(max_freeze_ratio=cap, weighting=weighting)
            fast = solve(dag, up, low, config, action_cap=action_cap)
            ref = solve_generic(dag, up, low, config, action_cap=action_cap)
            _check_plan(fast, dag, up, low, cap, weighting, action_cap)
            _check_plan(ref, dag, up, low, cap, weighting, action_cap)
            assert fast.makespan_planned == pytest.approx(ref.makespan_planned, rel=REL)
            assert fast.total_ratio == pytest.approx(ref.total_ratio, rel=REL, abs=1e-9)


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("P,M", [(2, 4), (4, 8), (5, 7)])
def test_uniform_closed_forms(name, P, M):
    """Uniform times: unfrozen (M+P-1)(f+b), all frozen (M+P-1)(f+b_frozen)."""
    dag = build_dag(build_schedule(name, P, M))
    f, b, bf = 1.0, 2.0, 1.25
    up = np.where(dag.kind_mask("B"), b, f)
    low = np.where(dag.kind_mask("B"), bf, f)
    zero = solve(dag, up, low, PlanConfig(max_freeze_ratio=0.0))
    assert np.all(zero.ratios == 0)
    assert zero.makespan_planned == pytest.approx((M + P - 1) * (f + b), rel=1e-12)
    assert zero.makespan_unfrozen == pytest.approx((M + P - 1) * (f + b), rel=1e-12)
    one = solve(dag, up, low, PlanConfig(max_freeze_ratio=1.0))
    assert one.makespan_planned == pytest.approx((M + P - 1) * (f + bf), rel=1e-9)
    assert one.makespan_all_frozen == pytest.approx((M + P - 1) * (f + bf), rel=1e-12)
    # count and duration weighting agree when all B of a stage take the same time
    a = solve(dag, up, low, PlanConfig(0.6, weighting="count"))
    d = solve(dag, up, low, PlanConfig(0.6, weighting="duration"))
    assert a.makespan_planned == pytest.approx(d.makespan_planned, rel=1e-9)
    assert a.total_ratio == pytest.approx(d.total_ratio, rel=1e-9)


@pytest.mark.parametrize("name", SCHEDULES)
def test_cap_zero_and_one(name):
    dag = build_dag(schedule(name, 3, 6))
    up, low = random_times(dag, np.random.default_rng(3))
    zero = solve(dag, up, low, PlanConfig(max_freeze_ratio=0.0))
    assert np.all(zero.ratios == 0)
    assert zero.makespan_planned == zero.makespan_unfrozen == pytest.approx(simulate(dag, up).makespan)
    one = solve(dag, up, low, PlanConfig(max_freeze_ratio=1.0))
    assert one.makespan_planned == pytest.approx(simulate(dag, low).makespan, rel=1e-9)
    # and freezing no more than needed: only actions that shorten the makespan freeze
    assert one.total_ratio <= dag.kind_mask("B", "W").sum()


def test_action_cap_scalar_and_config():
    dag = build_dag(build_schedule("1f1b", 3, 6))
    up, low = random_times(dag, np.random.default_rng(0), equal_share=0)
    p = solve(dag, up, low, PlanConfig(max_freeze_ratio=1.0, action_cap=0.5))
    assert p.ratios.max() <= 0.5 + 1e-12
    q = solve(dag, up, low, PlanConfig(max_freeze_ratio=1.0), action_cap=0.5)
    assert q.makespan_planned == pytest.approx(p.makespan_planned, rel=1e-12)
    half = 0.5 * (up + low) * dag.kind_mask("B") + up * ~dag.kind_mask("B")
    assert p.makespan_planned == pytest.approx(simulate(dag, half).makespan, rel=1e-9)


def test_reduced_edges_imply_all_edges():
    """Longest paths with only the reduced edges equal those with all edges (random durations)."""
    rng = np.random.default_rng(0)
    for name in SCHEDULES:
        dag = build_dag(schedule(name, 4, 8))
        src, dst = reduced_edges(dag)
        assert len(src) < dag.num_edges
        for _ in range(3):
            d = rng.uniform(0, 2, dag.num_actions)
            end = np.zeros(dag.num_actions)
            order = dag.topo
            preds = [[] for _ in range(dag.num_actions)]
            for u, v in zip(src.tolist(), dst.tolist()):
                preds[v].append(u)
            for v in order.tolist():
                end[v] = max((end[u] for u in preds[v]), default=0.0) + d[v]
            np.testing.assert_allclose(end, simulate(dag, d).end, rtol=1e-12)


def test_reduced_and_plain_lp_same_optimum():
    dag = build_dag(build_schedule("1f1b", 4, 8))
    up, low = random_times(dag, np.random.default_rng(1))
    problem = PlanProblem.create(dag, up, low)
    values = []
    for reduced in (True, False):
        lp = build_lp(problem, reduced=reduced)
        values.append(run_checked(make_highs(lp, lp.phase1_cost()), "p1")[0])
    assert values[0] == pytest.approx(values[1], rel=1e-9)


def test_warm_start_equals_cold():
    dag = build_dag(build_schedule("1f1b", 4, 16))
    rng = np.random.default_rng(5)
    up, low = random_times(dag, rng, equal_share=0)
    first = solve(dag, up, low)
    assert not first.warm
    up2 = up * rng.uniform(0.98, 1.02, len(up))
    low2 = np.minimum(np.where(up > low, low * rng.uniform(0.98, 1.02, len(up)), up2), up2)
    warm = solve(dag, up2, low2, warm_start=first)
    cold = solve(dag, up2, low2)
    assert warm.warm and not cold.warm
    assert warm.makespan_planned == pytest.approx(cold.makespan_planned, rel=1e-9)
    assert warm.total_ratio == pytest.approx(cold.total_ratio, rel=1e-9)
    # a plan of another DAG is ignored
    other = solve(
        build_dag(build_schedule("1f1b", 3, 5)), *random_times(build_dag(build_schedule("1f1b", 3, 5)), rng)
    )
    again = solve(dag, up2, low2, warm_start=other)
    assert not again.warm
    assert again.makespan_planned == pytest.approx(cold.makespan_planned, rel=1e-9)


def test_json_round_trip():
    dag = build_dag(build_schedule("1f1b", 3, 5))
    up, low = random_times(dag, np.random.default_rng(2))
    plan = solve(dag, up, low)
    d = json.loads(plan.to_json())
    for key in (
        "makespan_unfrozen",
        "makespan_all_frozen",
        "makespan_planned",
        "ratios",
        "stage_mean_ratio",
        "solve_seconds",
    ):
        assert key in d
    assert set(d["ratios"]) == set(dag.names)
    assert len(d["stage_mean_ratio"]) == dag.num_stages
    back = Plan.from_json(plan.to_json())
    assert back.names == plan.names
    np.testing.assert_array_equal(back.ratios, plan.ratios)
    for key in (
        "makespan_planned",
        "makespan_unfrozen",
        "makespan_all_frozen",
        "total_ratio",
        "solve_seconds",
    ):
        assert getattr(back, key) == getattr(plan, key)
    assert back.stage_mean_ratio == plan.stage_mean_ratio
    assert back.ratio_by_action == plan.ratio_by_action
    np.testing.assert_allclose(back.durations(up, low), up - plan.ratios * (up - low))
    with pytest.raises(ValueError, match="ratios.0B0"):
        bad = dict(d, ratios=dict(d["ratios"], **{"0B0": 1.5}))
        Plan.from_dict(bad)
    with pytest.raises(ValueError, match="format"):
        Plan.from_dict(dict(d, format="x"))
    numpy = dict(d, total_ratio=np.float32(0.5), ratios=dict(d["ratios"], **{"0B0": np.float32(0.25)}))
    back = Plan.from_dict(numpy)
    assert back.total_ratio == 0.5 and type(back.total_ratio) is float and back.ratio_by_action["0B0"] == 0.25
    bads = (("total_ratio", True), ("solve_seconds", np.float64("inf")), ("max_freeze_ratio", "0.8"))
    for key, bad in bads:
        message = f"plan.{key} must be a finite number( in \\[0, 1\\])?, got {re.escape(repr(bad))}"
        with pytest.raises(ValueError, match=message):
            Plan.from_dict(dict(d, **{key: bad}))
    with pytest.raises(ValueError, match="invalid JSON"):
        Plan.from_json("{")


def test_errors():
    dag = build_dag(build_schedule("1f1b", 2, 3))
    up, low = random_times(dag, np.random.default_rng(0), equal_share=0)
    for cap in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="max_freeze_ratio"):
            solve(dag, up, low, PlanConfig(max_freeze_ratio=cap))
    with pytest.raises(ValueError, match="action_cap"):
        PlanConfig(action_cap=2.0)
    with pytest.raises(ValueError, match="weighting"):
        PlanConfig(weighting="tokens")
    b = int(np.flatnonzero(dag.kind_mask("B"))[0])
    bad = low.copy()
    bad[b] = up[b] + 1
    with pytest.raises(ValueError, match=f"{dag.actions[b]}.*exceeds"):
        solve(dag, up, bad)
    for value, what in ((float("nan"), "unfrozen"), (-1.0, "unfrozen")):
        bad = up.copy()
        bad[b] = value
        with pytest.raises(ValueError, match=f"{what} duration of {dag.actions[b]}"):
            solve(dag, bad, low)
    f = int(np.flatnonzero(dag.kind_mask("F"))[0])
    bad = low.copy()
    bad[f] = up[f] / 2
    with pytest.raises(ValueError, match=f"{dag.actions[f]}.*no parameters"):
        solve(dag, up, bad)
    with pytest.raises(ValueError, match="shape"):
        solve(dag, up[:-1], low)
    with pytest.raises(ValueError, match="action cap of"):
        solve(dag, up, low, action_cap=np.full(dag.num_actions, 1.2))
    with pytest.raises(TypeError, match="DAG"):
        solve("1f1b", up, low)


def test_empty_dag_error():
    from dataclasses import replace

    dag = build_dag(build_schedule("1f1b", 1, 1))
    empty = replace(
        dag,
        actions=(),
        rank=dag.rank[:0],
        stage=dag.stage[:0],
        kind=dag.kind[:0],
        microbatch=dag.microbatch[:0],
        src=dag.src[:0],
        dst=dag.dst[:0],
        topo=dag.topo[:0],
    )
    with pytest.raises(ValueError, match="empty DAG"):
        solve(empty, [], [])


def test_failed_solve_raises_with_status():
    import scipy.sparse as sp

    # x >= 1 and x <= 0: infeasible
    lp = LP(
        sp.csc_matrix(np.array([[1.0]])),
        np.array([1.0]),
        np.array([np.inf]),
        np.array([0.0]),
        np.array([0.0]),
        np.zeros(0, dtype=np.int64),
        0,
        np.zeros(0, dtype=np.int64),
    )
    with pytest.raises(PlanSolveError, match="status") as info:
        run_checked(make_highs(lp, np.array([1.0])), "phase 1")
    assert "nfeasible" in info.value.status


@pytest.mark.slow
@pytest.mark.parametrize("P,M", [(16, 128)])
def test_large_matches_generic(P, M):
    dag = build_dag(build_schedule("1f1b", P, M))
    up, low = random_times(dag, np.random.default_rng(7), equal_share=0.05)
    fast, ref = solve(dag, up, low), solve_generic(dag, up, low)
    assert fast.makespan_planned == pytest.approx(ref.makespan_planned, rel=REL)
    assert fast.total_ratio == pytest.approx(ref.total_ratio, rel=REL)
    _check_plan(fast, dag, up, low, 0.8)


def test_impossible_plans_are_refused():
    """Values no solve produces: each refused naming its field."""
    dag = build_dag(build_schedule("1f1b", 2, 4))
    up, low = random_times(dag, np.random.default_rng(3))
    d = solve(dag, up, low).to_dict()
    assert len(d["stage_mean_ratio"]) == dag.num_stages == 2
    bads = [
        ("max_freeze_ratio", 5.0, "plan.max_freeze_ratio must be a finite number in [0, 1], got 5.0"),
        ("weighting", "bogus", "unknown plan.weighting 'bogus'; choose one of: count, duration"),
        (
            "stage_mean_ratio",
            [0.5, 0.5, 0.5],
            "plan.stage_mean_ratio: expected one ratio per stage of plan.ratios (2), got 3",
        ),
        ("stage_mean_ratio", [0.5, -1.0], "plan.stage_mean_ratio[1] must be a finite number in [0, 1]"),
        ("makespan_planned", -5.0, "plan.makespan_planned must be a finite number >= 0, got -5.0"),
        ("makespan_unfrozen", float("nan"), "plan.makespan_unfrozen must be a finite number >= 0"),
        ("status", None, "plan.status: expected a string, got None"),
        ("schedule", 5, "plan.schedule: expected a string, got 5"),
        ("ratios", dict(d["ratios"], x=0.0), "plan.ratios: malformed action 'x'"),
    ]
    for key, bad, message in bads:
        with pytest.raises(ValueError, match=re.escape(message)):
            Plan.from_dict(dict(d, **{key: bad}))


def test_config_keeps_plain_floats():
    """numpy scalars in PlanConfig become Python floats (float32 0.8 is 0.8), so the plan serialises."""
    config = PlanConfig(
        max_freeze_ratio=np.float32(0.8), makespan_slack=np.float32(0.01), action_cap=np.float64(1)
    )
    assert (config.max_freeze_ratio, config.makespan_slack, config.action_cap) == (0.8, 0.01, 1.0)
    assert all(type(v) is float for v in (config.max_freeze_ratio, config.makespan_slack, config.action_cap))
    dag = build_dag(build_schedule("1f1b", 2, 4))
    up, low = random_times(dag, np.random.default_rng(3))
    d = json.loads(solve(dag, up, low, config).to_json())
    assert d["max_freeze_ratio"] == 0.8 and d["makespan_slack"] == 0.01


def test_warm_start_must_be_a_plan():
    dag = build_dag(build_schedule("1f1b", 2, 4))
    up, low = random_times(dag, np.random.default_rng(3))
    with pytest.raises(TypeError, match="warm_start must be a tfz.plan.Plan or None, got dict"):
        solve(dag, up, low, warm_start={})


def test_durations_and_caps_must_be_real_numbers():
    dag = build_dag(build_schedule("1f1b", 1, 1))  # 0F0 0B0
    bads = [
        ((["1", "1"], ["1", "0.5"]), {}, "unfrozen duration of 0F0 must be a real number, got '1'"),
        (([1, 1], [True, False]), {}, "frozen duration of 0F0 must be a real number, got True"),
        ((np.array([1, 1]) + 0.5j, [1, 0.5]), {}, "unfrozen duration of 0F0 must be a real number"),
        (([10**400, 1], [10**400, 0]), {}, "unfrozen duration of 0F0 must be a number float64 can hold"),
        (([1, 1], [1, 0.5]), {"action_cap": ["1", "1"]}, "action cap of 0F0 must be a real number"),
        (([1, 1], [1, 0.5]), {"action_cap": np.array(True)}, "action cap must be a finite number"),
    ]
    for args, kwargs, message in bads:
        with pytest.raises(ValueError, match=re.escape(message)):
            solve(dag, *args, **kwargs)
    # a 0-d array cap is taken as a numpy scalar is: 0B0 saves half of 1 at ratio 0.5
    plan = solve(dag, [1, 1], [1, 0.5], action_cap=np.array(0.5))
    assert plan.makespan_planned == pytest.approx(1.75, rel=1e-12)
    assert plan.ratios.tolist() == [0.0, 0.5]
