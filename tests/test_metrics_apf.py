"""tfz.metrics.apf: hand-computed values, a float64 per-scalar reference, AIMD periods, the > 80% rule."""

import dataclasses
import io
import re

import numpy as np
import pytest
import torch
from torch import nn

from tfz.metrics import APFConfig, APFMetric
from tfz.nn import FreezableLinear


def scalar_stage(value=0.0):
    stage = nn.Module()
    stage.w = FreezableLinear(1, 1, bias=False).double()
    with torch.no_grad():
        stage.w.weight.fill_(value)
    return stage


def set_(param, value):
    with torch.no_grad():
        param.copy_(torch.as_tensor(value, dtype=param.dtype).reshape(param.shape))


def test_hand_computed_values_one_scalar():
    stage = scalar_stage(0.0)
    apf = APFMetric(check_interval=1, block_rows=1)
    apf.observe(0, {0: stage})  # snapshot only
    assert apf.stats(0).round == 0 and not apf.candidates(0).any()

    set_(stage.w.weight, 1.0)  # Δ = +1: E = 0.01, A = 0.01, P = 1 -> unstable, L = 0
    apf.observe(1, {0: stage})
    s = apf.stats(0)
    assert s.drift[0] == pytest.approx(0.01) and s.path[0] == pytest.approx(0.01)
    assert s.perturbation[0] == pytest.approx(1.0)
    assert (s.period[0], s.wake[0], s.round) == (0, 1, 1) and not apf.candidates(0)[0]

    set_(stage.w.weight, 0.0)  # Δ = -1: E = 0.0099 - 0.01 = -0.0001, A = 0.0099 + 0.01 = 0.0199
    apf.observe(2, {0: stage})
    s = apf.stats(0)
    assert s.drift[0] == pytest.approx(0.0001) and s.path[0] == pytest.approx(0.0199)
    assert s.perturbation[0] == pytest.approx(0.0001 / 0.0199)  # 0.005 < 0.05: stable, L = 1
    assert (s.period[0], s.wake[0], s.round) == (1, 3, 2) and apf.candidates(0)[0]

    set_(stage.w.weight, 5.0)  # moved while frozen (e.g. trained under a hybrid budget): not judged
    apf.observe(3, {0: stage})
    s2 = apf.stats(0)
    assert s2.round == 3 and (s2.period[0], s2.wake[0]) == (1, 3) and not apf.candidates(0)[0]
    for field in ("drift", "path", "perturbation"):
        assert getattr(s2, field)[0] == getattr(s, field)[0]

    set_(stage.w.weight, 4.0)  # Δ since the last check = -1 (the frozen round's move is not counted)
    apf.observe(4, {0: stage})
    s = apf.stats(0)
    e, a = 0.99 * -0.0001 - 0.01, 0.99 * 0.0199 + 0.01
    assert s.drift[0] == pytest.approx(abs(e)) and s.path[0] == pytest.approx(a)
    assert s.perturbation[0] == pytest.approx(abs(e) / a)  # 0.34: unstable, L = 1 // 2 = 0
    assert (s.period[0], s.wake[0], s.round) == (0, 4, 4) and not apf.candidates(0)[0]


def test_delta_spans_the_check_interval():
    stage = scalar_stage(0.0)
    apf = APFMetric(check_interval=3, block_rows=1)
    apf.observe(10, {0: stage})
    for step, value in ((11, 2.0), (12, -1.0)):
        set_(stage.w.weight, value)
        apf.observe(step, {0: stage})
        assert apf.stats(0).round == 0
    set_(stage.w.weight, 0.5)
    apf.observe(13, {0: stage})  # Δ = 0.5 - 0 over steps 11..13
    s = apf.stats(0)
    assert s.round == 1 and s.path[0] == pytest.approx(0.01 * 0.5)


def test_never_moved_unit_counts_as_stable():
    stage = scalar_stage(3.0)
    apf = APFMetric(check_interval=1, block_rows=1, tighten_ratio=None)
    apf.observe(0, {0: stage})
    apf.observe(1, {0: stage})
    s = apf.stats(0)
    assert s.path[0] == 0 and s.perturbation[0] == 0 and s.period[0] == 1 and apf.candidates(0)[0]


