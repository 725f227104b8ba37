"""tfz.metrics on the freeze-aware pipeline runtime: 2 ranks (gloo), 1F1B, a 2-stage LLaMA, AdamW.

Every method (APF and AutoFreeze freezers, TimelyFreeze-style hybrids at fixed ratios) trains for a
few steps; each rank observes its own stage after ``optimizer.step()`` and logs the frozen fraction of
every microbatch. The rank functions are module level so spawned processes can import them.
"""

from __future__ import annotations

import pytest

from tfz.pipeline import launch

MICROBATCHES, STEPS, BLOCK = 4, 8, 8
RATIO = {0: 0.3, 1: 0.5}
METHODS = ("apf", "autofreeze", "apf+tf", "autofreeze+tf")


class _HybridProvider:
    """TimelyFreeze stand-in: a fixed ratio per stage, units chosen by a metric-guided policy."""

    def __init__(self, policy, units, ratio):
        self.policy, self.units, self.ratio, self.step = policy, units, ratio, 0

    def masks_for(self, stage, microbatch):
        from tfz.masks import select

        return select(
            self.units,
            self.ratio,
            stage=stage,
            microbatch=microbatch,
            step=self.step,
            seed=0,
            policy=self.policy,
        )

    def observe(self, step, stage_modules):
        self.policy.observe(step, stage_modules)
        self.step = step + 1


def _provider(method, rank, module):
    from tfz.masks import StageUnits
    from tfz.metrics import APFFreezer, AutoFreezeFreezer, MetricGuidedPolicy

    apf = {"check_interval": 2, "threshold": 0.9, "alpha": 0.9, "block_rows": BLOCK}
    auto = {"interval": 2, "block_rows": BLOCK}
    if method == "apf":
        return APFFreezer(**apf)
    if method == "autofreeze":
        return AutoFreezeFreezer(**auto)
    policy = MetricGuidedPolicy.apf(**apf) if method == "apf+tf" else MetricGuidedPolicy.autofreeze(**auto)
    units = StageUnits.from_module(module, block_rows=BLOCK, include_tensors=True)
    return _HybridProvider(policy, units, RATIO[rank])


def train_rank(rank: int, world: int, methods) -> list[dict]:
    import torch
    import torch.nn.functional as F
    from torch.distributed.pipelining import Schedule1F1B

    from tfz.models import LlamaConfig, build_stages
    from tfz.nn import convert_to_freezable
    from tfz.optim import attach_row_freezing
    from tfz.pipeline import FreezeAwareStage

    torch.set_num_threads(1)
    cfg = LlamaConfig(vocab_size=32, dim=16, n_layers=4, n_heads=2, n_kv_heads=2, ffn_dim=32, max_seq_len=8)
    out = []
    for method in methods:
        module = convert_to_freezable(build_stages(cfg, world, stage_ids=[rank], seed=0)[rank])
        provider = _provider(method, rank, module)
        stage = FreezeAwareStage(module, rank, world, torch.device("cpu"), provider=provider)

        def loss_fn(logits, target):
            return F.cross_entropy(logits.reshape(-1, cfg.vocab_size), target.reshape(-1))

        schedule = Schedule1F1B(stage, MICROBATCHES, loss_fn=loss_fn)
        opt = torch.optim.AdamW(module.parameters(), lr=3e-3)
        attach_row_freezing(opt, module)
        gen = torch.Generator().manual_seed(7)  # the same batches on both ranks
        log = []
        for step in range(STEPS):
            tokens = torch.randint(0, cfg.vocab_size, (2 * MICROBATCHES, 8), generator=gen)
            fractions = []
            for mb in range(MICROBATCHES):
                masks = provider.masks_for(rank, mb)
                fractions.append(0.0 if masks is None else masks.frozen_fraction)
            if rank == 0:
                schedule.step(tokens[:, :-1].contiguous())  # torch 2.11 checks input strides
            else:
                losses = []
                schedule.step(target=tokens[:, 1:].contiguous(), losses=losses)
            opt.step()
            provider.observe(step, {rank: module})
            opt.zero_grad(set_to_none=True)
            log.append(fractions)
        units = getattr(provider, "units", None)
        out.append(
            {"method": method, "stage": rank, "log": log, "bound": None if units is None else units.bound}
        )
    return out


@pytest.mark.distributed
def test_every_method_trains_on_two_ranks_and_logs_freeze_ratios():
    results = launch(train_rank, 2, METHODS, timeout=240)
    by = {(r["method"], r["stage"]): r for rank in results for r in rank}
    for method in METHODS:
        for stage in (0, 1):
            log = by[method, stage]["log"]
            assert len(log) == STEPS and all(len(f) == MICROBATCHES for f in log)
            if "+tf" in method:  # the LP ratio is kept whatever the metric says
                bound = by[method, stage]["bound"]
                assert all(abs(f - RATIO[stage]) <= bound + 1e-12 for step in log for f in step)
            else:  # standalone: the same masks for every microbatch
                assert all(len(set(step)) == 1 for step in log)
                if method == "autofreeze":  # a growing prefix: the frozen fraction never drops
                    per_step = [step[0] for step in log]
                    assert per_step == sorted(per_step)
    assert max(by["apf", s]["log"][-1][0] for s in (0, 1)) > 0  # APF froze something by the end
