"""Workers for the pipeline x data parallel tests: 4 gloo ranks as a (dp=2, pp=2) grid.

Each data-parallel replica runs the 2-stage pipeline of :mod:`_pipe_workers` on its own batch (seed
``5 + dp``) under the same fixed freezing plan; its stage modules are wrapped in DDP or FSDP2
(``fully_shard``) over the replica group. After a step every replica must hold the mean of the two
replicas' masked gradients.
"""

from __future__ import annotations

import tempfile

from _pipe_workers import make_batch, make_stage_module, plan, schedule_layout

DP = 2
DDP_SCHEDULES = ("gpipe", "1f1b", "interleaved1f1b")
"""Schedules with full backwards only: DDP reduces in autograd hooks, which deferred dW bypasses."""


def _wrap(module, how: str, dp_mesh):
    if how == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module, process_group=dp_mesh.get_group())
    if how == "fsdp":
        from torch.distributed.fsdp import fully_shard

        return fully_shard(module, mesh=dp_mesh, reshard_after_forward=True)
    raise ValueError(f"wrapper must be 'ddp' or 'fsdp', got {how!r}")


def _full_grads(module) -> dict:
    from torch.distributed.tensor import DTensor

    from tfz.pipeline.engine import stage_module

    out = {}
    for n, p in stage_module(module).named_parameters():
        g = p.grad
        if isinstance(g, DTensor):
            g = g.full_tensor()
        out[n] = None if g is None else g.reshape(-1).tolist()
    return out


def run_dp(rank: int, world: int, runs: list[tuple[str, str]], steps: int = 2) -> list[dict]:
    """Each (schedule, wrapper) of ``runs``: ``steps`` steps; per step the stage grads (full tensors)."""
    import torch
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh

    import tfz.nn
    from tfz.pipeline import FixedMasks, FreezeAwareStage, build_torch_schedule

    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (DP, world // DP), mesh_dim_names=("dp", "pp"))
    dp, pp = mesh["dp"].get_local_rank(), mesh["pp"].get_local_rank()
    out = []
    with tempfile.TemporaryDirectory() as csv_dir:
        for name, how in runs:
            sched, num_stages = schedule_layout(name)
            provider = FixedMasks(plan(num_stages))
            ids = sched.stages_of(pp)
            modules = {
                s: _wrap(tfz.nn.convert_to_freezable(make_stage_module(s)), how, mesh["dp"]) for s in ids
            }
            stages = [
                FreezeAwareStage(
                    modules[s],
                    s,
                    num_stages,
                    torch.device("cpu"),
                    group=mesh["pp"].get_group(),
                    provider=provider,
                )
                for s in ids
            ]
            schedule = build_torch_schedule(sched, stages, lambda o, t: F.mse_loss(o, t), csv_dir=csv_dir)
            x, y = make_batch(seed=5 + dp)
            result = {"schedule": name, "wrapper": how, "dp": dp, "pp": pp, "steps": []}
            for _ in range(steps):
                for m in modules.values():
                    m.zero_grad(set_to_none=True)
                args = (x,) if 0 in ids else ()
                kwargs = {"target": y, "losses": []} if num_stages - 1 in ids else {}
                schedule.step(*args, **kwargs)
                result["steps"].append({s: _full_grads(m) for s, m in modules.items()})
            out.append(result)
    return out


def observe_sharded(rank: int, world: int) -> None:
    """APF observing a ``fully_shard``-ed stage module (raises: metrics cannot judge shards)."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh

    import tfz.nn
    from tfz.metrics import APFMetric

    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world,))
    module = _wrap(tfz.nn.convert_to_freezable(make_stage_module(1)), "fsdp", mesh)
    APFMetric().observe(0, {1: module})