def test_unit_aggregates_scalars_signs_do_not_cancel_in_scalar_mode():
    # 1 block of 64 x 16 scalars, each drifting steadily in its own fixed direction
    torch.manual_seed(0)
    signs = torch.randint(0, 2, (64, 16), dtype=torch.float64) * 2 - 1
    got = {}
    for aggregate in ("scalar", "block"):
        stage = nn.Module()
        stage.w = FreezableLinear(16, 64, bias=False).double()
        apf = APFMetric(check_interval=1, block_rows=64, aggregate=aggregate, include_tensors=False)
        apf.observe(0, {0: stage})
        for step in range(1, 4):
            with torch.no_grad():
                stage.w.weight.add_(signs * 0.01)
            apf.observe(step, {0: stage})
        got[aggregate] = apf.stats(0).perturbation[0]
    assert got["scalar"] == pytest.approx(1.0)
    assert got["block"] == pytest.approx(abs(float(signs.sum())) / signs.numel())  # about 1/sqrt(n)
    assert got["block"] < 0.1


class ReferenceAPF:
    """Per-scalar float64 APF on explicit unit -> scalar-index lists (written from the paper's rule)."""

    def __init__(self, unit_scalars, weights, alpha, threshold, tighten, aggregate):
        self.units = unit_scalars
        self.weights = np.asarray(weights, dtype=float)
        n_scalars = 1 + max(max(ix) for ix in unit_scalars)
        self.e = np.zeros(n_scalars)
        self.a = np.zeros(n_scalars)
        self.alpha, self.threshold, self.tighten, self.aggregate = alpha, threshold, tighten, aggregate
        n = len(unit_scalars)
        self.p = np.full(n, np.inf)
        self.period = np.zeros(n, dtype=int)
        self.wake = np.zeros(n, dtype=int)
        self.round = 0

    def check(self, delta):
        al = self.alpha
        for u, ix in enumerate(self.units):
            if self.wake[u] > self.round:
                continue
            for j in ix:
                self.e[j] = al * self.e[j] + (1 - al) * delta[j]
                self.a[j] = al * self.a[j] + (1 - al) * abs(delta[j])
            a = sum(self.a[j] for j in ix)
            e = (
                sum(abs(self.e[j]) for j in ix)
                if self.aggregate == "scalar"
                else abs(sum(self.e[j] for j in ix))
            )
            self.p[u] = e / a if a > 0 else 0.0
            self.period[u] = self.period[u] + 1 if self.p[u] < self.threshold else self.period[u] // 2
            self.wake[u] = self.round + self.period[u] + 1
        self.round += 1
        frozen = self.wake > self.round
        if self.tighten is not None and self.weights[frozen].sum() > self.tighten * self.weights.sum():
            self.threshold /= 2


def _stage_for_reference():
    stage = nn.Module()
    stage.a = FreezableLinear(3, 5).double()  # rows blocks of 2: [0,2) [2,4) [4,5), with bias rows
    stage.norm = nn.LayerNorm(5).double()  # two tensor units
    stage.b = FreezableLinear(5, 2, bias=False).double()  # one block
    flat = [stage.a.weight, stage.a.bias, stage.norm.weight, stage.norm.bias, stage.b.weight]
    offsets = np.cumsum([0] + [p.numel() for p in flat])
    units, weights = [], []
    for lo, hi in ((0, 2), (2, 4), (4, 5)):
        ix = [offsets[0] + r * 3 + c for r in range(lo, hi) for c in range(3)]
        ix += [offsets[1] + r for r in range(lo, hi)]
        units.append(ix)
        weights.append((hi - lo) * 3)
    units.append(list(range(offsets[2], offsets[3])))
    units.append(list(range(offsets[3], offsets[4])))
    units.append(list(range(offsets[4], offsets[5])))
    weights += [5, 5, 10]
    return stage, flat, units, weights


