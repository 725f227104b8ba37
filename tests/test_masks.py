"""tfz.masks: ratio -> row-block masks, against brute force, closed-form probabilities and a subprocess."""

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from tfz.masks import (
    LayerSpec,
    RandomPolicy,
    StageMasks,
    StageUnits,
    TensorSpec,
    select,
    select_covering,
    select_row_arcs,
)
from tfz.nn import FreezableLinear, use_row_masks


def random_units(rng, max_layers=4, max_rows=40, block_rows=None, tensors=True):
    specs = [
        LayerSpec(f"l{i}", int(rng.integers(1, max_rows)), int(rng.integers(1, 30)))
        for i in range(int(rng.integers(1, max_layers + 1)))
    ]
    if tensors and rng.random() < 0.5:
        specs.insert(int(rng.integers(0, len(specs) + 1)), TensorSpec("norm", int(rng.integers(1, 50))))
    return StageUnits(tuple(specs), block_rows=block_rows or int(rng.integers(1, 17)))


def test_units_are_row_blocks_weighted_by_flops():
    units = StageUnits((LayerSpec("a", 10, 3), TensorSpec("norm", 7), LayerSpec("b", 4, 5)), block_rows=4)
    got = [(u.name, u.kind, u.start, u.stop, u.weight, u.position) for u in units.units]
    assert got == [
        ("a", "rows", 0, 4, 12, 0),
        ("a", "rows", 4, 8, 12, 1),
        ("a", "rows", 8, 10, 6, 2),
        ("norm", "tensor", 0, 0, 7, 3),
        ("b", "rows", 0, 4, 20, 4),
    ]
    assert units.total == 10 * 3 + 7 + 4 * 5
    assert units.bound == pytest.approx(20 / (2 * 57))


def test_units_from_module_in_model_order():
    stage = nn.Module()
    stage.emb = nn.Embedding(11, 4)
    stage.wq = FreezableLinear(4, 6)
    stage.norm = nn.LayerNorm(6)
    stage.plain = nn.Linear(6, 6)  # not row-freezable: a tensor unit at most
    stage.frozen = FreezableLinear(6, 2)
    stage.frozen.weight.requires_grad_(False)
    stage.out = FreezableLinear(6, 3, bias=False)
    only_rows = StageUnits.from_module(stage, block_rows=4)
    assert [s.name for s in only_rows.specs] == ["wq", "out"]
    full = StageUnits.from_module(stage, block_rows=4, include_tensors=True)
    assert [s.name for s in full.specs] == [
        "emb.weight",
        "wq",
        "norm.weight",
        "norm.bias",
        "plain.weight",
        "plain.bias",
        "frozen.bias",
        "out",
    ]
    assert full.specs[0] == TensorSpec("emb.weight", 44)
    assert full.specs[1] == LayerSpec("wq", 6, 4)


def _check_within_bound(units, ratio, masks):
    realised = masks.frozen_fraction
    assert abs(realised - ratio) <= units.bound + 1e-12
    unfrozen = units.weights[~masks.frozen]
    if unfrozen.size:  # the sharper bound: half the smallest unit left unfrozen
        assert abs(realised - ratio) <= unfrozen.min() / (2 * units.total) + 1e-12


def test_realised_fraction_within_bound_random_shapes():
    rng = np.random.default_rng(0)
    for case in range(300):
        units = random_units(rng)
        ratio = float(rng.choice([0.0, 1.0, rng.random()]))
        masks = select(units, ratio, stage=case % 3, microbatch=case, seed=case)
        _check_within_bound(units, ratio, masks)


def test_close_to_brute_force_optimum_on_tiny_cases():
    rng = np.random.default_rng(1)
    for case in range(150):
        units = random_units(rng, max_layers=3, max_rows=12, block_rows=int(rng.integers(3, 8)))
        if len(units) > 10:
            continue
        ratio = float(rng.random())
        masks = select(units, ratio, stage=1, microbatch=case)
        w, total = units.weights, units.total
        best = min(
            abs(sum(w[list(c)]) / total - ratio)
            for k in range(len(w) + 1)
            for c in itertools.combinations(range(len(w)), k)
        )
        err = abs(masks.frozen_fraction - ratio)
        assert best <= err + 1e-12
        assert err <= best + units.bound + 1e-12
        _check_within_bound(units, ratio, masks)


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.26, 0.5, 0.74, 0.99, 1.0])
def test_equal_blocks_give_the_nearest_multiple(ratio):
    units = StageUnits((LayerSpec("a", 64, 8), LayerSpec("b", 96, 8)), block_rows=16)  # 10 equal blocks
    masks = select(units, ratio, stage=0, microbatch=3)
    assert masks.frozen.sum() == round(ratio * 10)
    assert masks.frozen_fraction == pytest.approx(round(ratio * 10) / 10)


