"""tfz.metrics hybrids and freezers: LP ratio kept, candidates preferred, same masks everywhere, state."""

import io
import math
import re

import numpy as np
import pytest
import torch
from torch import nn

from tfz.masks import LayerSpec, RandomPolicy, StageMasks, StageUnits, TensorSpec, select
from tfz.metrics import (
    APFFreezer,
    APFMetric,
    AutoFreezeFreezer,
    FreezeMetric,
    FreezePolicy,
    MetricFreezer,
    MetricGuidedPolicy,
)
from tfz.nn import FreezableLinear


class FixedMetric:
    """A metric with given candidates and scores (a test double of the FreezeMetric protocol)."""

    def __init__(self, units, candidates, scores=None, stage=0):
        self._units = {stage: units}
        self._cand = {stage: np.asarray(candidates, dtype=bool)}
        self._scores = {stage: np.zeros(len(units)) if scores is None else np.asarray(scores, float)}
        self.observed = []

    def observe(self, step, stage_modules):
        self.observed.append(step)

    def units(self, stage):
        return self._units.get(stage)

    def candidates(self, stage):
        return self._cand[stage].copy()

    def scores(self, stage):
        return self._scores[stage].copy()

    def state_dict(self):
        return {"cand": {s: c.tolist() for s, c in self._cand.items()}}

    def load_state_dict(self, state):
        self._cand = {s: np.asarray(c, dtype=bool) for s, c in state["cand"].items()}


def random_units(rng):
    specs = [LayerSpec(f"l{i}", int(rng.integers(1, 40)), int(rng.integers(1, 30))) for i in range(3)]
    if rng.random() < 0.5:
        specs.insert(1, TensorSpec("norm", int(rng.integers(1, 50))))
    return StageUnits(tuple(specs), block_rows=int(rng.integers(2, 9)))


def equal_units(n, block_rows=4):
    return StageUnits((LayerSpec("a", n * block_rows, 3),), block_rows=block_rows)


def test_protocols():
    units = equal_units(4)
    assert isinstance(FixedMetric(units, [0, 1, 0, 0]), FreezeMetric)
    assert isinstance(MetricGuidedPolicy(APFMetric()), FreezePolicy)
    assert not isinstance(RandomPolicy(), FreezePolicy)


@pytest.mark.parametrize("mode", ["rank", "sample"])
def test_realised_fraction_within_the_bound_of_random_selection(mode):
    rng = np.random.default_rng(0)
    for case in range(200):
        units = random_units(rng)
        cand = rng.random(len(units)) < rng.random()
        policy = MetricGuidedPolicy(FixedMetric(units, cand, rng.random(len(units))), mode)
        ratio = float(rng.choice([0.0, 1.0, rng.random()]))
        guided = select(units, ratio, stage=0, microbatch=case % 4, step=case, policy=policy)
        random = select(units, ratio, stage=0, microbatch=case % 4, step=case, policy=RandomPolicy())
        for masks in (guided, random):
            assert abs(masks.frozen_fraction - ratio) <= units.bound + 1e-12
            left = units.weights[~masks.frozen]
            if left.size:
                assert abs(masks.frozen_fraction - ratio) <= left.min() / (2 * units.total) + 1e-12


@pytest.mark.parametrize("mode", ["rank", "sample"])
@pytest.mark.parametrize("ratio", [0.0, 0.13, 0.5, 0.77, 1.0])
def test_equal_units_same_count_as_random(mode, ratio):
    units = equal_units(30)
    cand = np.arange(30) % 3 == 0
    policy = MetricGuidedPolicy(FixedMetric(units, cand), mode)
    guided = select(units, ratio, stage=0, microbatch=1, policy=policy)
    random = select(units, ratio, stage=0, microbatch=1)
    assert guided.frozen.sum() == random.frozen.sum() == round(ratio * 30)


def test_rank_mode_freezes_all_candidates_before_any_other():
    units = equal_units(40)
    rng = np.random.default_rng(1)
    cand = np.zeros(40, dtype=bool)
    cand[rng.choice(40, 12, replace=False)] = True
    scores = rng.random(40)
    policy = MetricGuidedPolicy(FixedMetric(units, cand, scores), "rank")
    strongest = np.flatnonzero(cand)[np.argsort(-scores[cand])]
    for k in range(41):
        for mb in range(3):
            frozen = select(units, k / 40, stage=0, microbatch=mb, step=k, policy=policy).frozen
            assert frozen.sum() == k
            if k >= 12:
                assert frozen[cand].all()
            else:  # budget below the candidates: the k strongest, the same in every microbatch
                assert not frozen[~cand].any()
                assert set(np.flatnonzero(frozen)) == set(strongest[:k])


