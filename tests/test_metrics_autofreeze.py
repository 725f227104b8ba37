"""tfz.metrics.autofreeze: hand-computed change rates and percentiles, the monotonic prefix, a reference."""

import dataclasses
import io
import re

import numpy as np
import pytest
import torch
from torch import nn

from tfz.metrics import AutoFreezeConfig, AutoFreezeMetric
from tfz.nn import FreezableLinear


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = FreezableLinear(2, 1, bias=False).double()  # 2 scalars, one row unit
        self.scale = nn.Parameter(torch.ones(1, dtype=torch.float64))  # a tensor unit


def layered_stage(layer_ids, *, embed=False, head=False):
    stage = nn.Module()
    if embed:
        stage.tok_embeddings = nn.Embedding(3, 2).double()
    stage.layers = nn.ModuleDict({str(i): Layer() for i in layer_ids})
    if head:
        stage.norm = nn.LayerNorm(2).double()
        stage.output = FreezableLinear(2, 3, bias=False).double()
    return stage


def set_grads(stage, proj_grads, extra=None):
    """proj_grads: {layer id: 2 values}; every other parameter gets ``extra`` (None or a fill value)."""
    for p in stage.parameters():
        p.grad = None if extra is None else torch.full_like(p, extra)
    for i, g in proj_grads.items():
        stage.layers[str(i)].proj.weight.grad = torch.tensor([g], dtype=torch.float64)


def names_of(metric, stage_id, flags):
    units = metric.units(stage_id).units
    return sorted(u.name for u, f in zip(units, flags) if f)


def run_two_windows(metric, stage, window2):
    """Window 1 (steps 0, 1): every layer sums to [5, 5] through [6, 0] + [-1, 5]; window 2 (steps 2, 3)
    sums to [G/2, G/2] through [G/2, 0] + [0, G/2]."""
    ids = list(window2)
    set_grads(stage, {i: [6.0, 0.0] for i in ids})
    metric.observe(0, {0: stage})
    set_grads(stage, {i: [-1.0, 5.0] for i in ids})
    metric.observe(1, {0: stage})
    assert metric.stats(0).checks == 1 and metric.stats(0).prefix == 0  # first interval: baseline only
    assert not metric.candidates(0).any()
    set_grads(stage, {i: [g / 2, 0.0] for i, g in window2.items()})
    metric.observe(2, {0: stage})
    set_grads(stage, {i: [0.0, g / 2] for i, g in window2.items()})
    metric.observe(3, {0: stage})


def test_hand_computed_grad_mode_median():
    stage = layered_stage([0, 1, 2, 3], embed=True, head=True)
    af = AutoFreezeMetric(interval=2, block_rows=1)
    run_two_windows(af, stage, {0: 9.0, 1: 8.0, 2: 5.0, 3: 2.0})
    s = af.stats(0)
    np.testing.assert_allclose(s.norms, [9, 8, 5, 2])
    np.testing.assert_allclose(s.change, [0.1, 0.2, 0.5, 0.8])  # |10 - G| / 10
    assert s.tau == pytest.approx(0.35)  # median of 0.1, 0.2, 0.5, 0.8
    assert s.prefix == 2 and s.layers == (0, 1, 2, 3)  # first layer with c >= 0.35 is layer 2
    assert names_of(af, 0, af.candidates(0)) == [
        "layers.0.proj",
        "layers.0.scale",
        "layers.1.proj",
        "layers.1.scale",
        "tok_embeddings.weight",
    ]


def test_hand_computed_norm_mode_sums_step_norms():
    stage = layered_stage([0, 1, 2, 3])
    af = AutoFreezeMetric(interval=2, block_rows=1, accumulate="norm")
    run_two_windows(af, stage, {0: 9.0, 1: 8.0, 2: 5.0, 3: 2.0})
    s = af.stats(0)
    # window 1: |6| + |-1| + |5| = 12 per layer (no cancellation across steps), window 2: G
    np.testing.assert_allclose(s.change, [3 / 12, 4 / 12, 7 / 12, 10 / 12])
    assert s.tau == pytest.approx((4 / 12 + 7 / 12) / 2)
    assert s.prefix == 2


def test_percentile_80():
    stage = layered_stage([0, 1, 2, 3])
    af = AutoFreezeMetric(interval=2, block_rows=1, percentile=80)
    run_two_windows(af, stage, {0: 9.0, 1: 8.0, 2: 5.0, 3: 2.0})
    s = af.stats(0)
    assert s.tau == pytest.approx(0.5 + 0.4 * (0.8 - 0.5))  # rank 0.8 * 3 = 2.4 between 0.5 and 0.8
    assert s.prefix == 3


