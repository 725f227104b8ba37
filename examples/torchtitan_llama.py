"""torchtitan's own pipeline (``pipeline_llm``: its stage split, its PipelineStage objects, its schedule)
on its Llama 3 debug model, made freeze-aware by ``make_freeze_aware`` and trained with TimelyFreeze:
1F1B over 2 CPU ranks.

    python examples/torchtitan_llama.py --check-grads

Needs ``pip install torchtitan==0.3.0`` (Python 3.11+; it installs against torch 2.13 from PyPI).
Two changes for a CPU run, neither about freezing: the attention is torch's SDPA (torchtitan's default
flex attention compiles kernels), and the pipeline mesh is built on CPU (torchtitan's ParallelDims
builds its meshes on CUDA).
"""

from __future__ import annotations

import copy

import _common
import torch
import torch.nn.functional as F

MICROBATCHES, MB_SIZE, SEQ = 4, 2, 16


def llama3_debug(dtype=torch.float32):
    """torchtitan's llama3 ``debugmodel`` (6 layers, dim 256) with SDPA attention, seed 0."""
    from torchtitan.models.common.attention import ScaledDotProductAttention
    from torchtitan.models.llama3 import model_registry

    config = model_registry("debugmodel").model
    for layer in config.layers:
        layer.attention.inner_attention = ScaledDotProductAttention.Config()
    torch.manual_seed(0)
    model = config.build()
    model.init_states()
    return config, model.double() if dtype == torch.float64 else model  # keeps the complex RoPE buffer


class PipelineDims:
    """What ``pipeline_llm`` reads of torchtitan's ParallelDims: the pipeline degree and its mesh."""

    def __init__(self, mesh):
        self.pp = mesh.size()
        self._mesh = mesh

    def get_mesh(self, dims):
        return self._mesh


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token sequences a, a + k, a + 2k, ... (mod 2048): inputs and next tokens, [B, SEQ] each."""
    g = torch.Generator().manual_seed(step)
    n = MICROBATCHES * MB_SIZE
    seq = (
        torch.randint(0, 2048, (n, 1), generator=g)
        + torch.randint(1, 5, (n, 1), generator=g) * torch.arange(SEQ + 1)
    ) % 2048
    return seq[:, :-1], seq[:, 1:]


def cross_entropy(logits, target):
    return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten())


def titan_loss(logits, target):
    """torchtitan's loss contract: (loss, extra); its schedule sums microbatches (scale_grads=False)."""
    return cross_entropy(logits, target) / MICROBATCHES, None


def run(rank: int, world: int, args) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig
    from torchtitan.distributed.pipeline_parallel import pipeline_llm

    from tfz.nn import convert_to_freezable
    from tfz.pipeline import make_freeze_aware, torch_schedule_stages
    from tfz.schedule.torch_io import from_torch
    from tfz.timing import ActionTimer

    torch.set_num_threads(1)
    config, model = llama3_debug()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("pp",))
    parallelism = ParallelismConfig(
        pipeline_parallel_degree=world,
        pipeline_parallel_schedule="1F1B",
        pipeline_parallel_microbatch_size=MB_SIZE,
    )
    pp_schedule, parts, _, _ = pipeline_llm(
        model,
        parallel_dims=PipelineDims(mesh),
        training=TrainingConfig(local_batch_size=MICROBATCHES * MB_SIZE, seq_len=SEQ),
        parallelism=parallelism,
        compile_config=CompileConfig(),
        ac_config=None,
        dump_folder=".",
        device=torch.device("cpu"),
        model_config=config,
        parallelize_fn=lambda module, **kwargs: module,
        loss_fn=titan_loss,
    )
    # torchtitan returns the schedule only: its stages are reached through it
    stages = torch_schedule_stages(pp_schedule)
    modules = {
        st.stage_index: convert_to_freezable(st.submod) for st in stages
    }  # torchtitan's Linear subclass
    schedule = from_torch(type(pp_schedule), ranks=world, microbatches=MICROBATCHES)
    controller = _common.timelyfreeze(args, schedule, modules)
    timer = ActionTimer()
    for st in stages:
        make_freeze_aware(st, provider=controller, timer=timer)
    pipe = _common.Pipeline(
        schedule, pp_schedule, stages, modules, controller, timer, lr=1e-3, loss_scale=MICROBATCHES
    )
    reference = None
    if args.check_grads:
        from torchtitan.distributed.pipeline_parallel import _generate_llm_fqn_per_model_part, _split_module

        _, full = llama3_debug(torch.float64)
        names = _generate_llm_fqn_per_model_part(schedule.num_stages, len(config.layers), 1, 1)
        reference = _common.Reference(
            {s: _split_module(copy.deepcopy(full), names[s]) for s in range(schedule.num_stages)},
            cross_entropy,
        )
    return _common.train(pipe, args, batch, MICROBATCHES, reference)


if __name__ == "__main__":
    _common.main(run, _common.parse(_common.parser(__doc__.splitlines()[0]), only_world=2))
