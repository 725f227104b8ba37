"""tfz.plan does not depend on the time unit: solve(alpha * t) gives the ratios of solve(t) and makespans
alpha times larger, for alpha from 1e-12 to 1e12, on both solver paths and in the generic LP;
durations float64 cannot hold next to the largest one are refused by name."""

import numpy as np
import pytest
from _plan_cases import random_times, times

from tfz.dag import build_dag
from tfz.plan import PlanConfig, flow, solve, solve_generic
from tfz.schedule import build_schedule

POWERS_OF_TEN = [10.0**k for k in range(-12, 13)]
POWERS_OF_TWO = [2.0**k for k in (-40, -13, 7, 39)]
OTHERS = [3.7e-11, 0.0173, 6.02e8]


@pytest.fixture(params=["native", "highs", "generic"])
def solver(request, monkeypatch):
    if request.param == "native" and not flow.NATIVE:
        pytest.skip("tfz.plan._sidesimplex not built")
    if request.param == "highs":
        monkeypatch.setattr(flow, "NATIVE", False)
    return solve_generic if request.param == "generic" else solve


@pytest.mark.parametrize("kind", ["uniform", "stage", "random"])
def test_scale_invariance(solver, kind):
    dag = build_dag(build_schedule("zbv", 3, 9))
    up, low = times(dag, kind, np.random.default_rng(7))
    config = PlanConfig(max_freeze_ratio=0.6)
    ref = solver(dag, up, low, config)
    assert ref.speedup > 1.05  # an instance where the caps and ratios matter
    for alpha in POWERS_OF_TEN + POWERS_OF_TWO + OTHERS:
        plan = solver(dag, alpha * up, alpha * low, config)
        if alpha in POWERS_OF_TWO:  # alpha * t is exact: the same LP, bit for bit
            np.testing.assert_array_equal(plan.ratios, ref.ratios)
        else:
            np.testing.assert_allclose(plan.ratios, ref.ratios, rtol=0, atol=1e-9, err_msg=f"alpha {alpha}")
        np.testing.assert_allclose(plan.stage_mean_ratio, ref.stage_mean_ratio, rtol=0, atol=1e-9)
        for key in ("makespan_planned", "makespan_unfrozen", "makespan_all_frozen"):
            assert getattr(plan, key) == pytest.approx(alpha * getattr(ref, key), rel=1e-12), (alpha, key)


def test_durations_spanning_many_decades(solver):
    """Times from 1e-150 to 1e150 units are representable next to each other: no error, same plan
    as the times clipped to 0 where they are negligible."""
    dag = build_dag(build_schedule("1f1b", 3, 6))
    up, low = random_times(dag, np.random.default_rng(1))
    tiny = up.copy()
    f = np.flatnonzero(dag.kind_mask("F"))[:3]
    tiny[f] = 1e-150
    plan = solver(dag, 1e150 * tiny, 1e150 * np.where(dag.kind_mask("F"), tiny, low))
    zero = tiny.copy()
    zero[f] = 0.0
    ref = solver(dag, zero, np.where(dag.kind_mask("F"), zero, low))
    assert plan.makespan_planned / 1e150 == pytest.approx(ref.makespan_planned, rel=1e-12)
    np.testing.assert_allclose(plan.ratios, ref.ratios, rtol=0, atol=1e-9)


def test_unrepresentable_durations_are_named(solver):
    dag = build_dag(build_schedule("1f1b", 3, 6))
    up, low = random_times(dag, np.random.default_rng(2))
    f = int(np.flatnonzero(dag.kind_mask("F"))[1])
    b = int(np.flatnonzero(dag.kind_mask("B"))[0])
    big, small = up.copy(), low.copy()
    big[b] = 1e300
    big[f] = small[f] = 1e-10  # 1e-310 of the largest: below float64's normal range
    with pytest.raises(ValueError, match=rf"duration of {dag.actions[f]} \(1e-10\) cannot be represented"):
        solver(dag, big, np.minimum(small, big))
    # a frozen time whose saving is lost next to the largest duration: the saving is named
    w_up, w_low = up.copy(), low.copy()
    w_up[b] = 1e300
    c = int(np.flatnonzero(dag.kind_mask("B"))[1])
    w_up[c], w_low[c] = 1.0, 1.0 - 1e-12
    with pytest.raises(ValueError, match=rf"saved duration of {dag.actions[c]}"):
        solver(dag, w_up, np.minimum(w_low, w_up))
