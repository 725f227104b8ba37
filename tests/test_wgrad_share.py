"""bench/wgrad_share.py: what it masks and what its table computes, against hand values (not its timings)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tfz.demo.config import DemoConfig
from tfz.demo.worker import build_model
from tfz.nn import linear_flops
from tfz.nn.freezable_linear import FreezableLinear

TINY = dict(vocab_size=300, dim=16, n_heads=2, ffn_dim=40, seq_len=8, microbatch_size=2)


@pytest.fixture(scope="module")
def ws(bench_script):
    return bench_script("wgrad_share")


@pytest.mark.parametrize("active", [1.0, 0.2, 0.0])
def test_masks_leave_the_trained_output_layer_alone(ws, active):
    """Each decoder FreezableLinear keeps round(active * rows) rows, the first ones; the output layer
    (trained on every microbatch) gets its gradient whatever the setting; frozen rows get none."""
    stage = build_model(DemoConfig(**TINY), 2, [1], seed=0)[1]
    masks = ws._masks(stage, active)
    layers = [m for m in stage.modules() if isinstance(m, FreezableLinear)]
    assert set(masks) == set(layers) and not isinstance(stage.output, FreezableLinear)
    x = torch.randn(2, 8, 16)
    target = torch.randint(0, 300, (2, 8))
    assert ws._step(stage, x, target, masks) > 0
    assert stage.output.weight.grad is not None and stage.output.weight.grad.abs().sum() > 0
    for layer in layers:
        keep = int(round(active * layer.out_features))
        grad = layer.weight.grad
        if keep == 0:
            assert grad is None or not grad.any()
            continue
        assert grad[:keep].abs().sum(1).min() > 0 and not grad[keep:].any()


def test_table_is_the_ratios_of_the_medians_per_round(ws):
    times = {
        0: {"all": np.array([2.0, 4.0]), "cap": np.array([1.6, 3.0]), "none": np.array([1.5, 2.8])},
        1: {"all": np.array([3.0, 5.0]), "cap": np.array([2.5, 4.0]), "none": np.array([2.4, 3.5])},
    }
    text = ws.table(times, 0.8, {0: (1, 4), 1: (1, 5)})
    # stage 0: shares 0.25 and 0.30, ceilings 1.25 and 1.333; stage 1: 0.20 / 0.30, 1.20 / 1.25;
    # FLOP bounds: 1/4 and 4 / (4 - 0.8); 1/5 and 5 / (5 - 0.8)
    assert (
        "| 0 | 3000.0 | 2300.0 | 2150.0 | 0.275 (0.250-0.300) | 1.292 (1.250-1.333)x | 0.250 | 1.250x |"
        in text
    )
    assert (
        "| 1 | 4000.0 | 3250.0 | 2950.0 | 0.250 (0.200-0.300) | 1.225 (1.200-1.250)x | 0.200 | 1.190x |"
        in text
    )
    # the slowest stage per round: 3.0 / 2.5 and 5.0 / 4.0; by FLOPs 5 against max(3.2, 4.2)
    assert "frozen at the cap: 1.225 (1.200-1.250)x (median over rounds, min-max); FLOP bound 1.190x" in text


@pytest.mark.parametrize("output_layer", ["trained", "freezable"])
def test_the_flop_bound_of_the_demo_stages_is_the_closed_form(output_layer):
    """Per token, a decoder layer's linear weights are 4 d^2 + 3 d f (attention's four, the MLP's
    three) and the output layer's d V; each takes 2 FLOPs per weight in the forward, the input
    gradient and the weight gradient. With the output layer trained, stage 1's freezable share is
    exactly a quarter at the demo's shape, so freezing it at 0.8 gains at most 1.25x."""
    cfg = DemoConfig(output_layer=output_layer)
    d, f, v, layers = cfg.dim, cfg.ffn_dim, cfg.vocab_size, cfg.model_layers(2) // 2
    decoder, output = layers * (4 * d * d + 3 * d * f), d * v
    stages = build_model(cfg, 2, [0, 1], seed=0)
    assert linear_flops(stages[0]) == (2 * decoder, 6 * decoder)
    freezable = decoder + (output if output_layer == "freezable" else 0)
    assert linear_flops(stages[1]) == (2 * freezable, 6 * (decoder + output))
    if output_layer == "trained":
        assert 4 * decoder == 3 * (decoder + output)  # the share is a quarter: 1 / (1 - 0.8 / 4) = 1.25
