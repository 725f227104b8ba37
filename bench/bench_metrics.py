"""Cost of the freezing metrics (tfz.metrics) against the optimizer step they ride on, CPU fp32.

Run: ``python -m pytest bench/bench_metrics.py -q --benchmark-enable --benchmark-columns=median,rounds``

One LLaMA-style stage (2 layers, dim 512, ffn 1536, FreezableLinear, 64-row blocks, ~6.3M parameters)
with gradients set. Timed: AdamW.step (the reference), APF's check ("scalar" and "block"
aggregation; runs once every check_interval steps), AutoFreeze's per-step accumulation ("grad" and
"norm"; runs every step) and its check (every interval steps). Report each as a ratio to AdamW.step.

Group "select": one ``tfz.masks.select`` on a LLaMA-8B-shaped stage (8 layers, 5,376 units of 64 rows)
at ratio 0.4, with RandomPolicy and with MetricGuidedPolicy (30% candidates), as a ratio to random.
"""

import numpy as np
import pytest
import torch

from tfz.masks import LayerSpec, RandomPolicy, StageUnits, select
from tfz.metrics import APFMetric, AutoFreezeMetric, MetricGuidedPolicy
from tfz.models import LlamaConfig, build_stages
from tfz.nn import convert_to_freezable

CFG = LlamaConfig(vocab_size=256, dim=512, n_layers=4, n_heads=8, n_kv_heads=8, ffn_dim=1536, max_seq_len=64)


def _stage():
    torch.set_num_threads(1)
    stage = convert_to_freezable(build_stages(CFG, 2, stage_ids=[1], seed=0)[1])
    gen = torch.Generator().manual_seed(1)
    for p in stage.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    return stage


@pytest.mark.benchmark(group="metrics")
def test_adamw_step(benchmark):
    stage = _stage()
    opt = torch.optim.AdamW(stage.parameters(), lr=1e-4)
    opt.step()
    benchmark(opt.step)


@pytest.mark.benchmark(group="metrics")
@pytest.mark.parametrize("aggregate", ["scalar", "block"])
def test_apf_check(benchmark, aggregate):
    stage = _stage()
    apf = APFMetric(check_interval=1, aggregate=aggregate, tighten_ratio=None, threshold=1e-9)
    step = iter(range(10**9))
    apf.observe(next(step), {1: stage})

    def check():
        with torch.no_grad():
            stage.layers["2"].attention.wq.weight.add_(1e-4)
        apf.observe(next(step), {1: stage})

    benchmark(check)
    assert apf.stats(1).round > 0


@pytest.mark.benchmark(group="metrics")
@pytest.mark.parametrize("accumulate", ["grad", "norm"])
def test_autofreeze_accumulate(benchmark, accumulate):
    stage = _stage()
    af = AutoFreezeMetric(interval=10**9, accumulate=accumulate)
    step = iter(range(10**9))
    af.observe(next(step), {1: stage})
    benchmark(lambda: af.observe(next(step), {1: stage}))


@pytest.mark.benchmark(group="metrics")
def test_autofreeze_check(benchmark):
    stage = _stage()
    af = AutoFreezeMetric(interval=1, percentile=0)  # tau = min: nothing freezes, every call checks
    step = iter(range(10**9))
    benchmark(lambda: af.observe(next(step), {1: stage}))
    assert af.stats(1).checks > 1


class _Candidates:
    """A fixed candidate set in the shape of tfz.metrics.FreezeMetric (30% of the units)."""

    def __init__(self, units):
        rng = np.random.default_rng(0)
        self._units, self._cand, self._scores = units, rng.random(len(units)) < 0.3, rng.random(len(units))

    def observe(self, step, stage_modules):
        pass

    def units(self, stage):
        return self._units

    def candidates(self, stage):
        return self._cand.copy()

    def scores(self, stage):
        return self._scores.copy()

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def _llama8b_units():
    shapes = [
        (4096, 4096),
        (1024, 4096),
        (1024, 4096),
        (4096, 4096),
        (14336, 4096),
        (14336, 4096),
        (4096, 14336),
    ]
    specs = [LayerSpec(f"layers.{i}.w{j}", o, n) for i in range(8) for j, (o, n) in enumerate(shapes)]
    return StageUnits(tuple(specs), block_rows=64)


@pytest.mark.benchmark(group="select")
@pytest.mark.parametrize("policy", ["random", "rank", "sample"])
def test_select(benchmark, policy):
    units = _llama8b_units()
    assert len(units) == 5376
    chosen = RandomPolicy() if policy == "random" else MetricGuidedPolicy(_Candidates(units), policy)
    step = iter(range(10**9))
    benchmark(lambda: select(units, 0.4, stage=1, microbatch=0, step=next(step), policy=chosen))
