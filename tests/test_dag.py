"""tfz.dag against closed forms and brute force."""

import itertools
import random
import re

import numpy as np
import pytest

from tfz.dag import build_dag, simulate
from tfz.schedule import Action, build_schedule, make_schedule


def _uniform(dag, f, i, w):
    """Durations: F=f, I=i, W=w, B=i+w."""
    table = {"F": f, "I": i, "W": w, "B": i + w}
    return np.array([table[a.kind] for a in dag.actions])


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("P,M", [(1, 1), (2, 2), (2, 5), (3, 7), (4, 4), (4, 16), (8, 8), (8, 13)])
@pytest.mark.parametrize("f,i,w", [(1.0, 1.0, 1.0), (1.0, 1.5, 0.5), (2.0, 0.3, 1.7)])
def test_makespan_closed_form(name, P, M, f, i, w):
    dag = build_dag(build_schedule(name, P, M))
    sim = simulate(dag, _uniform(dag, f, i, w))
    assert sim.makespan == pytest.approx((M + P - 1) * (f + i + w), rel=1e-12)
    if name == "1f1b":
        np.testing.assert_allclose(sim.bubble_ratio, (P - 1) / (M + P - 1), rtol=1e-12)
    np.testing.assert_allclose(sim.busy, M * (f + i + w), rtol=1e-12)


def _brute_force_times(schedule, durations):
    """Event-driven execution of the per-rank programs: each rank runs its next action as soon as
    the action's inputs exist. Independent of the DAG: dependencies are re-derived here."""
    pos = [0] * schedule.num_ranks
    free = [0.0] * schedule.num_ranks
    done: dict[Action, float] = {}

    def ready(a):
        s, k, m = a
        last = schedule.num_stages - 1
        if k == "F":
            deps = [Action(s - 1, "F", m)] if s > 0 else []
        elif k in "BI":
            deps = [Action(s, "F", m)]
            if s < last:
                nxt = Action(s + 1, "B", m) if Action(s + 1, "B", m) in durations else Action(s + 1, "I", m)
                deps.append(nxt)
        else:
            deps = [Action(s, "I", m)]
        if all(d in done for d in deps):
            return max([done[d] for d in deps], default=0.0)
        return None

    remaining = schedule.num_actions
    while remaining:
        progressed = False
        for r, order in enumerate(schedule.orders):
            if pos[r] < len(order):
                a = order[pos[r]]
                t = ready(a)
                if t is not None:
                    start = max(t, free[r])
                    done[a] = start + durations[a]
                    free[r] = done[a]
                    pos[r] += 1
                    remaining -= 1
                    progressed = True
        assert progressed, "brute force deadlocked"
    return done


@pytest.mark.parametrize("name,P,M", [("gpipe", 3, 5), ("1f1b", 4, 6), ("1f1b", 2, 9)])
def test_random_durations_match_brute_force(name, P, M):
    rng = random.Random(P * 100 + M)
    sched = build_schedule(name, P, M)
    dag = build_dag(sched)
    for _ in range(5):
        dur = {a: rng.uniform(0.1, 3.0) for a in sched.actions()}
        sim = simulate(dag, {str(a): t for a, t in dur.items()})
        ref = _brute_force_times(sched, dur)
        np.testing.assert_allclose(sim.end, [ref[a] for a in dag.actions], rtol=1e-12)
        # the critical path is a chain of back-to-back actions whose durations sum to the makespan
        cp = sim.critical_path
        assert sum(dur[a] for a in cp) == pytest.approx(sim.makespan, rel=1e-12)
        assert cp[0].kind == "F" and cp[0].stage == 0


def test_critical_path_of_uniform_1f1b_crosses_every_rank():
    dag = build_dag(build_schedule("1f1b", 4, 8))
    cp = simulate(dag, _uniform(dag, 1, 1, 1)).critical_path
    assert {a.stage for a in cp} == {0, 1, 2, 3}


def _sched(orders, M, spr=1, placement="loop"):
    return make_schedule("custom", [[Action.parse(x) for x in o.split()] for o in orders], M, spr, placement)


@pytest.mark.parametrize(
    "orders,M,message",
    [
        (["0F0 0B0 0F0", "1F0 1B0"], 1, "duplicate action 0F0"),
        (["0F0 0B0", "1F0"], 1, "missing microbatch 0: no backward"),
        (["0F0 0B0 0F1 0B1", "1F0 1B0"], 2, "stage 1 is missing microbatch 1: no forward 1F1"),
        (["0F0 0B0", "1F0 1B0 1F3"], 1, "microbatch 3 not in [0, 1)"),
        (["0F0 0B0", "1F0 1B0 0F0"], 1, "action 0F0 is on rank 1, but stage 0 lives on rank 0"),
        (["0F0 0I0 0W0 0B0", "1F0 1B0"], 1, "both a full backward 0B0 and a split one"),
        (["0F0 0I0", "1F0 1B0"], 1, "0I0 has no matching 0W0"),
        (["0F0 0B0 0F1 0B1", "1B0 1F0 1F1 1B1"], 2, "deadlock"),
    ],
)
def test_validation_errors(orders, M, message):
    with pytest.raises(ValueError, match=None) as err:
        build_dag(_sched(orders, M))
    assert message in str(err.value)