def test_prefix_is_monotonic_and_frozen_layers_are_not_judged():
    stage = layered_stage([0, 1, 2, 3], embed=True)
    af = AutoFreezeMetric(interval=2, block_rows=1)
    run_two_windows(af, stage, {0: 9.0, 1: 8.0, 2: 5.0, 3: 2.0})
    frozen = af.candidates(0)
    assert af.stats(0).prefix == 2
    # window 3: frozen layers 0, 1 get huge gradients (as if they became "unstable"); layers 2, 3
    # repeat their norms: c = 0 for both, tau = 0. A scan from layer 0 would return 0 (unfreeze all).
    set_grads(stage, {0: [1e6, -3e5], 1: [7e4, 0.0], 2: [2.5, 0.0], 3: [1.0, 0.0]})
    af.observe(4, {0: stage})
    set_grads(stage, {0: [0.0, 9e5], 1: [0.0, 1.0], 2: [0.0, 2.5], 3: [0.0, 1.0]})
    af.observe(5, {0: stage})
    s = af.stats(0)
    assert s.tau == 0 and s.prefix == 2
    assert np.isnan(s.change[:2]).all() and s.norms[0] == 0  # frozen layers: not accumulated, not judged
    np.testing.assert_array_equal(af.candidates(0), frozen)
    # window 4: layer 2 barely changes, layer 3 doubles: tau = (0.1 + 1) / 2, layer 2 freezes
    set_grads(stage, {2: [5.5, 0.0], 3: [4.0, 0.0]})
    af.observe(6, {0: stage})
    set_grads(stage, {2: [0.0, 0.0], 3: [0.0, 0.0]})
    af.observe(7, {0: stage})
    s = af.stats(0)
    np.testing.assert_allclose(s.change[2:], [0.1, 1.0])
    assert s.prefix == 3
    assert (af.candidates(0) >= frozen).all()
    # the last layer always stays active
    for step in range(8, 30):
        set_grads(stage, {3: [float(np.cos(step)), 1.0]})
        af.observe(step, {0: stage})
        assert af.stats(0).prefix == 3


def test_unknown_change_rate_bounds_the_prefix():
    stage = layered_stage([0, 1, 2, 3])
    af = AutoFreezeMetric(interval=1, block_rows=1)
    set_grads(stage, {0: [1.0, 0.0], 1: [0.0, 0.0], 2: [1.0, 0.0], 3: [1.0, 0.0]})
    af.observe(0, {0: stage})
    # layer 1 had G = 0: its c is unknown and it counts as changing
    set_grads(stage, {0: [1.0, 0.0], 1: [3.0, 0.0], 2: [1.0, 0.0], 3: [5.0, 0.0]})
    af.observe(1, {0: stage})
    s = af.stats(0)
    assert np.isnan(s.change[1]) and s.change[0] == 0 and s.change[3] == 4
    assert s.tau == pytest.approx(0.0)  # median of 0, 0, 4
    assert s.prefix == 0  # layer 0 has c = 0 >= tau


def test_per_stage_prefix_embeddings_and_head():
    s0 = layered_stage([0, 1, 2], embed=True)
    s1 = layered_stage([3, 4, 5], head=True)
    af = AutoFreezeMetric(interval=1, block_rows=1)
    g1 = {i: [10.0, 0.0] for i in range(6)}
    g2 = {0: [9.0, 0.0], 1: [5.0, 0.0], 2: [1.0, 0.0], 3: [9.9, 0.0], 4: [9.8, 0.0], 5: [1.0, 0.0]}
    for step, grads in enumerate((g1, g2)):
        set_grads(s0, {i: g for i, g in grads.items() if i < 3}, extra=1.0)
        set_grads(s1, {i: g for i, g in grads.items() if i >= 3}, extra=1.0)
        af.observe(step, {0: s0, 1: s1})
    # G includes the scale's gradient 1: stage 0: c = 1/11, 5/11, 9/11 -> tau 5/11 -> prefix 1;
    # stage 1: c = 0.1/11, 0.2/11, 9/11 -> tau 0.2/11 -> prefix 1
    assert af.stats(0).prefix == 1 and af.stats(1).prefix == 1
    assert af.stats(1).layers == (3, 4, 5)
    assert names_of(af, 0, af.candidates(0)) == ["layers.0.proj", "layers.0.scale", "tok_embeddings.weight"]
    assert names_of(af, 1, af.candidates(1)) == ["layers.3.proj", "layers.3.scale"]  # head never
    scores = af.scores(0)
    units = af.units(0).units
    order = [units[i].name for i in np.argsort(-scores, kind="stable")]
    assert order[0] == "tok_embeddings.weight"  # front first: embeddings, then layer 0, 1, 2
    assert [af.layer_of(name) for name in order[1:]] == [0, 0, 1, 1, 2, 2]


