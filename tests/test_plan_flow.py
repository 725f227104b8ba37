"""tfz.plan.solve on both of its paths against the generic LP (tfz.plan.solve_generic).

The native path is the side-column simplex (tfz.plan.flow, the extension tfz.plan._sidesimplex); the
fallback, used when the extension is not built, is the reduced LP in HiGHS. Both must give the
generic LP's lexicographic optimum (makespan, then total ratio) within 1e-9 relative on every
schedule, on degenerate (uniform, per-stage, tied) and random durations, cold and warm after drift.
"""

import os
import shutil
import sysconfig

import numpy as np
import pytest
from _plan_cases import KINDS, random_times, schedule, times

import tfz.plan.solver as solver
from tfz._validate import env_flag
from tfz.dag import build_dag, simulate
from tfz.plan import PlanConfig, flow, solve, solve_generic
from tfz.plan.flow import FlowProblem, FlowSolveError
from tfz.plan.problem import PlanProblem
from tfz.plan.warm import FlowWarmState, HighsWarmState
from tfz.schedule import SCHEDULES, build_schedule

REL = 1e-9

needs_native = pytest.mark.skipif(not flow.NATIVE, reason="tfz.plan._sidesimplex not built")


def _no_fallback(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the native solve fell back to HiGHS")

    monkeypatch.setattr(solver, "_solve_highs", fail)


@pytest.fixture(params=["native", "highs"])
def path(request, monkeypatch):
    """Which path solve() takes: the native simplex (never falling back) or the HiGHS fallback."""
    if request.param == "native":
        if not flow.NATIVE:
            pytest.skip("tfz.plan._sidesimplex not built")
        _no_fallback(monkeypatch)
    else:
        monkeypatch.setattr(flow, "NATIVE", False)
    return request.param


@pytest.fixture
def native_only(monkeypatch):
    if not flow.NATIVE:
        pytest.skip("tfz.plan._sidesimplex not built")
    _no_fallback(monkeypatch)


def _check(plan, ref, dag, up, low, cap):
    """``plan`` is feasible, its makespan simulates, and it is the generic optimum within 1e-9."""
    assert plan.makespan_planned == pytest.approx(ref.makespan_planned, rel=REL)
    assert plan.total_ratio == pytest.approx(ref.total_ratio, rel=REL, abs=1e-9)
    r = plan.ratios
    assert np.all(r >= 0) and np.all(r <= 1)
    assert max(plan.stage_mean_ratio, default=0.0) <= cap + 1e-9
    assert simulate(dag, up - r * (up - low)).makespan == pytest.approx(plan.makespan_planned, rel=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", SCHEDULES)
def test_every_schedule_matches_generic(name, kind, path):
    rng = np.random.default_rng(sum(map(ord, name + kind)))
    for (P, M), cap, weighting in (((3, 8), 0.5, "count"), ((4, 12), 0.8, "duration")):
        dag = build_dag(schedule(name, P, M))
        up, low = times(dag, kind, rng)
        config = PlanConfig(max_freeze_ratio=cap, weighting=weighting)
        plan = solve(dag, up, low, config)
        state = plan._warm_state
        assert isinstance(state, FlowWarmState if path == "native" else HighsWarmState)
        _check(plan, solve_generic(dag, up, low, config), dag, up, low, cap)


@pytest.mark.parametrize("name", SCHEDULES)
def test_caps_and_per_action_caps(name, native_only):
    """Caps 0 to 1, both weightings, per-action caps, actions that cannot gain."""
    rng = np.random.default_rng(sum(map(ord, name)))
    for P, M in ((2, 6), (3, 9), (6, 30)):
        dag = build_dag(schedule(name, P, M))
        for trial in range(4):
            up, low = random_times(dag, rng, equal_share=0.15 * trial, grid=0.25 if trial == 3 else None)
            cap = float(rng.choice([0.0, 0.3, 0.5, 0.8, 1.0]))
            config = PlanConfig(max_freeze_ratio=cap, weighting=["count", "duration"][trial % 2])
            action_cap = rng.uniform(0.3, 1.0, dag.num_actions) if trial == 2 else None
            plan = solve(dag, up, low, config, action_cap=action_cap)
            _check(plan, solve_generic(dag, up, low, config, action_cap=action_cap), dag, up, low, cap)


SMALL = {"a": 0.02, "d": 1e-4, "e": 1e-3, "f": 5e-3}


def _drift(dag, up, low, rng, how):
    """(a) every duration U(+-2%), (b) one factor per (stage, kind), (c) one stage 10% slower, and
    like (a): (d) U(+-0.01%), (e) U(+-0.1%), (f) U(+-0.5%)."""
    n = dag.num_actions
    if how in SMALL:
        rel = SMALL[how]
        f, g = rng.uniform(1 - rel, 1 + rel, n), rng.uniform(1 - rel, 1 + rel, n)
    elif how == "b":
        key = dag.stage.astype(np.int64) * 8 + dag.kind.astype(np.int64)
        f, g = rng.uniform(0.97, 1.03, key.max() + 1)[key], rng.uniform(0.97, 1.03, key.max() + 1)[key]
    else:
        f = np.where(dag.stage == dag.num_stages // 3, 1.1, 1.0)
        g = f
    up2 = up * f
    low2 = np.where(low < up, np.minimum(low * g, up2), up2)
    return up2, low2


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("how", ["a", "b", "c", "d", "e", "f"])
def test_warm_matches_generic(name, how, path):
    """Chains of warm re-plans, each from the last; on the native path small drifts (d, e) restart
    from the final basis, larger ones from the uncapped optimum."""
    rng = np.random.default_rng(sum(map(ord, name + how)))
    dag = build_dag(schedule(name, 4, 12))
    up, low = random_times(dag, rng)
    config = PlanConfig(max_freeze_ratio=0.6)
    plan = solve(dag, up, low, config)
    for _ in range(3):
        up, low = _drift(dag, up, low, rng, how)
        warm = solve(dag, up, low, config, warm_start=plan)
        assert warm.warm
        if path == "native":
            assert warm._warm_state.start == ("final" if how in "de" else "uncapped")
        _check(warm, solve_generic(dag, up, low, config), dag, up, low, 0.6)
        plan = warm


@pytest.mark.parametrize("kind", ["uniform", "stage"])
def test_warm_degenerate_matches_generic(kind, path):
    """Re-plans of profile-like instances after the controller's drifts (one stage slower, all)."""
    rng = np.random.default_rng(3)
    dag = build_dag(build_schedule("1f1b", 4, 16))
    up, low = times(dag, kind, rng)
    plan = solve(dag, up, low)
    for how in ("c", "e", "b"):
        up, low = _drift(dag, up, low, rng, how)
        warm = solve(dag, up, low, warm_start=plan)
        assert warm.warm
        _check(warm, solve_generic(dag, up, low), dag, up, low, 0.8)
        plan = warm


def test_final_restart_gives_up_at_its_pivot_budget(native_only, monkeypatch):
    rng = np.random.default_rng(11)
    dag = build_dag(build_schedule("1f1b", 4, 16))
    up, low = random_times(dag, rng)
    plan = solve(dag, up, low)
    up2, low2 = _drift(dag, up, low, rng, "e")
    assert solve(dag, up2, low2, warm_start=plan)._warm_state.start == "final"
    monkeypatch.setattr(solver, "FINAL_START_PIVOTS", 0.0)
    monkeypatch.setattr(solver, "FINAL_START_MIN_PIVOTS", 0)  # no pivot through the caps: stops at once
    again = solve(dag, up2, low2, warm_start=plan)
    assert again.warm and again._warm_state.start == "uncapped"
    _check(again, solve_generic(dag, up2, low2), dag, up2, low2, 0.8)
    # and a drift past FINAL_START_DRIFT never tries the final basis
    monkeypatch.setattr(solver, "FINAL_START_DRIFT", 1e-6)
    monkeypatch.setattr(solver, "FINAL_START_PIVOTS", 2.0)
    assert solve(dag, up2, low2, warm_start=plan)._warm_state.start == "uncapped"


@needs_native
def test_warm_start_needs_the_same_structure(monkeypatch):
    rng = np.random.default_rng(4)
    dag = build_dag(build_schedule("1f1b", 3, 8))
    up, low = random_times(dag, rng, equal_share=0)
    plan = solve(dag, up, low)
    # an action that stops being freezable changes the flow problem: cold, same optimum
    b = np.flatnonzero(dag.kind_mask("B"))[0]
    low2 = low.copy()
    low2[b] = up[b]
    again = solve(dag, up, low2, warm_start=plan)
    assert isinstance(again._warm_state, FlowWarmState) and not again.warm
    _check(again, solve_generic(dag, up, low2), dag, up, low2, 0.8)
    # a plan of the HiGHS fallback carries no flow basis: cold
    monkeypatch.setattr(flow, "NATIVE", False)
    other = solve(dag, up, low)
    monkeypatch.setattr(flow, "NATIVE", True)
    assert isinstance(other._warm_state, HighsWarmState)
    assert not solve(dag, up, low, warm_start=other).warm


def test_no_freezable_actions(path):
    dag = build_dag(build_schedule("1f1b", 3, 5))
    up = np.random.default_rng(0).uniform(1, 2, dag.num_actions)
    plan = solve(dag, up, up)
    assert np.all(plan.ratios == 0)
    assert plan.makespan_planned == pytest.approx(simulate(dag, up).makespan, rel=1e-12)


@needs_native
def test_optimum_is_a_certificate():
    """The potentials satisfy every constraint of the LP, and their objectives equal generic's."""
    rng = np.random.default_rng(8)
    dag = build_dag(build_schedule("zbh1", 3, 9))
    up, low = random_times(dag, rng)
    problem = PlanProblem.create(dag, up, low, PlanConfig(max_freeze_ratio=0.3))
    fp = FlowProblem.build(problem)
    basis = fp.cold_basis()
    pi, _ = fp.optimize(basis, price_sides=False)
    pi, stats = fp.optimize(basis, start=fp.capped_start(pi))
    assert stats.homotopy > 0
    real = np.arange(fp.m_price)
    slack = fp.cost[real] - pi[fp.tail[real]] + pi[fp.head[real]]
    assert slack.min() >= -1e-9  # every precedence, end, start and duration bound holds
    g = np.zeros((len(fp.scost), fp.num_nodes))
    for s in range(len(fp.scost)):
        sl = slice(fp.sptr[s], fp.sptr[s + 1])
        g[s, fp.snode[sl]] = fp.scoef[sl]
    assert np.all(fp.scost - g @ pi >= -1e-9)  # every stage cap holds
    r, T = fp.ratios(pi)
    ref = solve_generic(dag, up, low, PlanConfig(max_freeze_ratio=0.3))
    assert T == pytest.approx(ref.makespan_planned, rel=1e-9)
    assert r.sum() == pytest.approx(ref.total_ratio, rel=1e-9)


@needs_native
@pytest.mark.parametrize("kind", KINDS)
def test_homotopy_and_plain_simplex_agree(kind):
    """The capped stage along the homotopy and by the plain simplex reach the same optimum."""
    dag = build_dag(build_schedule("interleaved1f1b", 4, 16))
    up, low = times(dag, kind, np.random.default_rng(6))
    fp = FlowProblem.build(PlanProblem.create(dag, up, low).scaled()[0])
    basis = fp.cold_basis()
    pi, _ = fp.optimize(basis, price_sides=False)
    plain = basis.copy()
    results = []
    for b, start in ((basis, fp.capped_start(pi)), (plain, None)):
        pi_b, stats = fp.optimize(b, start=start)
        assert (stats.homotopy > 0) == (start is not None)
        results.append(fp.ratios(pi_b))
    (r1, t1), (r2, t2) = results
    assert t1 == pytest.approx(t2, rel=1e-12)
    assert r1.sum() == pytest.approx(r2.sum(), rel=1e-12)


@needs_native
@pytest.mark.parametrize("name", ["1f1b", "interleaved1f1b", "zbv"])
def test_degenerate_homotopy_lifts_entering_arcs(name):
    """Per-stage times: nearly every homotopy pivot is degenerate in makespan and total ratio; the
    arcs those pivots bring in are lifted, and the optimum is still the generic LP's."""
    dag = build_dag(schedule(name, 8, 32))
    up, low = times(dag, "stage", np.random.default_rng(6))
    config = PlanConfig(max_freeze_ratio=0.3)
    fp = FlowProblem.build(PlanProblem.create(dag, up, low, config))
    basis = fp.cold_basis()
    pi, _ = fp.optimize(basis, price_sides=False)
    pi, stats = fp.optimize(basis, start=fp.capped_start(pi))
    assert stats.degenerate > stats.homotopy // 2
    assert 0 < stats.lifted <= stats.degenerate
    r, T = fp.ratios(pi)
    ref = solve_generic(dag, up, low, config)
    assert T == pytest.approx(ref.makespan_planned, rel=REL)
    assert r.sum() == pytest.approx(ref.total_ratio, rel=REL)


@needs_native
def test_bad_bases_are_refused():
    dag = build_dag(build_schedule("1f1b", 2, 4))
    up, low = random_times(dag, np.random.default_rng(1))
    fp = FlowProblem.build(PlanProblem.create(dag, up, low))
    basis = fp.cold_basis()
    short = basis.copy()
    short.parent = short.parent[:-1]
    with pytest.raises(ValueError, match="basis"):
        fp.optimize(short)
    loop = basis.copy()
    u = int(np.flatnonzero(loop.parent > 0)[0])
    loop.parent[loop.parent[u]], loop.pred[loop.parent[u]] = u, loop.pred[u]  # a 2-cycle
    with pytest.raises(FlowSolveError, match="invalid start basis"):
        fp.optimize(loop)
    wrong_arc = basis.copy()
    wrong_arc.pred[u] = (wrong_arc.pred[u] + 1) % fp.m_price
    with pytest.raises(FlowSolveError, match="invalid start basis"):
        fp.optimize(wrong_arc)


@needs_native
def test_failed_homotopy_retries_with_the_plain_simplex(monkeypatch):
    """A homotopy that stops without an optimum hands the capped stage to the plain simplex."""
    real = FlowProblem.optimize

    def no_homotopy(self, basis, **kwargs):
        if kwargs.get("start") is not None:
            raise FlowSolveError("side-column simplex stopped: singular side-column matrix", 4)
        return real(self, basis, **kwargs)

    monkeypatch.setattr(FlowProblem, "optimize", no_homotopy)
    _no_fallback(monkeypatch)
    dag = build_dag(build_schedule("zbv", 3, 9))
    up, low = random_times(dag, np.random.default_rng(2))
    _check(solve(dag, up, low), solve_generic(dag, up, low), dag, up, low, 0.8)


@needs_native
def test_flow_failure_falls_back_to_highs(monkeypatch):
    """A flow solve that stops without an optimum hands over to HiGHS."""

    def stop(self, basis, **kwargs):
        raise FlowSolveError("side-column simplex stopped: iteration limit", 2)

    monkeypatch.setattr(FlowProblem, "optimize", stop)
    dag = build_dag(build_schedule("gpipe", 3, 6))
    up, low = random_times(dag, np.random.default_rng(2))
    plan = solve(dag, up, low)
    assert isinstance(plan._warm_state, HighsWarmState)
    _check(plan, solve_generic(dag, up, low), dag, up, low, 0.8)


def _compiler() -> str | None:
    cxx = os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++"
    return shutil.which(cxx.split()[0])


def test_native_solver_is_built_and_used(monkeypatch):
    """Where a C++ compiler is present (and TFZ_SKIP_CPP_BUILD is not set), the install builds the
    native solver, and solve() runs on it."""
    if env_flag("TFZ_SKIP_CPP_BUILD"):
        pytest.skip("TFZ_SKIP_CPP_BUILD is set: the native build was skipped on purpose")
    if _compiler() is None:
        pytest.skip("no C++ compiler: the HiGHS path is the one in use")
    assert flow.NATIVE, "a C++ compiler is present but tfz.plan._sidesimplex is not built: pip install -e ."
    _no_fallback(monkeypatch)
    dag = build_dag(build_schedule("1f1b", 4, 8))
    plan = solve(dag, *random_times(dag, np.random.default_rng(0)))
    assert isinstance(plan._warm_state, FlowWarmState)


def test_solve_releases_the_gil(native_only):
    """A solve in a background thread (the controller's re-plan) must not stall the training thread."""
    import threading
    import time

    config = PlanConfig(max_freeze_ratio=0.8)
    dag = build_dag(build_schedule("interleaved1f1b", 16, 192))  # 12k actions
    up, low = random_times(dag, np.random.default_rng(5))
    stamps, span = [], []

    def work():
        t = time.perf_counter()
        solve(dag, up, low, config)
        span.append((t, time.perf_counter()))

    thread = threading.Thread(target=work)
    thread.start()
    while thread.is_alive():
        stamps.append(time.perf_counter())
    thread.join()
    (t0, t1), stamps = span[0], np.array(stamps)
    inside = stamps[(stamps > t0) & (stamps < t1)]
    longest = np.diff(np.concatenate([[t0], inside, [t1]])).max()
    assert t1 - t0 > 0.15, "instance too small to tell"
    # holding the GIL, the loop stops for the whole capped stage; releasing it, only for the
    # solver's Python parts
    assert longest < 0.25 * (t1 - t0), (longest, t1 - t0)


def _tiny_saving_case():
    """gpipe 1x2 (0F0 0F1 0B0 0B1), both B saving 1e-7 when frozen, cap 0.3: by hand the stage may
    freeze 0.6 in all, which saves 0.6e-7 on the single chain of 4."""
    dag = build_dag(build_schedule("gpipe", 1, 2))
    return dag, np.ones(4), np.array([1.0, 1.0, 1 - 1e-7, 1 - 1e-7]), PlanConfig(max_freeze_ratio=0.3)


@pytest.mark.parametrize("how", ["generic", "highs"])
def test_phase2_bound_at_rounded_optimum(how, monkeypatch):
    """HiGHS calls ``T <= T*`` infeasible here (T* is rounded): phase 2 retries a bound a few ulps
    looser instead of failing."""
    monkeypatch.setattr(flow, "NATIVE", False)
    dag, up, low, config = _tiny_saving_case()
    plan = (solve_generic if how == "generic" else solve)(dag, up, low, config)
    assert plan.makespan_planned == pytest.approx(4 - 0.6e-7, rel=1e-14)
    assert plan.total_ratio == pytest.approx(0.6, rel=1e-6)


def _wide_range_cases():
    """(dag, up, low, config): half the actions 1e-9 or 1e-12 of the others, frozen at 5-95%."""
    for k, name, P, M in [(9, "gpipe", 3, 8), (9, "gpipe", 2, 4), (12, "zbv", 2, 8), (12, "1f1b", 3, 6)]:
        rng = np.random.default_rng(k)
        dag = build_dag(build_schedule(name, P, M))
        n, bw = dag.num_actions, dag.kind_mask("B", "W")
        up = rng.uniform(0.5, 2, n) * np.where(rng.uniform(size=n) < 0.5, 10.0**-k, 1.0)
        low = np.where(bw, up * rng.uniform(0.05, 0.95, n), up)
        for cap in (0.3, 0.8):
            yield dag, up, low, PlanConfig(max_freeze_ratio=cap)


def test_saved_times_spanning_many_decades_match_generic():
    """Saved times far below the largest duration (here 1e-16 and 1e-24 of it) give the generic LP's
    optimum, not a plan off by up to 1e-5 or a refusal."""
    dag = build_dag(build_schedule("gpipe", 1, 2))
    # 0B0 saves one float64 step, 0B1 everything: by hand 0B1 takes the whole budget 0.6
    low = np.array([1.0, 1.0, np.nextafter(1.0, 0.0), 0.0])
    plan = solve(dag, np.ones(4), low, PlanConfig(max_freeze_ratio=0.3))
    assert plan.makespan_planned == pytest.approx(3.4, rel=1e-12)
    np.testing.assert_allclose(plan.ratios, [0, 0, 0, 0.6], atol=1e-9)
    for dag, up, low, config in _wide_range_cases():
        plan, ref = solve(dag, up, low, config), solve_generic(dag, up, low, config)
        assert plan.makespan_planned == pytest.approx(ref.makespan_planned, rel=1e-9)
        assert plan.total_ratio == pytest.approx(ref.total_ratio, rel=1e-6)


@needs_native
def test_inconsistent_native_plan_falls_back_to_highs(monkeypatch):
    """A native plan that does not simulate to the makespan it claims hands over to HiGHS."""
    monkeypatch.setattr(solver, "FLOW_MIN_SAVED", 0.0)
    dag = build_dag(build_schedule("gpipe", 1, 2))
    low = np.array([1.0, 1.0, np.nextafter(1.0, 0.0), 0.0])
    plan = solve(dag, np.ones(4), low, PlanConfig(max_freeze_ratio=0.3))
    assert isinstance(plan._warm_state, HighsWarmState)
    assert plan.makespan_planned == pytest.approx(3.4, rel=1e-12)