def test_deadlock_names_the_cycle():
    # rank 1 waits for 1B0 before 1F0, but 1B0 needs 1F0: a cycle through program order
    with pytest.raises(ValueError) as err:
        build_dag(_sched(["0F0 0B0", "1B0 1F0"], 1))
    text = str(err.value)
    assert "1B0" in text and "1F0" in text


def test_cross_rank_deadlock():
    # rank 0 runs 0B0 before 0F1; 0B0 needs 1B0, which rank 1 runs after 1F1, which needs 0F1
    with pytest.raises(ValueError, match="deadlock") as err:
        build_dag(_sched(["0F0 0B0 0F1 0B1", "1F1 1F0 1B0 1B1"], 2))
    names = str(err.value)
    assert all(a in names for a in ("0B0", "0F1", "1F1"))


def test_simulate_rejects_bad_durations():
    dag = build_dag(build_schedule("gpipe", 2, 2))
    for bad in (np.nan, -1.0, np.inf):
        d = np.ones(dag.num_actions)
        d[3] = bad
        with pytest.raises(ValueError, match=str(dag.actions[3])):
            simulate(dag, d)
    with pytest.raises(ValueError, match="shape"):
        simulate(dag, np.ones(3))
    with pytest.raises(ValueError, match="unknown action '9F9'"):
        simulate(dag, {"9F9": 1.0})


def test_all_permutations_of_tiny_gpipe_rank_orders():
    """Every per-rank order that forms a DAG simulates like the brute-force executor."""
    base = ["0F0", "0F1", "0B0", "0B1"]
    last = "1F0 1B0 1F1 1B1"
    ok = 0
    for perm in itertools.permutations(base):
        sched = _sched([" ".join(perm), last], 2)
        try:
            dag = build_dag(sched)
        except ValueError as err:
            assert "deadlock" in str(err)
            continue
        dur = {a: 1.0 + 0.1 * i for i, a in enumerate(sched.actions())}
        sim = simulate(dag, {str(a): t for a, t in dur.items()})
        ref = _brute_force_times(sched, dur)
        np.testing.assert_allclose(sim.end, [ref[a] for a in dag.actions])
        ok += 1
    assert ok >= 2


# -- extreme scales ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name,P,M", [("1f1b", 4, 8), ("zbh1", 3, 5), ("gpipe", 2, 3)])
@pytest.mark.parametrize("exponent", [-1070, -1000, 900, 1000])
def test_critical_path_is_the_same_at_any_scale(name, P, M, exponent):
    """Integer durations times 2**exponent are exact (down to subnormals: multiples of 2**-1074), so
    start and end times are those at scale 1 times 2**exponent, and so is the critical path."""
    dag = build_dag(build_schedule(name, P, M))
    d = np.random.default_rng(P * M).integers(1, 9, dag.num_actions).astype(np.float64)
    ref = simulate(dag, d)
    scaled = simulate(dag, np.ldexp(d, exponent))
    np.testing.assert_array_equal(scaled.end, np.ldexp(ref.end, exponent))
    assert scaled.critical_path == ref.critical_path
    assert len(ref.critical_path) > 1


def test_critical_path_of_subnormal_uniform_times():
    """The issue's case: F = I = W = 1e-320 ms; 1F1B(4, 8) has M + P - 1 = 11 F/B pairs on its path."""
    dag = build_dag(build_schedule("1f1b", 4, 8))
    sim = simulate(dag, _uniform(dag, 1e-320, 1e-320, 1e-320))
    assert len(sim.critical_path) == 22
    assert sim.critical_path == simulate(dag, _uniform(dag, 1, 1, 1)).critical_path


def test_overflowing_makespan_is_refused():
    dag = build_dag(build_schedule("1f1b", 4, 8))
    with pytest.raises(ValueError, match=r"makespan overflows float64 \(largest duration 1e\+308, of 0F0\)"):
        simulate(dag, _uniform(dag, 1e308, 1.0, 1.0))
    sim = simulate(dag, _uniform(dag, 1e306, 1.0, 1.0))  # 11 forwards on the path: 1.1e307, finite
    assert sim.makespan == pytest.approx(11e306, rel=1e-12) and np.all(np.isfinite(sim.bubble_ratio))


def test_durations_must_be_real_numbers():
    """No coercion of strings, bools, complex numbers or None; a NaN in a mapping is named as such."""
    dag = build_dag(build_schedule("1f1b", 1, 1))  # 0F0 0B0
    bads = [
        (["1", "2"], "duration of 0F0 must be a real number, got '1'"),
        ([True, True], "duration of 0F0 must be a real number, got True"),
        (np.array([1, 1]) + 0.5j, "duration of 0F0 must be a real number, got (1+0.5j)"),
        ([1.0, 10**400], "duration of 0B0 must be a number float64 can hold"),
        ({"0F0": True, "0B0": 1.0}, "duration of 0F0 must be a real number, got True"),
        ({"0F0": None, "0B0": 1.0}, "duration of 0F0 must be a real number, got None"),
        ({"0F0": float("nan"), "0B0": 1.0}, "duration of 0F0 must be finite and >= 0, got nan"),
    ]
    for durations, message in bads:
        with pytest.raises(ValueError, match=re.escape(message)):
            simulate(dag, durations)
    assert simulate(dag, {"0F0": np.float32(1), "0B0": 2}).makespan == 3.0
    assert simulate(dag, [10**20, 1]).makespan == 1e20 + 1
