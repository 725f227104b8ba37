"""A HuggingFace ``LlamaForCausalLM`` (tiny random config, nothing downloaded) cut into pipeline stages
and trained with TimelyFreeze, on 1F1B (2 stages) or ZBV (4 stages in a V over 2 ranks).

    python examples/hf_llama.py                         # 1F1B, 60 steps, 2 spawned CPU ranks
    python examples/hf_llama.py --schedule zbv --check-grads
    torchrun --nproc-per-node 2 examples/hf_llama.py    # the same, on torchrun's processes

Needs ``pip install transformers`` (tfz's ``examples`` extra). The task is next-token prediction on
arithmetic token sequences, so the loss falls within the run.
"""

from __future__ import annotations

import copy

import _common
import torch
import torch.nn.functional as F
from torch import nn

VOCAB, SEQ, MICROBATCHES, MB_SIZE = 128, 16, 8, 2


def tiny_llama(dtype=torch.float32):
    """A 4-layer LlamaForCausalLM, random weights (seed 0), untied embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=SEQ,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(dtype)


class LlamaStage(nn.Module):
    """Decoder layers [start, stop) of a LlamaForCausalLM, with the embedding on the first stage and
    the final norm and LM head on the last. Parameter names follow the layer indices of the model."""

    def __init__(self, model, start: int, stop: int, first: bool, last: bool):
        super().__init__()
        inner = model.model
        self.config = model.config
        self.embed_tokens = inner.embed_tokens if first else None
        self.layers = nn.ModuleDict({str(i): inner.layers[i] for i in range(start, stop)})
        self.rotary_emb = inner.rotary_emb
        self.norm = inner.norm if last else None
        self.lm_head = model.lm_head if last else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: token ids [b, t] (first stage) or hidden states [b, t, d] -> hidden states or logits."""
        from transformers.masking_utils import create_causal_mask

        h = self.embed_tokens(x) if self.embed_tokens is not None else x
        positions = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
        mask = create_causal_mask(
            config=self.config, inputs_embeds=h, attention_mask=None, cache=None, position_ids=positions
        )
        rope = self.rotary_emb(h, position_ids=positions)
        for layer in self.layers.values():
            h = layer(h, attention_mask=mask, position_embeddings=rope, position_ids=positions)
        if self.norm is not None:
            h = self.lm_head(self.norm(h))
        return h


def cut(model, num_stages: int) -> dict[int, LlamaStage]:
    """Every stage module of ``model`` (layers split evenly)."""
    n = model.config.num_hidden_layers
    bounds = [round(i * n / num_stages) for i in range(num_stages + 1)]
    return {
        s: LlamaStage(model, bounds[s], bounds[s + 1], s == 0, s == num_stages - 1) for s in range(num_stages)
    }


def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten())


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token sequences a, a + k, a + 2k, ... (mod VOCAB): inputs and next tokens, [B, SEQ] each."""
    g = torch.Generator().manual_seed(step)
    n = MICROBATCHES * MB_SIZE
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    stride = torch.randint(1, 5, (n, 1), generator=g)
    seq = (start + stride * torch.arange(SEQ + 1)) % VOCAB
    return seq[:, :-1], seq[:, 1:]


def run(rank: int, world: int, args) -> dict:
    from tfz.nn import convert_to_freezable
    from tfz.pipeline import FreezeAwareStage, build_torch_schedule
    from tfz.schedule import build_schedule
    from tfz.timing import ActionTimer

    torch.set_num_threads(1)
    schedule = build_schedule(args.schedule, ranks=world, microbatches=MICROBATCHES)
    model = tiny_llama()
    every = cut(model, schedule.num_stages)
    local = schedule.stages_of(rank)  # stage indices of this rank: zbv puts stages 0 and 3 on rank 0
    modules = {s: convert_to_freezable(every[s]) for s in local}
    controller = _common.timelyfreeze(args, schedule, modules)
    timer = ActionTimer()
    cpu = torch.device("cpu")
    stages = [
        FreezeAwareStage(modules[s], s, schedule.num_stages, cpu, provider=controller, timer=timer)
        for s in local
    ]
    pipe = _common.Pipeline(
        schedule, build_torch_schedule(schedule, stages, loss_fn), stages, modules, controller, timer
    )
    reference = None
    if args.check_grads:
        full = tiny_llama(torch.float64)
        reference = _common.Reference(cut(full, schedule.num_stages), loss_fn)
    return _common.train(pipe, args, batch, MICROBATCHES, reference)


@torch.no_grad()
def check_cut() -> float:
    """Max |logits of the stages run in a row - LlamaForCausalLM's own| (float64): the cut is exact."""
    model = tiny_llama(torch.float64)
    x, _ = batch(0)
    h = x
    for stage in cut(copy.deepcopy(model), 4).values():
        h = stage(h)
    return float((h - model(x).logits).abs().max())


if __name__ == "__main__":
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--schedule", default="1f1b", choices=["1f1b", "zbv", "gpipe", "interleaved1f1b"])
    _common.main(run, _common.parse(p))