def test_extremes_and_mask_views():
    units = StageUnits((LayerSpec("a", 5, 2), TensorSpec("n", 3), LayerSpec("b", 3, 4)), block_rows=2)
    none = select(units, 0.0, stage=0, microbatch=0)
    assert not none.frozen.any() and none.frozen_fraction == 0.0 and none.frozen_tensors == frozenset()
    assert all(rows.all() for rows in none.active_rows.values())
    full = select(units, 1.0, stage=0, microbatch=0)
    assert full.frozen.all() and full.frozen_fraction == 1.0 and full.frozen_tensors == {"n"}
    assert all(not rows.any() for rows in full.active_rows.values())
    some = select(units, 0.5, stage=2, microbatch=1)
    rows = some.active_rows
    assert {name: r.shape for name, r in rows.items()} == {"a": (5,), "b": (3,)}
    for unit, frozen in zip(units.units, some.frozen):
        if unit.kind == "rows":
            assert (rows[unit.name][unit.start : unit.stop] == (not frozen)).all()
    assert "realised" in repr(some)


def _draw(seed, stage, microbatch, step):
    units = StageUnits((LayerSpec("a", 100, 8), LayerSpec("b", 70, 3), TensorSpec("n", 9)), block_rows=8)
    return select(units, 0.4, stage=stage, microbatch=microbatch, step=step, seed=seed).frozen


def test_same_seed_same_masks_across_processes():
    args = [(7, 0, 3, 2), (7, 1, 3, 2), (8, 1, 0, 0)]
    here = [_draw(*a).tolist() for a in args]
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); from test_masks import _draw; "
        f"print(json.dumps([_draw(*a).tolist() for a in {args!r}]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code, os.path.dirname(__file__)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout) == here
    assert here[0] != here[1]  # the stage enters the seed
    assert not np.array_equal(_draw(7, 1, 3, 2), _draw(7, 1, 3, 3))  # so does the decision step


def test_stage0_first_pick_follows_linear_weights():
    """P(unit i ranked first) = w_i / sum(w) with w linear from 1.0 to 0.1 (weighted sampling)."""
    units = StageUnits((LayerSpec("a", 3, 1),), block_rows=1).units
    weights = np.linspace(1.0, 0.1, 3)
    rng = np.random.default_rng(0)
    n = 20000
    counts = np.bincount(
        [RandomPolicy().rank(units, stage=0, microbatch=0, rng=rng)[0] for _ in range(n)], minlength=3
    )
    p = weights / weights.sum()
    sigma = np.sqrt(n * p * (1 - p))
    assert np.all(np.abs(counts - n * p) < 4 * sigma), (counts, n * p)
    uniform = np.bincount(
        [RandomPolicy().rank(units, stage=1, microbatch=0, rng=rng)[0] for _ in range(n)], minlength=3
    )
    assert np.all(np.abs(uniform - n / 3) < 4 * np.sqrt(n * (1 / 3) * (2 / 3))), uniform


def test_stage0_bias_visible_in_masks():
    units = StageUnits((LayerSpec("a", 80, 4), LayerSpec("b", 80, 4)), block_rows=8)  # 20 equal blocks
    draws = 400
    freq = {stage: np.zeros(len(units)) for stage in (0, 1)}
    for stage in (0, 1):
        for mb in range(draws):
            freq[stage] += select(units, 0.3, stage=stage, microbatch=mb, seed=5).frozen
    front, back = freq[0][:5].sum() / (5 * draws), freq[0][-5:].sum() / (5 * draws)
    assert front > back + 0.2, (front, back)
    front1, back1 = freq[1][:5].sum() / (5 * draws), freq[1][-5:].sum() / (5 * draws)
    assert abs(front1 - back1) < 0.08, (front1, back1)
    assert freq[1].sum() == 0.3 * len(units) * draws  # exactly 6 of 20 blocks each time


class Reverse:
    def rank(self, units, *, stage, microbatch, rng):
        return np.arange(len(units))[::-1]


class Broken:
    def rank(self, units, *, stage, microbatch, rng):
        return np.zeros(len(units), dtype=int)


def test_custom_policy_plugs_in():
    units = StageUnits((LayerSpec("a", 4, 1), LayerSpec("b", 4, 1)), block_rows=2)
    masks = select(units, 0.5, stage=0, microbatch=0, policy=Reverse())
    assert masks.frozen.tolist() == [False, False, True, True]
    with pytest.raises(ValueError, match="permutation"):
        select(units, 0.5, stage=0, microbatch=0, policy=Broken())
    with pytest.raises(TypeError, match="rank"):
        select(units, 0.5, stage=0, microbatch=0, policy=object())


