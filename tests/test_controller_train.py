"""TimelyFreeze end to end: 2 gloo ranks train an MLP with torch's 1F1B on tfz.pipeline's freeze-aware
stages, timed by tfz.timing.ActionTimer, with AdamW and tfz.optim's row freezing.

Checked: both ranks go through the same phases and use the same plan at every step; the stage
applies exactly the masks the controller hands out (its counters); with partial monitoring (the
default) every row of every layer is updated in every step of the lower-bound window; with the old
all-frozen window stage 0 computes no weight gradient and its parameters do not move there, while the
last stage keeps one unit training; the controller reaches the stable phase with a plan, and its
state is JSON-able.
"""

from __future__ import annotations

import json

import pytest

DIM, HIDDEN, ROWS, MICROBATCHES = 16, 48, 4, 4
STEPS = 40


def make_stage(stage: int):
    import torch
    from torch import nn

    from tfz.nn import FreezableLinear

    torch.manual_seed(100 + stage)
    return nn.Sequential(FreezableLinear(DIM, HIDDEN), nn.Tanh(), FreezableLinear(HIDDEN, DIM))


def train(rank: int, world: int, monitoring: str) -> dict:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.pipelining import Schedule1F1B

    from tfz.controller import Phase, TimelyFreeze, TimelyFreezeConfig
    from tfz.optim import attach_row_freezing
    from tfz.pipeline import FreezeAwareStage
    from tfz.schedule import build_schedule
    from tfz.timing import ActionTimer

    torch.set_num_threads(1)
    module = make_stage(rank)
    cfg = TimelyFreezeConfig(phase_unit=3, check_every=2, ramp_steps=4, block_rows=8, monitoring=monitoring)
    controller = TimelyFreeze(
        cfg, build_schedule("1f1b", 2, MICROBATCHES), {rank: module}, group=dist.group.WORLD
    )
    timer = ActionTimer("cpu")
    stage = FreezeAwareStage(module, rank, world, torch.device("cpu"), provider=controller, timer=timer)
    schedule = Schedule1F1B(stage, MICROBATCHES, loss_fn=lambda out, target: F.mse_loss(out, target))
    opt = torch.optim.AdamW(module.parameters(), lr=1e-2, weight_decay=0.1)
    attach_row_freezing(opt, module)
    g = torch.Generator().manual_seed(0)
    records = []
    for step in range(STEPS):
        x = torch.randn(MICROBATCHES * ROWS, DIM, generator=g)
        y = torch.tanh(x.flip(1))
        before = [p.detach().clone() for p in module.parameters()]
        expected = [controller.masks_for(rank, mb) for mb in range(MICROBATCHES)]
        phase = controller.phase.value
        opt.zero_grad(set_to_none=True)
        losses = []
        schedule.step(*((x,) if rank == 0 else ()), **({"target": y, "losses": losses} if rank == 1 else {}))
        opt.step()
        controller.observe(step)
        stats = stage.tfz.stats.to_dict()
        controller.step_end(step, timer.collect())
        moved = any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))
        weights = [(a, b) for a, b in zip(before, module.parameters()) if b.dim() == 2]
        rows_moved = all(bool((a != b).any(dim=1).all()) for a, b in weights)
        records.append(
            {
                "phase": phase,
                "decision": controller.decision,
                "ratios": None if controller.plan is None else controller.plan.ratios.tolist(),
                "expected": [0.0 if m is None else m.frozen_fraction for m in expected],
                "applied": [stats["microbatches"][str(mb)]["frozen_fraction"] for mb in range(MICROBATCHES)],
                "w_flops": stats["w_flops"],
                "w_flops_skipped": stats["w_flops_skipped"],
                "moved": moved,
                "rows_moved": rows_moved,
                "loss": float(sum(v.item() for v in losses)) if losses else None,
            }
        )
    assert controller.phase is Phase.STABLE
    state = controller.state_dict()
    return {"records": records, "state": json.dumps(state), "history": [list(h) for h in controller.history]}


@pytest.mark.distributed
@pytest.mark.parametrize("monitoring", ["partial", "frozen"])
def test_two_rank_training_with_the_controller(monitoring):
    from tfz.pipeline import launch

    r0, r1 = launch(train, 2, monitoring, timeout=240)
    a, b = r0["records"], r1["records"]
    for k, (x, y) in enumerate(zip(a, b)):
        assert (x["phase"], x["decision"], x["ratios"]) == (y["phase"], y["decision"], y["ratios"]), k
    assert r0["history"] == r1["history"]
    phases = [x["phase"] for x in a]
    assert {"warmup", "monitor_upper", "monitor_lower", "solving", "ramp", "stable"} <= set(phases)
    for rank, rec in ((0, a), (1, b)):
        for k, x in enumerate(rec):
            assert x["applied"] == pytest.approx(x["expected"], abs=1e-12), (rank, k)
            if x["phase"] in ("warmup", "monitor_upper", "solving"):
                assert x["w_flops_skipped"] == 0 and x["moved"], (rank, k)
            if x["phase"] == "monitor_lower" and monitoring == "partial":  # every row still learns
                assert 0 < x["w_flops"] and x["w_flops_skipped"] > 0 and x["rows_moved"], (rank, k)
            elif x["phase"] == "monitor_lower":
                if rank == 0:  # everything frozen: no dW, no update
                    assert x["w_flops"] == 0 and x["w_flops_skipped"] > 0 and not x["moved"], k
                else:  # one unit of the last stage keeps training
                    assert 0 < x["w_flops"] < x["w_flops_skipped"] and x["moved"], k
    losses = [x["loss"] for x in b]
    assert all(v is not None and v == v for v in losses)
    assert json.loads(r0["state"])["phase"] == "stable"
    assert json.loads(r1["state"])["plan"]["ratios"] == json.loads(r0["state"])["plan"]["ratios"]