def test_rank_mode_breaks_ties_at_random_per_microbatch():
    units = equal_units(20)
    cand = np.arange(20) < 10
    policy = MetricGuidedPolicy(FixedMetric(units, cand), "rank")  # all scores equal
    chosen = set()
    for mb in range(8):
        frozen = select(units, 4 / 20, stage=0, microbatch=mb, policy=policy).frozen
        assert frozen.sum() == 4 and not frozen[~cand].any()
        chosen.add(tuple(np.flatnonzero(frozen)))
    assert len(chosen) > 1


def test_sample_mode_first_draw_probability():
    # one unit of budget: the frozen unit is the first successive-sampling draw, a candidate with
    # probability c / (c + 0.01 m)
    units = equal_units(100)
    cand = np.arange(100) < 5
    sample = MetricGuidedPolicy(FixedMetric(units, cand), "sample")
    ranked = MetricGuidedPolicy(FixedMetric(units, cand), "rank")
    n = 3000
    hits = 0
    for step in range(n):
        frozen = select(units, 0.01, stage=0, microbatch=0, step=step, policy=sample).frozen
        assert frozen.sum() == 1
        hits += bool(frozen[cand].any())
    p = 5 / (5 + 0.01 * 95)
    assert abs(hits / n - p) <= 4 * math.sqrt(p * (1 - p) / n)
    assert all(
        select(units, 0.01, stage=0, microbatch=0, step=s, policy=ranked).frozen[cand].any()
        for s in range(50)
    )


def test_sample_mode_prefers_candidates_statistically():
    units = equal_units(50)
    cand = np.arange(50) % 5 == 0  # 10 candidates
    policy = MetricGuidedPolicy(FixedMetric(units, cand), "sample")
    counts = np.zeros(50)
    for step in range(400):
        counts += select(units, 0.1, stage=0, microbatch=0, step=step, policy=policy).frozen
    # 5 of 10 candidates per draw, non-candidates rarely: means differ by far more than their spread
    assert counts[cand].mean() / 400 > 0.4 and counts[~cand].mean() / 400 < 0.02


def test_unobserved_stage_orders_at_random_and_keeps_the_ratio():
    apf = APFMetric(block_rows=4)
    policy = MetricGuidedPolicy(apf)
    units = equal_units(10)
    masks = select(units, 0.3, stage=2, microbatch=0, policy=policy)
    assert masks.frozen.sum() == 3


def tiny_stage(seed=0):
    torch.manual_seed(seed)
    stage = nn.Module()
    stage.a = FreezableLinear(4, 16)
    stage.norm = nn.LayerNorm(16)
    stage.b = FreezableLinear(16, 8, bias=False)
    return stage


