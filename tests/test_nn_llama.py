"""End to end on the LLaMA stage: tfz.masks row blocks -> FreezableLinear grads, immediate and split."""

import copy

import pytest
import torch

from tfz.masks import StageUnits, select
from tfz.models import LlamaConfig, build_stages
from tfz.nn import FreezableLinear, WeightGradStore, convert_to_freezable, prepare_row_masks, use_row_masks

CFG = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=16)
RATIOS = (0.3, 0.0, 0.7, 1.0)


def setup():
    ref = build_stages(CFG, 1, dtype=torch.float64)[0]
    model = convert_to_freezable(copy.deepcopy(ref))
    units = StageUnits.from_module(model, block_rows=8)
    draws = [select(units, r, stage=0, microbatch=m, seed=3) for m, r in enumerate(RATIOS)]
    g = torch.Generator().manual_seed(0)
    tokens = [torch.randint(0, CFG.vocab_size, (2, 6), generator=g) for _ in RATIOS]
    targets = [torch.randint(0, CFG.vocab_size, (2, 6), generator=g) for _ in RATIOS]
    return ref, model, draws, tokens, targets


def loss_fn(logits, target):
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())


def reference(ref, draws, tokens, targets):
    names, params = zip(*ref.named_parameters())
    total = dict.fromkeys(names)
    for draw, x, t in zip(draws, tokens, targets):
        rows = draw.active_rows
        for name, g in zip(names, torch.autograd.grad(loss_fn(ref(x), t), params)):
            layer = name.removesuffix(".weight")
            if layer in rows:
                if not rows[layer].any():
                    continue
                g = g * torch.from_numpy(rows[layer]).to(g.dtype)[:, None]
            total[name] = g if total[name] is None else total[name] + g
    return total


def check(model, expected):
    for name, p in model.named_parameters():
        if expected[name] is None:
            assert p.grad is None, name
        else:
            torch.testing.assert_close(p.grad, expected[name], atol=1e-12, rtol=1e-10, msg=name)


def test_every_linear_is_freezable_and_masks_cover_the_ratio():
    _, model, draws, _, _ = setup()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, FreezableLinear) for m in linears)
    assert [d.frozen_fraction for d in draws][1] == 0.0 and draws[3].frozen_fraction == 1.0
    for d, r in zip(draws, RATIOS):
        assert abs(d.frozen_fraction - r) <= d.units.bound


@pytest.mark.parametrize("split", [False, True])
def test_llama_stage_grads_match_reference(split):
    ref, model, draws, tokens, targets = setup()
    expected = reference(ref, draws, tokens, targets)
    store = WeightGradStore()
    for m, (x, t) in enumerate(zip(tokens, targets)):
        if split:
            with store.capture(0, m):
                loss_fn(model(x), t).backward()
        else:
            with use_row_masks(prepare_row_masks(draws[m].for_module(model))):
                loss_fn(model(x), t).backward()
    for m in reversed(range(len(RATIOS))) if split else ():
        store.flush(0, m, masks=draws[m].for_module(model))
    check(model, expected)
