"""Stages built by torch's tracer frontend (``torch.distributed.pipelining.pipeline`` with a split
point), made freeze-aware after torch built them, trained with TimelyFreeze on 1F1B over 2 CPU ranks.

    python examples/tracer_pipeline.py --check-grads

The tracer turns the model's layers into graph modules (no ``nn.Linear`` left to convert), so
TimelyFreeze freezes whole parameter tensors here (``include_tensors=True``) instead of rows.
"""

from __future__ import annotations

import copy

import _common
import torch
import torch.nn.functional as F
from torch import nn

DIM, CLASSES, MICROBATCHES, MB_SIZE = 32, 4, 4, 8


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.up = nn.Linear(DIM, 2 * DIM)
        self.down = nn.Linear(2 * DIM, DIM)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.norm(x))))


class Net(nn.Module):
    """A residual MLP classifier that torch.export traces: embed, 4 blocks, head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, DIM)
        self.blocks = nn.Sequential(*[Block() for _ in range(4)])
        self.head = nn.Linear(DIM, CLASSES)

    def forward(self, x):
        return self.head(self.blocks(self.embed(x)))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs [B, 8] and labels [B]: the label is the argmax of the first 4 features."""
    g = torch.Generator().manual_seed(step)
    x = torch.randn(MICROBATCHES * MB_SIZE, 8, generator=g)
    return x, x[:, :CLASSES].argmax(1)


def loss_fn(logits, labels):
    return F.cross_entropy(logits, labels)


def run(rank: int, world: int, args) -> dict:
    from torch.distributed.pipelining import Schedule1F1B, SplitPoint, pipeline

    from tfz.pipeline import make_freeze_aware
    from tfz.schedule.torch_io import from_torch
    from tfz.timing import ActionTimer

    torch.set_num_threads(1)
    torch.manual_seed(0)
    x0, _ = batch(0)
    traced = pipeline(
        Net(), mb_args=(x0.chunk(MICROBATCHES)[0],), split_spec={"blocks.2": SplitPoint.BEGINNING}
    )
    stage = traced.build_stage(rank, torch.device("cpu"))  # torch's own _PipelineStage
    torch_schedule = Schedule1F1B(stage, MICROBATCHES, loss_fn=loss_fn)
    schedule = from_torch(Schedule1F1B, ranks=world, microbatches=MICROBATCHES)  # its orders, for the LP
    modules = {rank: stage.submod}
    controller = _common.timelyfreeze(args, schedule, modules, include_tensors=True)
    timer = ActionTimer()
    make_freeze_aware(stage, provider=controller, timer=timer)  # after the schedule exists: fine
    pipe = _common.Pipeline(schedule, torch_schedule, [stage], modules, controller, timer, lr=1e-2)
    reference = None
    if args.check_grads:
        every = {s: copy.deepcopy(traced.get_stage_module(s)).double() for s in range(world)}
        reference = _common.Reference(every, loss_fn)
    return _common.train(pipe, args, batch, MICROBATCHES, reference)


if __name__ == "__main__":
    _common.main(run, _common.parse(_common.parser(__doc__.splitlines()[0]), only_world=2))
