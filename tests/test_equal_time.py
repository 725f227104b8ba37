"""tfz.demo.equal_time: the reference's steps nearest another method's end, and the weights kept for them."""

import numpy as np
import pytest

from tfz.demo.equal_time import ReferenceSnapshots, around, cumulative_ms


def _ends(step_ms):
    ends = [0.0]
    for ms in step_ms:
        ends.append(ends[-1] + ms)
    return ends


def _brute_around(step_ms, points, t):
    """Linear scan in Python floats: the last point that ended at or before t, and the next point."""
    ends = _ends(step_ms)
    if not ends[points[0]] <= t <= ends[points[-1]]:
        return None
    i = max(i for i in range(len(points) - 1) if ends[points[i]] <= t)
    lo, hi = points[i], points[i + 1]
    return lo, hi, (t - ends[lo]) / (ends[hi] - ends[lo])


def test_around_by_hand_and_at_the_edges():
    ends = cumulative_ms([100, 100, 110])
    assert ends.tolist() == [0, 100, 200, 310]
    every = [0, 1, 2, 3]
    assert around(ends, every, 250.0) == (2, 3, pytest.approx(50 / 110))
    assert around(ends, [0, 3], 250.0) == (0, 3, pytest.approx(250 / 310))
    assert around(ends, every, 0.0) == (0, 1, 0.0)
    assert around(ends, every, 200.0) == (2, 3, 0.0)  # a step's end starts the next pair
    assert around(ends, every, 310.0) == (2, 3, 1.0)  # the last end closes the last pair
    assert around(ends, every, 310.5) is None and around(ends, [1, 2], 50.0) is None
    assert around(ends, [0], 0.0) is None


def test_around_matches_a_linear_scan():
    rng = np.random.default_rng(0)
    for _ in range(300):
        step_ms = rng.uniform(1, 100, rng.integers(1, 30)).tolist()
        points = sorted({0, len(step_ms)} | set(rng.integers(0, len(step_ms) + 1, 5).tolist()))
        t = rng.uniform(-5, 1.05 * sum(step_ms))
        got, want = around(cumulative_ms(step_ms), points, t), _brute_around(step_ms, points, t)
        assert (got is None) == (want is None)
        if got is not None:
            assert got[:2] == want[:2] and got[2] == pytest.approx(want[2])


def _run(step_ms_by_method, evaluated, limit=10_000):
    snaps = ReferenceSnapshots("none", step_ms_by_method, evaluated, limit=limit)
    most = 0
    for i in range(len(step_ms_by_method["none"])):
        snaps.step_done({m: v[i] for m, v in step_ms_by_method.items()}, lambda i=i: f"weights after {i + 1}")
        most = max(most, len(snaps.saved_steps))
    return snaps, most


def _draw(rng):
    steps = int(rng.integers(2, 60))
    speeds = {"none": 1.0, **{f"m{k}": rng.uniform(0.5, 1.3) for k in range(rng.integers(1, 4))}}
    times = {m: (100 * s * rng.uniform(0.8, 1.2, steps)).tolist() for m, s in speeds.items()}
    every = int(rng.integers(1, 16))
    return times, set(range(0, steps, every)) | {steps}


def test_the_steps_beside_every_end_are_kept_and_nothing_else_is_evaluated():
    """Random speeds (faster and slower than the reference, noisy steps): the steps left to evaluate are
    exactly the brute-force neighbours, one step apart, of every other method's end, less the regular
    evaluations, and their weights are the ones saved after those steps."""
    rng = np.random.default_rng(1)
    for _ in range(200):
        times, evaluated = _draw(rng)
        steps = len(times["none"])
        snaps, _ = _run(times, evaluated)
        want = set()
        for m in times:
            if m != "none" and (b := _brute_around(times["none"], list(range(steps + 1)), sum(times[m]))):
                want |= set(b[:2])
        got = snaps.steps_to_evaluate()
        assert got == sorted(want - evaluated)
        assert all(snaps.weights(k) == f"weights after {k}" for k in got)


def test_past_the_limit_the_kept_steps_thin_out():
    """With room for 4 saved steps, never more are held, and every end is still bracketed by
    evaluated or saved steps at most the final spacing apart, the pair brute force finds among them."""
    rng = np.random.default_rng(2)
    thinned = 0
    for _ in range(200):
        times, evaluated = _draw(rng)
        snaps, most = _run(times, evaluated, limit=4)
        assert most <= 4
        thinned += snaps.spacing > 1
        points = sorted(set(snaps.saved_steps) | evaluated)
        for m, near in snaps.nearest().items():
            want = _brute_around(times["none"], points, sum(times[m]))
            assert (near is None) == (want is None)
            if near is not None:
                assert near[:2] == want[:2]
                assert near[1] - near[0] <= snaps.spacing
    assert thinned > 50


def test_only_the_last_stretch_is_kept():
    """A method 1.25x faster on steady steps: the reference's weights are kept only for the steps it
    may still reach, about a fifth of the run, not all of it."""
    snaps, most = _run({"none": [100.0] * 100, "tf": [80.0] * 100}, {0, 100})
    assert most <= 22 and snaps.spacing == 1
    assert snaps.steps_to_evaluate() == [80, 81]  # 8,000 ms: the end of the reference's step 80
    assert ReferenceSnapshots("none", ["none", "tf"], ()).others == ["tf"]
    with pytest.raises(ValueError, match="no method beside the reference 'none'"):
        ReferenceSnapshots("none", ["none"], ())