@pytest.mark.parametrize("aggregate", ["scalar", "block"])
def test_matches_per_scalar_reference_with_freezing(aggregate):
    stage, flat, unit_scalars, weights = _stage_for_reference()
    cfg = APFConfig(alpha=0.9, threshold=0.3, check_interval=2, block_rows=2, aggregate=aggregate)
    apf = APFMetric(cfg)
    ref = ReferenceAPF(unit_scalars, weights, 0.9, 0.3, 0.8, aggregate)
    rng = np.random.default_rng(1)
    n_scalars = sum(p.numel() for p in flat)
    kind = rng.integers(0, 3, size=n_scalars)  # 0: oscillate, 1: drift, 2: noise
    step, since_check = 0, np.zeros(n_scalars)
    apf.observe(step, {0: stage})
    for _ in range(40):  # 20 checks
        step += 1
        frozen_scalars = np.zeros(n_scalars, dtype=bool)
        for u in np.flatnonzero(apf.candidates(0)):
            frozen_scalars[unit_scalars[u]] = True
        move = np.where(kind == 0, (-1.0) ** step, np.where(kind == 1, 1.0, rng.normal(size=n_scalars)))
        move = np.where(frozen_scalars, 0.0, move * rng.uniform(0.5, 1.5, size=n_scalars))
        since_check += move
        pos = 0
        with torch.no_grad():
            for p in flat:
                p.add_(torch.from_numpy(move[pos : pos + p.numel()]).view_as(p))
                pos += p.numel()
        apf.observe(step, {0: stage})
        if step % 2 == 0:
            ref.check(since_check)
            since_check = np.zeros(n_scalars)
            s = apf.stats(0)
            np.testing.assert_allclose(s.perturbation, ref.p, rtol=1e-9)
            np.testing.assert_array_equal(s.period, ref.period)
            np.testing.assert_array_equal(s.wake, ref.wake)
            assert s.round == ref.round and s.threshold == ref.threshold
            np.testing.assert_array_equal(apf.candidates(0), ref.wake > ref.round)
    assert ref.period.max() >= 2 and (ref.wake > ref.round).any()  # the run exercised freezing


