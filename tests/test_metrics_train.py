"""tfz.metrics in a real training loop: a 2-stage LLaMA in one process, AdamW with tfz.optim's hooks.

Each method runs for a few steps and logs its freeze ratio per stage. Checked: rows and tensors frozen
in every microbatch of a step keep their weights and AdamW state; the standalone freezers freeze
exactly their metric's candidates; the hybrids keep the requested ratio and freeze candidates first.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tfz.masks import StageUnits, select
from tfz.metrics import APFFreezer, AutoFreezeFreezer, MetricGuidedPolicy
from tfz.models import LlamaConfig, build_stages
from tfz.nn import convert_to_freezable, use_row_masks
from tfz.optim import attach_row_freezing

CFG = LlamaConfig(vocab_size=32, dim=16, n_layers=4, n_heads=2, n_kv_heads=2, ffn_dim=32, max_seq_len=8)
BLOCK = 8
MICROBATCHES = 2


def build():
    stages = build_stages(CFG, 2, seed=0)
    for stage in stages.values():
        convert_to_freezable(stage)
    params = [p for s in stages.values() for p in s.parameters()]
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.1)
    for stage in stages.values():
        attach_row_freezing(opt, stage)
    return stages, opt


def unit_tensors(module, unit):
    """The parameter slices of one unit: weight (and bias) rows, or the whole tensor."""
    if unit.kind == "tensor":
        return [module.get_parameter(unit.name)]
    layer = module.get_submodule(unit.name)
    out = [layer.weight[unit.start : unit.stop]]
    if layer.bias is not None:
        out.append(layer.bias[unit.start : unit.stop])
    return out


def train(stages, opt, masks_for, observer, steps, seed=0):
    """Runs ``steps`` steps; returns the log [(step, stage, realised frozen fraction per microbatch)] and
    how many (unit, step) pairs frozen in every microbatch were checked."""
    gen = torch.Generator().manual_seed(seed)
    log, checked = [], 0
    for step in range(steps):
        per_mb = [{s: masks_for(s, mb, step) for s in stages} for mb in range(MICROBATCHES)]
        always = {}  # units frozen in every microbatch: must not change in this step
        for s, module in stages.items():
            all_masks = [m[s] for m in per_mb]
            if all(m is not None for m in all_masks):
                frozen = np.logical_and.reduce([m.frozen for m in all_masks])
                units = all_masks[0].units.units
                always[s] = [(u, unit_tensors(module, u)) for u, f in zip(units, frozen) if f]
        before = {
            s: [([t.detach().clone() for t in ts], _state_rows(opt, stages[s], u)) for u, ts in lst]
            for s, lst in always.items()
        }
        for mb in range(MICROBATCHES):
            tokens = torch.randint(0, CFG.vocab_size, (2, 8), generator=gen)
            row_masks, inputs = {}, []
            for s, module in stages.items():
                m = per_mb[mb][s]
                frozen_tensors = m.frozen_tensors if m is not None else frozenset()
                if m is not None:
                    row_masks.update(m.for_module(module))
                inputs += [p for n, p in module.named_parameters() if n not in frozen_tensors]
            logits = stages[1](stages[0](tokens))
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, CFG.vocab_size), tokens[:, 1:].reshape(-1))
            with use_row_masks(row_masks):
                torch.autograd.backward(loss / MICROBATCHES, inputs=inputs)
        opt.step()
        observer.observe(step, stages)
        opt.zero_grad(set_to_none=True)
        for s, lst in always.items():
            for (unit, tensors), (old, old_state) in zip(lst, before[s]):
                where = f"frozen unit {unit.name} [{unit.start}:{unit.stop}] of stage {s} at step {step}"
                for t, o in zip(tensors, old):
                    assert torch.equal(t.detach(), o), f"{where}: weights moved"
                new_state = _state_rows(opt, stages[s], unit)
                if old_state is None:  # state created by this step: frozen rows start at zero
                    assert new_state is None or not any(new_state), f"{where}: new state not zero"
                else:
                    assert new_state == old_state, f"{where}: optimizer state changed"
                checked += 1
        for s in stages:
            log.append((step, s, [m[s].frozen_fraction if m[s] is not None else 0.0 for m in per_mb]))
    return log, checked


def _state_rows(opt, module, unit):
    """AdamW exp_avg of the unit's rows (as a tuple of floats), or None before the state exists."""
    tensors = (
        [module.get_parameter(unit.name)]
        if unit.kind == "tensor"
        else [module.get_submodule(unit.name).weight]
    )
    state = opt.state.get(tensors[0], {})
    if "exp_avg" not in state:
        return None
    rows = state["exp_avg"] if unit.kind == "tensor" else state["exp_avg"][unit.start : unit.stop]
    return tuple(rows.flatten().tolist())


@pytest.mark.parametrize("method", ["apf", "autofreeze"])
def test_standalone_freezers_train_and_log_ratios(method):
    stages, opt = build()
    if method == "apf":
        freezer = APFFreezer(check_interval=2, threshold=0.9, alpha=0.9, block_rows=BLOCK)
    else:
        freezer = AutoFreezeFreezer(interval=2, percentile=50, block_rows=BLOCK)
    seen = []

    def masks_for(stage, mb, step):
        m = freezer.masks_for(stage, mb)
        if m is not None:
            np.testing.assert_array_equal(m.frozen, freezer.metric.candidates(stage))
            seen.append(m.frozen_fraction)
        return m

    log, checked = train(stages, opt, masks_for, freezer, steps=14)
    assert checked > 0
    assert len(log) == 14 * 2 and {s for _, s, _ in log} == {0, 1}
    for _, _, ratios in log:
        assert len(set(ratios)) == 1  # the same masks for every microbatch
    assert max(seen) > 0  # something was frozen during the run
    if method == "autofreeze":
        for s in stages:
            stats = freezer.metric.stats(s)
            assert stats.prefix < len(stats.layers)


@pytest.mark.parametrize("method", ["apf", "autofreeze"])
@pytest.mark.parametrize("mode", ["rank", "sample"])
def test_hybrid_policies_keep_the_ratio(method, mode):
    stages, opt = build()
    if method == "apf":
        policy = MetricGuidedPolicy.apf(
            check_interval=2, threshold=0.9, alpha=0.9, block_rows=BLOCK, mode=mode
        )
    else:
        policy = MetricGuidedPolicy.autofreeze(interval=2, block_rows=BLOCK, mode=mode)
    units = {s: StageUnits.from_module(m, block_rows=BLOCK, include_tensors=True) for s, m in stages.items()}
    ratio = {0: 0.3, 1: 0.5}
    preferred = []

    def masks_for(stage, mb, step):
        m = select(units[stage], ratio[stage], stage=stage, microbatch=mb, step=step, seed=1, policy=policy)
        assert abs(m.frozen_fraction - ratio[stage]) <= units[stage].bound + 1e-12
        if policy.metric.units(stage) is not None:
            cand = policy.metric.candidates(stage)
            if cand.any() and mode == "rank":
                budget = ratio[stage] * units[stage].total
                if units[stage].weights[cand].sum() <= budget:
                    assert m.frozen[cand].all()
                preferred.append(m.frozen[cand].mean() >= m.frozen[~cand].mean() if (~cand).any() else True)
        return m

    log, checked = train(stages, opt, masks_for, policy, steps=10)
    if mode == "rank":
        assert checked > 0  # candidates frozen in both microbatches
    for _, s, ratios in log:
        assert all(abs(r - ratio[s]) <= units[s].bound + 1e-12 for r in ratios)
    if mode == "rank":
        assert preferred and all(preferred)
