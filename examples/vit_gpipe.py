"""A ViT-like image classifier (patch embedding, 4 pre-norm attention blocks, class token) on 2 pipeline
stages with GPipe, trained with TimelyFreeze over 2 CPU ranks.

    python examples/vit_gpipe.py --check-grads

Images are 3x32x32 noise with one brightened quadrant; the label is that quadrant.
"""

from __future__ import annotations

import _common
import torch
import torch.nn.functional as F
from torch import nn

DIM, HEADS, PATCH, IMAGE, CLASSES, DEPTH = 96, 4, 4, 32, 4, 4
MICROBATCHES, MB_SIZE = 4, 8


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.proj = nn.Linear(DIM, DIM)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, DIM))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(DIM), Attention()
        self.norm2 = nn.LayerNorm(DIM)
        self.mlp = nn.Sequential(nn.Linear(DIM, 4 * DIM), nn.GELU(), nn.Linear(4 * DIM, DIM))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, DIM, PATCH, stride=PATCH)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, DIM))
        self.pos = nn.Parameter(0.02 * torch.randn(1, (IMAGE // PATCH) ** 2 + 1, DIM))
        self.blocks = nn.ModuleList([Block() for _ in range(DEPTH)])
        self.norm, self.head = nn.LayerNorm(DIM), nn.Linear(DIM, CLASSES)


class ViTStage(nn.Module):
    """Blocks [start, stop) of a ViT; the first stage embeds the patches, the last classifies the
    class token. Parameter names follow the ViT's."""

    def __init__(self, vit: ViT, start: int, stop: int, first: bool, last: bool):
        super().__init__()
        self.first, self.last = first, last
        if first:
            self.patch, self.cls_token, self.pos = vit.patch, vit.cls_token, vit.pos
        self.blocks = nn.ModuleDict({str(i): vit.blocks[i] for i in range(start, stop)})
        if last:
            self.norm, self.head = vit.norm, vit.head

    def forward(self, x):
        """x: images [b, 3, H, W] (first stage) or tokens [b, t, DIM] -> tokens or logits [b, CLASSES]."""
        if self.first:
            x = self.patch(x).flatten(2).transpose(1, 2)
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos
        for block in self.blocks.values():
            x = block(x)
        return self.head(self.norm(x[:, 0])) if self.last else x


def cut(vit: ViT) -> dict[int, ViTStage]:
    half = DEPTH // 2
    return {0: ViTStage(vit, 0, half, True, False), 1: ViTStage(vit, half, DEPTH, False, True)}


def vit(dtype=torch.float32) -> ViT:
    torch.manual_seed(0)
    return ViT().to(dtype)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    n = MICROBATCHES * MB_SIZE
    images = torch.randn(n, 3, IMAGE, IMAGE, generator=g)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    h = IMAGE // 2
    for i, q in enumerate(labels.tolist()):
        images[i, :, (q // 2) * h : (q // 2 + 1) * h, (q % 2) * h : (q % 2 + 1) * h] += 1.0
    return images, labels


def loss_fn(logits, labels):
    return F.cross_entropy(logits, labels)


def run(rank: int, world: int, args) -> dict:
    from tfz.nn import convert_to_freezable
    from tfz.pipeline import FreezeAwareStage, build_torch_schedule
    from tfz.schedule import build_schedule
    from tfz.timing import ActionTimer

    torch.set_num_threads(1)
    schedule = build_schedule("gpipe", ranks=world, microbatches=MICROBATCHES)
    modules = {s: convert_to_freezable(m) for s, m in cut(vit()).items() if s in schedule.stages_of(rank)}
    controller = _common.timelyfreeze(args, schedule, modules)
    timer = ActionTimer()
    stages = [
        FreezeAwareStage(m, s, schedule.num_stages, torch.device("cpu"), provider=controller, timer=timer)
        for s, m in modules.items()
    ]
    torch_schedule = build_torch_schedule(schedule, stages, loss_fn)
    pipe = _common.Pipeline(schedule, torch_schedule, stages, modules, controller, timer, lr=1e-3)
    reference = _common.Reference(cut(vit(torch.float64)), loss_fn) if args.check_grads else None
    return _common.train(pipe, args, batch, MICROBATCHES, reference)


if __name__ == "__main__":
    _common.main(run, _common.parse(_common.parser(__doc__.splitlines()[0]), only_world=2))