def test_period_dynamics_additive_increase_then_halving():
    stage = scalar_stage(0.0)
    apf = APFMetric(alpha=0.5, threshold=0.5, check_interval=1, block_rows=1, tighten_ratio=None)
    apf.observe(0, {0: stage})
    value, moves, judged, frozen_rounds = 0.0, 0, [], []
    for step in range(1, 60):
        before = apf.stats(0)
        active = not apf.candidates(0)[0]
        if active:  # oscillate (+1, -1, ...) for the first 30 steps, then drift
            moves += 1
            value += (-1.0) ** moves if step < 30 else 1.0
            set_(stage.w.weight, value)
        else:
            frozen_rounds.append(before.round)
        apf.observe(step, {0: stage})
        after = apf.stats(0)
        if active:
            p, old, new = after.perturbation[0], before.period[0], after.period[0]
            assert new == (old + 1 if p < 0.5 else old // 2)
            assert after.wake[0] == before.round + new + 1
            judged.append((before.round, old, new, p < 0.5))
        else:  # frozen: state kept
            assert (after.period[0], after.wake[0], after.perturbation[0]) == (
                before.period[0],
                before.wake[0],
                before.perturbation[0],
            )
    # between two judgements the unit is frozen for exactly the period set by the first one
    for (r0, _, new, _), (r1, *_) in zip(judged, judged[1:]):
        assert r1 - r0 == new + 1
    periods = [new for *_, new, _ in judged]
    assert max(periods) >= 3  # grew by one per stable judgement
    assert any(not stable and old > 0 and new == old // 2 for _, old, new, stable in judged)  # halved
    assert periods[-1] == 0 and frozen_rounds  # drifting: active every round again


def equal_units_stage(n_units):
    stage = nn.Module()
    stage.w = FreezableLinear(2, n_units, bias=False).double()  # one unit per row, all weight 2
    return stage


@pytest.mark.parametrize(("n_frozen", "halved"), [(4, False), (5, True)])
def test_threshold_halves_only_above_80_percent(n_frozen, halved):
    stage = equal_units_stage(5)
    apf = APFMetric(check_interval=1, block_rows=1, threshold=0.05)
    apf.observe(0, {0: stage})
    drift = torch.zeros(5, 2, dtype=torch.float64)
    drift[n_frozen:] = 1.0  # steady drift keeps P = 1; units that do not move have P = 0
    with torch.no_grad():
        stage.w.weight.add_(drift)
    apf.observe(1, {0: stage})
    s = apf.stats(0)
    assert s.frozen.sum() == n_frozen
    assert s.threshold == (0.025 if halved else 0.05)


def test_threshold_halves_at_every_check_while_over_80_percent():
    stage = equal_units_stage(5)
    apf = APFMetric(check_interval=1, block_rows=1, threshold=0.04)
    apf.observe(0, {0: stage})
    # nothing moves: every unit is judged stable whenever it is active (rounds 0, 2, 5, 9: L = 1, 2, 3, 4)
    # and frozen after every check except those ending in a wake-up round (rounds 2, 5, 9)
    halvings = [1, 1, 2, 3, 3, 4, 5, 6, 6, 7]
    for step, k in enumerate(halvings, start=1):
        apf.observe(step, {0: stage})
        assert apf.stats(0).threshold == 0.04 / 2**k


def test_tighten_off():
    stage = equal_units_stage(3)
    apf = APFMetric(check_interval=1, block_rows=1, tighten_ratio=None)
    apf.observe(0, {0: stage})
    apf.observe(1, {0: stage})
    assert apf.stats(0).frozen.all() and apf.stats(0).threshold == 0.05


def test_check_interval_counts_steps_and_stages_are_independent():
    s0, s1 = scalar_stage(), scalar_stage()
    apf = APFMetric(check_interval=2, block_rows=1)
    apf.observe(0, {0: s0})
    apf.observe(1, {0: s0, 1: s1})  # stage 1 bound one step later: its own clock
    apf.observe(2, {0: s0, 1: s1})
    assert apf.stats(0).round == 1 and apf.stats(1).round == 0
    apf.observe(3, {0: s0, 1: s1})
    assert apf.stats(0).round == 1 and apf.stats(1).round == 1
    assert apf.stages == (0, 1)


def _run(apf, stage, rng, steps):
    for step in steps:
        with torch.no_grad():
            for p in stage.parameters():
                p.add_(torch.from_numpy(rng.normal(size=tuple(p.shape)) * rng.choice([0.0, 1.0])))
        apf.observe(step, {0: stage})


@pytest.mark.parametrize("aggregate", ["scalar", "block"])
def test_state_dict_round_trip_reproduces_decisions(aggregate):
    stage, *_ = _stage_for_reference()
    cfg = APFConfig(alpha=0.9, threshold=0.5, check_interval=2, block_rows=2, aggregate=aggregate)
    first = APFMetric(cfg)
    _run(first, stage, np.random.default_rng(0), range(0, 15))
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    second = APFMetric(cfg)
    second.load_state_dict(torch.load(buf, weights_only=True))
    np.testing.assert_array_equal(second.candidates(0), first.candidates(0))
    rng = np.random.default_rng(5)
    for step in range(15, 40):
        with torch.no_grad():
            for p in stage.parameters():
                p.add_(torch.from_numpy(rng.normal(size=tuple(p.shape)) * rng.choice([0.0, 1.0])))
        first.observe(step, {0: stage})
        second.observe(step, {0: stage})
        a, b = first.stats(0), second.stats(0)
        np.testing.assert_array_equal(a.perturbation, b.perturbation)
        np.testing.assert_array_equal(a.wake, b.wake)
        assert a.threshold == b.threshold
    assert first.stats(0).round >= 19


def test_load_state_checks():
    stage = scalar_stage()
    apf = APFMetric(check_interval=1, block_rows=1)
    apf.observe(0, {0: stage})
    state = apf.state_dict()
    with pytest.raises(ValueError, match="threshold=0.05 \\(here 0.1\\)"):
        APFMetric(check_interval=1, block_rows=1, threshold=0.1).load_state_dict(state)
    with pytest.raises(ValueError, match="kind 'apf'"):
        from tfz.metrics import AutoFreezeMetric

        AutoFreezeMetric().load_state_dict(state)
    other = nn.Module()
    other.v = FreezableLinear(1, 1, bias=False).double()
    loaded = APFMetric(check_interval=1, block_rows=1)
    loaded.load_state_dict(state)
    with pytest.raises(ValueError, match="differ from the loaded state"):
        loaded.observe(1, {0: other})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": 1.0}, "alpha must be"),
        ({"alpha": 0}, "alpha must be"),
        ({"threshold": float("nan")}, "threshold must be"),
        ({"threshold": 0.0}, "threshold must be"),
        ({"check_interval": 0}, "check_interval must be"),
        ({"check_interval": 2.5}, "check_interval must be"),
        ({"tighten_ratio": 1.0}, "tighten_ratio must be"),
        ({"aggregate": "mean"}, "aggregate must be"),
        ({"block_rows": 0}, "block_rows must be"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        APFMetric(**kwargs)


def test_numpy_scalars_configure_like_python_numbers():
    """A config of numpy scalars is the config of the same Python numbers (plain types, so its
    state loads into a metric configured either way); bools and non-finite numbers are refused."""
    plain = APFConfig(alpha=0.5, threshold=0.25, check_interval=2, tighten_ratio=0.75, block_rows=2)
    numpy = APFConfig(
        alpha=np.float32(0.5),
        threshold=np.float16(0.25),
        check_interval=np.int64(2),
        tighten_ratio=np.float32(0.75),
        block_rows=np.int32(2),
        include_tensors=np.bool_(True),
    )
    assert dataclasses.asdict(numpy) == dataclasses.asdict(plain)
    assert [type(v) for v in dataclasses.asdict(numpy).values()] == [
        type(v) for v in dataclasses.asdict(plain).values()
    ]
    stage = scalar_stage()
    first = APFMetric(plain)
    first.observe(0, {0: stage})
    APFMetric(numpy).load_state_dict(first.state_dict())
    for name, bad in [
        ("alpha", True),
        ("alpha", np.float32("nan")),
        ("threshold", np.float64("inf")),
        ("check_interval", True),
        ("check_interval", np.float32(2)),
        ("tighten_ratio", np.bool_(False)),
        ("block_rows", np.bool_(True)),
        ("include_tensors", 1),
    ]:
        with pytest.raises(ValueError, match=f"{name} must be .*got {re.escape(repr(bad))}"):
            APFConfig(**{name: bad})


def test_bad_calls():
    apf = APFMetric()
    stage = scalar_stage()
    with pytest.raises(ValueError, match="step must be an integer >= 0, got -1"):
        apf.observe(-1, {0: stage})
    with pytest.raises(TypeError, match="stage_modules must be a mapping"):
        apf.observe(0, [stage])
    with pytest.raises(TypeError, match="torch.nn.Module"):
        apf.observe(0, {0: "stage"})
    with pytest.raises(ValueError, match="stage must be an integer >= 0, got -2"):
        apf.observe(0, {-2: stage})
    apf.observe(3, {0: stage})
    with pytest.raises(ValueError, match="got 3 after 3"):
        apf.observe(3, {0: stage})
    with pytest.raises(ValueError, match="stage 1 has not been observed"):
        apf.candidates(1)
    with pytest.raises(TypeError, match="APFConfig"):
        APFMetric(config={"alpha": 0.9})


def test_ddp_wrapped_stage_uses_the_inner_names(one_rank_group):
    from torch.nn.parallel import DistributedDataParallel

    stage = scalar_stage(0.0)
    wrapped = DistributedDataParallel(stage)
    apf = APFMetric(check_interval=1, block_rows=1)
    apf.observe(0, {0: wrapped})
    assert [u.name for u in apf.units(0).units] == ["w"]
    set_(stage.w.weight, 1.0)
    apf.observe(1, {0: wrapped})
    assert apf.stats(0).path[0] == pytest.approx(0.01)