def reference_prefixes(grads_per_step, n_layers, interval, p):
    """Faithful AutoFreeze with the max guard, from raw per-step gradients (float64)."""
    prefix, prev, out = 0, None, []
    for w in range(len(grads_per_step) // interval):
        window = grads_per_step[w * interval : (w + 1) * interval]
        g = np.array([np.abs(sum(step[layer] for step in window)).sum() for layer in range(n_layers)])
        if prev is not None:
            active = list(range(prefix, n_layers))
            c = {layer: abs(prev[layer] - g[layer]) / prev[layer] for layer in active}
            tau = np.percentile([c[layer] for layer in active], p)
            s_new = next(layer for layer in active if c[layer] >= tau)
            prefix = max(prefix, s_new)
        prev = g
        out.append(prefix)
    return out


@pytest.mark.parametrize("p", [30, 50, 80])
def test_matches_reference_on_random_gradients(p):
    n_layers, interval = 6, 3
    rng = np.random.default_rng(p)
    stage = layered_stage(range(n_layers))
    af = AutoFreezeMetric(interval=interval, percentile=p, block_rows=1)
    scale = np.exp(rng.normal(size=n_layers))
    grads = [
        [rng.normal(size=2) * scale[layer] * (1 + 0.1 * t) for layer in range(n_layers)] for t in range(60)
    ]
    got, previous = [], None
    for step, g in enumerate(grads):
        set_grads(stage, {layer: g[layer].tolist() for layer in range(n_layers)})
        af.observe(step, {0: stage})
        cand = af.candidates(0)
        if previous is not None:
            assert (cand >= previous).all()  # candidates never shrink
        previous = cand
        if (step + 1) % interval == 0:
            got.append(af.stats(0).prefix)
    assert got == reference_prefixes(grads, n_layers, interval, p)
    assert got[-1] > 0


@pytest.mark.parametrize("accumulate", ["grad", "norm"])
def test_state_dict_round_trip_mid_window(accumulate):
    rng = np.random.default_rng(3)
    stage = layered_stage(range(5), embed=True)
    cfg = AutoFreezeConfig(interval=3, block_rows=1, accumulate=accumulate)
    first = AutoFreezeMetric(cfg)
    grads = [{layer: rng.normal(size=2).tolist() for layer in range(5)} for _ in range(40)]
    for step in range(10):  # 3 checks and one step into the 4th window
        set_grads(stage, grads[step])
        first.observe(step, {0: stage})
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    second = AutoFreezeMetric(cfg)
    second.load_state_dict(torch.load(buf, weights_only=True))
    for step in range(10, 40):
        set_grads(stage, grads[step])
        first.observe(step, {0: stage})
        second.observe(step, {0: stage})
        a, b = first.stats(0), second.stats(0)
        assert a.prefix == b.prefix and a.checks == b.checks
        np.testing.assert_array_equal(a.norms, b.norms)
        np.testing.assert_array_equal(first.candidates(0), second.candidates(0))


def test_load_checks_layers():
    af = AutoFreezeMetric(interval=1, block_rows=1)
    stage = layered_stage([0, 1])
    set_grads(stage, {0: [1.0, 0.0], 1: [1.0, 0.0]})
    af.observe(0, {0: stage})
    other = AutoFreezeMetric(interval=1, block_rows=1)
    other.load_state_dict(af.state_dict())
    with pytest.raises(ValueError, match="differ from the loaded state"):
        other.observe(1, {0: layered_stage([0, 1, 2])})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"percentile": 101}, "percentile must be"),
        ({"percentile": float("nan")}, "percentile must be"),
        ({"interval": 0}, "interval must be"),
        ({"accumulate": "sum"}, "accumulate must be"),
        ({"layer_pattern": "layers"}, "needs a group"),
        ({"layer_pattern": "("}, "layer_pattern is not a valid regex"),
        ({"block_rows": -1}, "block_rows must be"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AutoFreezeMetric(**kwargs)


def test_numpy_scalars_configure_like_python_numbers():
    plain = AutoFreezeConfig(percentile=50, interval=3, block_rows=2)
    numpy = AutoFreezeConfig(
        percentile=np.float32(50),
        interval=np.int64(3),
        block_rows=np.uint8(2),
        include_tensors=np.bool_(True),
    )
    assert dataclasses.asdict(numpy) == dataclasses.asdict(plain)
    assert [type(v) for v in dataclasses.asdict(numpy).values()] == [
        type(v) for v in dataclasses.asdict(plain).values()
    ]
    for name, bad in [
        ("percentile", True),
        ("percentile", np.float64("inf")),
        ("interval", np.bool_(True)),
        ("block_rows", 2.0),
        ("include_tensors", "yes"),
    ]:
        with pytest.raises(ValueError, match=f"{name} must be .*got {re.escape(repr(bad))}"):
            AutoFreezeConfig(**{name: bad})


def test_layer_index_parsing():
    af = AutoFreezeMetric()
    assert af.layer_of("layers.12.attention.wq") == 12
    assert af.layer_of("layers.3") == 3
    assert af.layer_of("model.layers.7.ffn_norm.weight") == 7
    assert af.layer_of("sublayers.2.w") is None
    assert af.layer_of("output") is None