def drive(metric_or_policy, stages, steps, seed=0):
    """Row blocks 0, 2, ... of every layer (and their bias rows) and norm.bias drift steadily; the other
    blocks and norm.weight never move, so APF makes them candidates."""
    rng = np.random.default_rng(seed)
    for step in steps:
        with torch.no_grad():
            for stage in stages:
                for name, p in stage.named_parameters():
                    rows = p.view(p.shape[0], -1)
                    moving = (torch.arange(rows.shape[0]) // 4) % 2 == 0
                    if name == "norm.weight":
                        moving[:] = False
                    elif name == "norm.bias":
                        moving[:] = True
                    size = tuple(rows.shape)
                    rows.add_(torch.from_numpy(rng.uniform(0.5, 1.5, size=size)).float() * moving[:, None])
        metric_or_policy.observe(step, dict(enumerate(stages)))


def test_units_must_match_the_metrics_block_rows():
    stage = tiny_stage()
    policy = MetricGuidedPolicy(APFMetric(block_rows=4))
    policy.observe(0, {0: stage})
    other = StageUnits.from_module(stage, block_rows=8)
    with pytest.raises(ValueError, match="block_rows=4"):
        select(other, 0.5, stage=0, microbatch=0, policy=policy)
    rows_only = StageUnits.from_module(stage, block_rows=4)  # a subset of the metric's units is fine
    assert select(rows_only, 0.5, stage=0, microbatch=0, policy=policy).frozen.sum() > 0


@pytest.mark.parametrize("mode", ["rank", "sample"])
def test_identical_masks_on_every_process_and_after_a_state_round_trip(mode):
    stage_a, stage_b = tiny_stage(0), tiny_stage(0)  # two "ranks" holding copies of the same stage
    p1 = MetricGuidedPolicy.apf(check_interval=1, threshold=0.5, alpha=0.5, block_rows=4, mode=mode)
    p2 = MetricGuidedPolicy.apf(check_interval=1, threshold=0.5, alpha=0.5, block_rows=4, mode=mode)
    drive(p1, [stage_a], range(8), seed=3)
    drive(p2, [stage_b], range(8), seed=3)
    assert p1.metric.candidates(0).any()
    buf = io.BytesIO()
    torch.save(p1.state_dict(), buf)
    buf.seek(0)
    p3 = MetricGuidedPolicy.apf(check_interval=1, threshold=0.5, alpha=0.5, block_rows=4, mode=mode)
    p3.load_state_dict(torch.load(buf, weights_only=True))
    units = StageUnits.from_module(stage_a, block_rows=4, include_tensors=True)
    for mb in range(4):
        for step in range(3):
            got = [
                select(units, 0.4, stage=0, microbatch=mb, step=step, seed=7, policy=p).frozen
                for p in (p1, p2, p3)
            ]
            np.testing.assert_array_equal(got[0], got[1])
            np.testing.assert_array_equal(got[0], got[2])
    with pytest.raises(ValueError, match="mode="):
        MetricGuidedPolicy.apf(
            check_interval=1,
            threshold=0.5,
            alpha=0.5,
            block_rows=4,
            mode="sample" if mode == "rank" else "rank",
        ).load_state_dict(p1.state_dict())


def test_policy_forwards_observe_and_validates():
    units = equal_units(3)
    metric = FixedMetric(units, [1, 0, 0])
    policy = MetricGuidedPolicy(metric)
    policy.observe(5, {})
    assert metric.observed == [5]
    with pytest.raises(ValueError, match="mode must be"):
        MetricGuidedPolicy(metric, mode="top")
    for bad in (0.0, 1.5, True, np.float32("nan")):
        message = r"other_weight must be a finite number in \(0, 1\], got " + re.escape(repr(bad))
        with pytest.raises(ValueError, match=message):
            MetricGuidedPolicy(metric, mode="sample", other_weight=bad)
    weight = MetricGuidedPolicy(metric, mode="sample", other_weight=np.float32(0.5)).other_weight
    assert weight == 0.5 and type(weight) is float
    with pytest.raises(ValueError, match="microbatch must be an integer >= 0, got np.True_"):
        MetricFreezer(metric).masks_for(0, np.bool_(True))
    with pytest.raises(TypeError, match="FreezeMetric"):
        MetricGuidedPolicy(object())


# -- freezers -------------------------------------------------------------------------------------


def test_freezer_masks_are_the_candidates_for_every_microbatch():
    units = equal_units(6)
    metric = FixedMetric(units, [1, 0, 1, 0, 0, 0])
    freezer = MetricFreezer(metric)
    m0 = freezer.masks_for(0, 0)
    assert isinstance(m0, StageMasks)
    assert all(freezer.masks_for(0, mb) is m0 for mb in range(5))
    np.testing.assert_array_equal(m0.frozen, metric.candidates(0))
    assert m0.ratio == m0.frozen_fraction == pytest.approx(2 / 6) == freezer.frozen_fraction(0)
    assert freezer.masks_for(1, 0) is None and freezer.frozen_fraction(1) == 0.0  # unknown stage
    metric._cand[0] = np.array([0, 0, 0, 0, 0, 1], dtype=bool)
    m1 = freezer.masks_for(0, 3)
    assert m1 is not m0 and m1.frozen.tolist() == [False] * 5 + [True]
    with pytest.raises(ValueError, match="microbatch must be an integer >= 0, got -1"):
        freezer.masks_for(0, -1)
    with pytest.raises(ValueError, match="stage must be an integer >= 0, got 'x'"):
        freezer.masks_for("x", 0)


def test_apf_freezer_tracks_its_metric_and_round_trips():
    stage = tiny_stage()
    freezer = APFFreezer(check_interval=1, threshold=0.5, alpha=0.5, block_rows=4)
    assert freezer.masks_for(0, 0) is None
    drive(freezer, [stage], range(7), seed=1)  # still blocks: judged at rounds 0, 2, 5, frozen after
    masks = freezer.masks_for(0, 2)
    np.testing.assert_array_equal(masks.frozen, freezer.metric.candidates(0))
    assert 0 < masks.frozen_fraction < 1
    state = freezer.state_dict()
    again = APFFreezer(check_interval=1, threshold=0.5, alpha=0.5, block_rows=4)
    again.load_state_dict(state)
    np.testing.assert_array_equal(again.masks_for(0, 0).frozen, masks.frozen)
    with pytest.raises(ValueError, match="'metric' entry"):
        again.load_state_dict({})


def test_autofreeze_freezer_is_a_mask_provider():
    from tfz.masks import MaskProvider

    freezer = AutoFreezeFreezer(percentile=80, interval=2)
    assert isinstance(freezer, MaskProvider)
    assert freezer.metric.config.percentile == 80