def test_bad_input_raises():
    units = StageUnits((LayerSpec("a", 4, 1),))
    for ratio in (-0.1, 1.5, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match="ratio"):
            select(units, ratio, stage=0, microbatch=0)
    with pytest.raises(ValueError, match="stage"):
        select(units, 0.5, stage=-1, microbatch=0)
    with pytest.raises(ValueError, match="step"):
        select(units, 0.5, stage=0, microbatch=0, step=1.5)
    with pytest.raises(ValueError, match="block_rows"):
        StageUnits((LayerSpec("a", 4, 1),), block_rows=0)
    with pytest.raises(ValueError, match="duplicate"):
        StageUnits((LayerSpec("a", 4, 1), TensorSpec("a", 3)))
    with pytest.raises(ValueError, match="no specs"):
        StageUnits(())
    with pytest.raises(ValueError, match="out_features of 'x'"):
        LayerSpec("x", 0, 3)
    with pytest.raises(ValueError, match="last_weight"):
        RandomPolicy(last_weight=0.0)
    with pytest.raises(TypeError, match="StageUnits"):
        select([LayerSpec("a", 4, 1)], 0.5, stage=0, microbatch=0)


def test_numpy_scalars_are_numbers():
    """numpy integers and floats give what the same plain Python numbers give; bools and
    non-finite numbers are refused naming the argument."""
    units = StageUnits((LayerSpec("a", np.int64(8), np.int32(3)), TensorSpec("n", np.int64(5))), block_rows=2)
    assert units.units == StageUnits((LayerSpec("a", 8, 3), TensorSpec("n", 5)), block_rows=2).units
    assert type(units.specs[0].out_features) is int and type(units.block_rows) is int
    plain = select(units, 1, stage=1, microbatch=2, step=3, seed=4)
    got = select(
        units, np.int64(1), stage=np.int64(1), microbatch=np.int32(2), step=np.uint8(3), seed=np.int16(4)
    )
    assert np.array_equal(got.frozen, plain.frozen) and type(got.ratio) is float
    half = select(units, 0.5, stage=0, microbatch=0, policy=RandomPolicy(first_weight=2.0))
    got = select(units, np.float32(0.5), stage=0, microbatch=0, policy=RandomPolicy(first_weight=np.int64(2)))
    assert np.array_equal(got.frozen, half.frozen)
    covering = select_covering(units, [np.float64(0.5), np.int64(0)], stage=np.int64(0))
    assert [c.frozen.tolist() for c in covering] == [
        c.frozen.tolist() for c in select_covering(units, [0.5, 0], stage=0)
    ]
    for bad in (True, np.bool_(True), float("inf"), np.float32("nan")):
        with pytest.raises(ValueError, match=r"first_weight must be a finite number > 0, got"):
            RandomPolicy(first_weight=bad)
        with pytest.raises(ValueError, match=r"ratio must be a finite number in \[0, 1\], got"):
            select(units, bad, stage=0, microbatch=0)
    with pytest.raises(ValueError, match=r"stage must be an integer >= 0, got np.True_"):
        select(units, 0.5, stage=np.bool_(True), microbatch=0)
    biased = RandomPolicy(front_bias_stages=[np.int64(1)], first_weight=2.0)
    assert biased.front_bias_stages == (1,) and type(biased.front_bias_stages[0]) is int
    got = select(units, 0.5, stage=1, microbatch=0, policy=biased)
    plain_policy = RandomPolicy(front_bias_stages=(1,), first_weight=2.0)
    plain = select(units, 0.5, stage=1, microbatch=0, policy=plain_policy)
    assert np.array_equal(got.frozen, plain.frozen)
    for bad, shown in ((0, "0"), ("0", "'0'"), ((0, -1), "-1"), ((True,), "True")):
        with pytest.raises(ValueError, match=f"front_bias_stages.* got {shown}"):
            RandomPolicy(front_bias_stages=bad)


def test_for_module_feeds_use_row_masks():
    torch.manual_seed(0)
    stage = nn.Sequential(FreezableLinear(3, 8), nn.ReLU(), FreezableLinear(8, 4))
    units = StageUnits.from_module(stage, block_rows=2)
    masks: StageMasks = select(units, 0.5, stage=1, microbatch=2)
    mapping = masks.for_module(stage)
    assert set(mapping) == {stage[0], stage[2]}
    x = torch.randn(5, 3)
    with use_row_masks(mapping):
        stage(x).sum().backward()
    for name, rows in masks.active_rows.items():
        layer = stage.get_submodule(name)
        grad = layer.weight.grad
        if grad is None:
            assert not rows.any()
            continue
        assert (grad[torch.from_numpy(~rows)] == 0).all()
        assert layer.row_usage.counts.tolist() == rows.astype(int).tolist()


