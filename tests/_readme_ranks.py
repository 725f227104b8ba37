"""Rank function of tests/test_readme.py: runs a README snippet on a rank of a 2-rank gloo group, with
the names it leaves to the reader defined by a prelude (tiny stage modules from _pipe_workers)."""

from __future__ import annotations

PIPELINE_PRELUDE = """
import torch, torch.distributed as dist, torch.nn.functional as F
from _pipe_workers import make_batch, make_stage_module
torch.set_num_threads(1)
rank, world = dist.get_rank(), dist.get_world_size()
pp_group, device, steps = dist.group.WORLD, torch.device("cpu"), 26
loss_fn = lambda out, target: F.mse_loss(out, target)
batch = lambda step: make_batch(8, seed=step)
"""

TORCHTITAN_PRELUDE = (
    PIPELINE_PRELUDE
    + """
from torch.distributed.pipelining import PipelineStage, Schedule1F1B
from tfz.controller import TimelyFreeze, TimelyFreezeConfig
from tfz.nn import convert_to_freezable
from tfz.timing import ActionTimer

def pipeline_llm(model, *rest):  # stands in for torchtitan's: its stages, its schedule
    stage = PipelineStage(make_stage_module(rank), rank, world, device)
    return Schedule1F1B(stage, 4, loss_fn=loss_fn), [stage.submod], rank == 0, rank == 1

model, pp, n_microbatches, timer = None, world, 4, ActionTimer()
"""
)


def run_snippet(rank: int, world: int, prelude: str, code: str) -> dict:
    namespace: dict = {}
    exec(compile(prelude, "<prelude>", "exec"), namespace)
    exec(compile(code, "<README snippet>", "exec"), namespace)
    controller = namespace["controller"]
    return {
        "plan": controller.plan is not None,
        "local": sorted(controller.local_stages),
        "freeze_aware": all(hasattr(st, "tfz") for st in namespace["stages"]),
        "schedule": namespace["schedule"].name,
    }
