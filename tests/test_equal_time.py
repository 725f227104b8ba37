"""tfz.demo.equal_time: the reference's steps around another method's end, and the weights kept for them."""

import numpy as np
import pytest

from tfz.demo.equal_time import ReferenceSnapshots, bracket


def _brute_bracket(step_ms, t):
    """Linear scan in Python floats: the last step that ended at or before t, and the next."""
    ends = [0.0]
    for ms in step_ms:
        ends.append(ends[-1] + ms)
    if not 0.0 <= t <= ends[-1]:
        return None
    j = max(i for i in range(len(ends) - 1) if ends[i] <= t)
    return j, j + 1, (t - ends[j]) / (ends[j + 1] - ends[j])


def test_bracket_by_hand_and_at_the_edges():
    assert bracket([100, 100, 110], 250.0) == (2, 3, pytest.approx(50 / 110))
    assert bracket([100, 100, 110], 0.0) == (0, 1, 0.0)
    assert bracket([100, 100, 110], 200.0) == (2, 3, 0.0)  # a step's end starts the next bracket
    assert bracket([100, 100, 110], 310.0) == (2, 3, 1.0)  # the last end closes the last one
    assert bracket([100, 100, 110], 310.5) is None and bracket([100], -1.0) is None
    assert bracket([], 0.0) is None


def test_bracket_matches_a_linear_scan():
    rng = np.random.default_rng(0)
    for _ in range(300):
        step_ms = rng.uniform(1, 100, rng.integers(1, 30)).tolist()
        t = rng.uniform(-5, 1.05 * sum(step_ms))
        got, want = bracket(step_ms, t), _brute_bracket(step_ms, t)
        assert (got is None) == (want is None)
        if got is not None:
            assert got[:2] == want[:2] and got[2] == pytest.approx(want[2])


def _run(step_ms_by_method, evaluated):
    snaps = ReferenceSnapshots("none", step_ms_by_method, evaluated)
    most = 0
    for i in range(len(step_ms_by_method["none"])):
        snaps.step_done({m: v[i] for m, v in step_ms_by_method.items()}, lambda i=i: f"weights after {i + 1}")
        most = max(most, len(snaps.saved_steps))
    return snaps, most


def test_every_bracket_is_kept_and_nothing_else_is_evaluated():
    """Random speeds (faster and slower than the reference, noisy steps): the steps left to evaluate are
    exactly the brute-force brackets of every other method's end, less the regular evaluations, and
    their weights are the ones saved after those steps."""
    rng = np.random.default_rng(1)
    for _ in range(200):
        steps = int(rng.integers(2, 40))
        speeds = {"none": 1.0, **{f"m{k}": rng.uniform(0.5, 1.3) for k in range(rng.integers(1, 4))}}
        times = {m: (100 * s * rng.uniform(0.8, 1.2, steps)).tolist() for m, s in speeds.items()}
        every = int(rng.integers(1, 12))
        evaluated = set(range(0, steps, every)) | {steps}
        snaps, _ = _run(times, evaluated)
        want = set()
        for m in speeds:
            if m != "none" and (b := _brute_bracket(times["none"], sum(times[m]))) is not None:
                want |= set(b[:2])
        got = snaps.steps_to_evaluate()
        assert got == sorted(want - evaluated)
        assert all(snaps.weights(k) == f"weights after {k}" for k in got)


def test_only_the_last_stretch_is_kept():
    """A method 1.25x faster on steady steps: the reference's weights are kept only for the steps it
    may still reach, about a fifth of the run, not all of it."""
    snaps, most = _run({"none": [100.0] * 100, "tf": [80.0] * 100}, {0, 100})
    assert most <= 22
    assert snaps.steps_to_evaluate() == [80, 81]  # 8,000 ms: the end of the reference's step 80
    assert ReferenceSnapshots("none", ["none", "tf"], ()).others == ["tf"]
    with pytest.raises(ValueError, match="no method beside the reference 'none'"):
        ReferenceSnapshots("none", ["none"], ())


def test_a_dropped_bracket_is_an_error_not_a_guess():
    snaps, _ = _run({"none": [100.0] * 10, "tf": [80.0] * 10}, {0, 10})
    snaps._saved.clear()
    with pytest.raises(RuntimeError, match=r"after step\(s\) \[8, 9\] were not kept"):
        snaps.steps_to_evaluate()