# ---------------------------------------------------------------- covering layout


def test_covering_realised_fractions_within_bound_and_arcs_take_turns():
    rng = np.random.default_rng(3)
    for case in range(200):
        units = random_units(rng)
        M = int(rng.integers(1, 9))
        ratios = [float(rng.choice([0.0, 1.0, rng.random()])) for _ in range(M)]
        masks = select_covering(units, ratios, stage=case % 3, step=case, seed=case)
        assert len(masks) == M
        for r, m in zip(ratios, masks):  # an arc ends at the unit nearest the target: max weight / 2
            assert abs(m.frozen_fraction - r) <= units.bound + 1e-12
        # the trainable arcs, laid end to end, cover the circle once per full turn: every unit trains
        # floor(k) or ceil(k) times, k = the number of turns (uniform only for equal weights, so count it)
        trained = np.sum([~m.frozen for m in masks], axis=0)
        turns = sum(int((~m.frozen).sum()) for m in masks) / len(units)
        assert trained.min() >= np.floor(turns) and trained.max() <= np.ceil(turns)


def test_covering_trains_every_unit_when_the_ratios_allow():
    units = StageUnits((LayerSpec("a", 640, 8), LayerSpec("b", 960, 8)), block_rows=16)  # 100 equal blocks
    masks = select_covering(units, [0.8] * 8, stage=1, step=4, seed=0)
    trained = np.sum([~m.frozen for m in masks], axis=0)
    assert all(m.frozen.sum() == 80 for m in masks)
    assert trained.min() == 1 and trained.max() == 2 and trained.sum() == 160
    # independent draws leave some unit frozen in all 8 microbatches (about 0.8^8 = 17% of them)
    independent = [select(units, 0.8, stage=1, microbatch=mb, step=4) for mb in range(8)]
    assert (np.sum([~m.frozen for m in independent], axis=0) == 0).sum() > 5


def test_covering_is_deterministic_and_follows_the_policy_order():
    units = StageUnits((LayerSpec("a", 64, 8), LayerSpec("b", 96, 8)), block_rows=16)
    a = select_covering(units, [0.5, 0.7, 0.2], stage=0, step=2, seed=7)
    b = select_covering(units, [0.5, 0.7, 0.2], stage=0, step=2, seed=7)
    assert all(np.array_equal(x.frozen, y.frozen) for x, y in zip(a, b))

    class Fixed:
        def rank(self, units, *, stage, microbatch, rng):
            return np.arange(len(units))[::-1]

    # circle 9, 8, ..., 0: microbatch 0 trains 9..5, microbatch 1 trains the next 3 (4..2)
    c = select_covering(units, [0.5, 0.7], stage=0, policy=Fixed())
    assert np.flatnonzero(~c[0].frozen).tolist() == [5, 6, 7, 8, 9]
    assert np.flatnonzero(~c[1].frozen).tolist() == [2, 3, 4]
    with pytest.raises(ValueError, match=r"ratios\[1\] must be a finite number in \[0, 1\], got 1.5"):
        select_covering(units, [0.5, 1.5], stage=0)
    with pytest.raises(ValueError, match="step must be an integer >= 0, got -1"):
        select_covering(units, [0.5], stage=0, step=-1)


# ---------------------------------------------------------------- row arcs layout


def _circles(units):
    """{name: [positions of its units in row order]}: each layer's blocks and each whole tensor."""
    out = {}
    for u in units.units:
        out.setdefault(u.name, []).append(u.position)
    return out


def _circular_runs(flags):
    """Runs of True in ``flags`` read as a circle (a run through the end and the start counts once)."""
    flags = np.asarray(flags, dtype=bool)
    if flags.all():
        return 1
    return int((flags & ~np.roll(flags, 1)).sum())


def test_row_arcs_train_one_run_of_every_layer_and_take_turns():
    rng = np.random.default_rng(5)
    for case in range(300):
        units = random_units(rng)
        M = int(rng.integers(1, 9))
        ratios = [float(rng.choice([0.0, 1.0, rng.random()])) for _ in range(M)]
        masks = select_row_arcs(units, ratios, stage=case % 3, step=case, seed=case)
        assert len(masks) == M
        circles = _circles(units)
        # each layer is off its share by less than its largest block: the stage by less than their sum
        slack = sum(units.weights[pos].max() for pos in circles.values()) / units.total
        for r, m in zip(ratios, masks):
            assert abs(m.frozen_fraction - r) < slack + 1e-12
            for pos in circles.values():
                trained = ~m.frozen[pos]
                assert _circular_runs(trained) <= 1  # one arc per circle, possibly through its end
                w = units.weights[pos]
                assert abs(w[trained].sum() - (1 - r) * w.sum()) < w.max()
        # per circle, the arcs laid end to end cover k = sum(1 - r) turns: every block trains floor(k)
        # or ceil(k) times
        k = sum(1 - r for r in ratios)
        for pos in circles.values():
            trained = np.sum([~m.frozen[pos] for m in masks], axis=0)
            assert trained.min() >= np.floor(k - 1e-9) and trained.max() <= np.ceil(k + 1e-9)


def test_row_arcs_follow_each_other_round_the_circle():
    units = StageUnits((LayerSpec("a", 160, 8), LayerSpec("b", 96, 8)), block_rows=16)  # 10 + 6 blocks
    masks = select_row_arcs(units, [0.5, 0.75, 0.0, 1.0], stage=0, step=3, seed=1)
    for name, n in (("a", 10), ("b", 6)):
        pos = np.array(_circles(units)[name])
        arcs = [np.flatnonzero(~m.frozen[pos]) for m in masks]
        assert [len(a) for a in arcs][2:] == [n, 0]  # ratio 0 trains the whole circle, ratio 1 nothing
        # the second arc starts on the block after the first one's last (mod n)
        first, second = (set(a.tolist()) for a in arcs[:2])
        end = next(b for b in first if (b + 1) % n not in first)
        assert (end + 1) % n in second and not first & second
    assert masks[2].frozen_fraction == 0.0 and masks[3].frozen_fraction == 1.0


def test_row_arcs_shares_are_unbiased_and_redrawn_per_step():
    # blocks of 3, 3, 1 rows at ratio 0.6: every block trains with probability 0.4, whatever its size
    units = StageUnits((LayerSpec("a", 7, 4), LayerSpec("b", 7, 4)), block_rows=3)
    draws = [select_row_arcs(units, [0.6] * 3, stage=0, step=k) for k in range(3000)]
    trained = np.array([[~m.frozen for m in masks] for masks in draws]).reshape(-1, len(units))
    assert np.abs(trained.mean(axis=0) - 0.4).max() < 4 * np.sqrt(0.24 / 3000)  # 4 sigma per step
    a = select_row_arcs(units, [0.5, 0.7], stage=1, step=2, seed=7)
    b = select_row_arcs(units, [0.5, 0.7], stage=1, step=2, seed=7)
    assert all(np.array_equal(x.frozen, y.frozen) for x, y in zip(a, b))
    others = [select_row_arcs(units, [0.5, 0.7], stage=1, step=s, seed=7)[0].frozen for s in range(3, 9)]
    assert any(not np.array_equal(a[0].frozen, o) for o in others)


def test_row_arcs_masked_dw_needs_no_gather():
    """Every layer's active rows form at most two runs (one arc, cut where it wraps), below the CPU
    torch backend's gather threshold; scattered covering blocks do not."""
    from tfz.kernels._wgrad_torch import GATHER_MIN_RUNS

    layers = tuple(LayerSpec(f"l{i}", 384 if i % 2 else 1536, 64) for i in range(6))
    units = StageUnits(layers, block_rows=32)
    runs = {}
    for name, draw in (("arcs", select_row_arcs), ("cover", select_covering)):
        per_layer = []
        for m in draw(units, [0.8] * 8, stage=1, step=4):
            for rows in m.active_rows.values():
                edges = np.diff(np.concatenate([[0], rows.astype(np.int8), [0]]))
                per_layer.append(int((edges == 1).sum()))
        runs[name] = max(per_layer)
    assert runs["arcs"] <= 2 < GATHER_MIN_RUNS <= runs["cover"]


def test_row_arcs_reject_bad_values():
    units = StageUnits((LayerSpec("a", 64, 8),), block_rows=16)
    with pytest.raises(ValueError, match=r"ratios\[1\] must be a finite number in \[0, 1\], got 1.5"):
        select_row_arcs(units, [0.5, 1.5], stage=0)
    with pytest.raises(ValueError, match="step must be an integer >= 0, got -1"):
        select_row_arcs(units, [0.5], stage=0, step=-1)
    with pytest.raises(TypeError, match="units must be StageUnits, got list"):
        select_row_arcs([], [0.5], stage=0)
