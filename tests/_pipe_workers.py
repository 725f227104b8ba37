"""Workers for the tfz.pipeline tests: a tiny model cut into stages, a fixed freezing plan, and rank
functions run through :func:`tfz.pipeline.launch`.

Model: per stage ``h + down(tanh(up(norm(h))))`` with LayerNorm(8), up = Linear(8, 12),
down = Linear(12, 8); stage 0 first embeds token ids (Embedding(11, 8)). Loss: MSE against a random
target. A microbatch has ``TOKENS`` = 3 rows, a number that is no layer width, so a GEMM whose
contraction dimension is 3 is a weight-gradient GEMM (dW = dY^T X), and nothing else is.
"""

from __future__ import annotations

import contextlib
import tempfile

import numpy as np

DIM, HIDDEN, VOCAB, TOKENS = 8, 12, 11, 3
MICROBATCHES = 4
BLOCK_ROWS = 4
SCHEDULES = ("gpipe", "1f1b", "interleaved1f1b", "interleavedzb", "zbv", "dualpipev", "zbh1")
V_SCHEDULES = ("zbv", "dualpipev")
"""Schedules placing stages s and s + 1 on one rank."""


def gloo_runs_v_placements() -> bool:
    """torch's stages exchange metadata on the first step; versions without ``_is_same_rank`` (torch
    2.11) send it from a rank to itself between V-placed stages, which gloo cannot do."""
    from torch.distributed.pipelining import PipelineStage

    return hasattr(PipelineStage, "_is_same_rank")


def runnable(schedule: str) -> bool:
    return schedule not in V_SCHEDULES or gloo_runs_v_placements()


def skip_unrunnable(schedule: str):
    """A pytest mark skipping a test of ``schedule`` where this torch cannot run it on gloo."""
    import pytest
    import torch

    why = f"torch {torch.__version__} cannot run V placements on gloo (metadata sent rank to itself)"
    return pytest.mark.skipif(not runnable(schedule), reason=why)


def schedule_params(names=SCHEDULES) -> list:
    """pytest params of ``names``; V schedules skip where this torch cannot run them on gloo."""
    import pytest

    return [pytest.param(s, marks=skip_unrunnable(s)) for s in names]


RATIOS = (0.0, 0.55, 1.0, 0.3, 0.8, 0.0, 0.45, 1.0, 0.2, 0.65, 0.0, 0.9)
"""Freeze ratio of (stage, mb) = RATIOS[(stage * MICROBATCHES + mb) % len(RATIOS)]; see :func:`plan`."""


def make_stage_module(stage: int, dtype=None):
    """The module of ``stage`` (same weights in every process; plain nn.Linear layers)."""
    import torch
    from torch import nn

    class TinyStage(nn.Module):
        def __init__(self, first: bool):
            super().__init__()
            self.embed = nn.Embedding(VOCAB, DIM) if first else None
            self.norm = nn.LayerNorm(DIM)
            self.up = nn.Linear(DIM, HIDDEN)
            self.down = nn.Linear(HIDDEN, DIM)

        def forward(self, x):
            h = self.embed(x) if self.embed is not None else x
            return h + self.down(torch.tanh(self.up(self.norm(h))))

    torch.manual_seed(1000 + stage)
    module = TinyStage(stage == 0)
    with torch.no_grad():  # non-trivial norm parameters, so their gradients matter
        module.norm.weight.uniform_(0.5, 1.5)
        module.norm.bias.uniform_(-0.2, 0.2)
    return module.to(dtype or torch.float32)


def make_batch(microbatches: int = MICROBATCHES, seed: int = 5):
    """Token ids int64 [M * TOKENS] and targets float32 [M * TOKENS, DIM]."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (microbatches * TOKENS,), generator=g)
    target = torch.randn(microbatches * TOKENS, DIM, generator=g)
    return ids, target


def stage_units(stage: int):
    """Freezable units of a stage: up/down in 4-row blocks, plus norm (and embedding) tensors."""
    import tfz.nn
    from tfz.masks import StageUnits

    module = tfz.nn.convert_to_freezable(make_stage_module(stage))
    return StageUnits.from_module(module, block_rows=BLOCK_ROWS, include_tensors=True)


def plan(num_stages: int, microbatches: int = MICROBATCHES) -> dict:
    """(stage, mb) -> StageMasks: ratios 0 and 1 and partial ones; stage 0's microbatch 2 fully frozen
    (embedding included); on the last stage, microbatch 1 freezes whole norm tensors next to row blocks."""
    from tfz.masks import StageMasks, select

    table = {}
    for s in range(num_stages):
        units = stage_units(s)
        for mb in range(microbatches):
            ratio = RATIOS[(s * microbatches + mb) % len(RATIOS)]
            if s == 0 and mb == 2:
                ratio = 1.0
            table[(s, mb)] = select(units, ratio, stage=s, microbatch=mb, seed=7)
        chosen = np.array(
            [
                (u.name == "norm.weight")
                or (u.name == "norm.bias")
                or (u.name == "up" and u.start == 4)
                or (u.name == "down" and u.start == 0)
                for u in units.units
            ]
        )
        if s == num_stages - 1:
            table[(s, 1)] = StageMasks(units=units, ratio=0.5, frozen=chosen)
    return table


def schedule_layout(name: str, microbatches: int = MICROBATCHES):
    """(tfz Schedule, number of stages) for 2 ranks."""
    from tfz.schedule import build_schedule

    sched = build_schedule(name, 2, microbatches)
    return sched, sched.num_stages


def dw_flop_counter():
    """A dispatch mode adding up (``.flops``) the FLOPs of GEMMs whose contraction dimension is TOKENS,
    i.e. the weight-gradient GEMMs."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    gemm = {aten.mm: (0, 1), aten.addmm: (1, 2), aten.addmm_: (1, 2)}

    class DwFlops(TorchDispatchMode):
        flops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            where = gemm.get(func.overloadpacket)
            if where is not None:
                a, b = args[where[0]], args[where[1]]
                if a.shape[1] == TOKENS:
                    self.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
            return func(*args, **(kwargs or {}))

    return DwFlops()


def _grads(modules: dict) -> dict:
    return {
        s: {n: (None if p.grad is None else p.grad.reshape(-1).tolist()) for n, p in m.named_parameters()}
        for s, m in modules.items()
    }


def _build(name: str, variant: str, rank: int, timer, provider, csv_dir: str):
    """Stages and schedule of one run: variant "direct" (FreezeAwareStage), "swap" (make_freeze_aware
    after the schedule exists), "none" (make_freeze_aware without provider), "none-tfz" (the same,
    as on a torch whose own I/W split cannot run FreezableLinear: tfz's backward, nothing frozen),
    "plain" (torch only)."""
    import torch
    import torch.nn.functional as F
    from torch.distributed.pipelining import PipelineStage

    import tfz.nn
    from tfz.pipeline import FreezeAwareStage, build_torch_schedule, make_freeze_aware

    sched_tfz, num_stages = schedule_layout(name)
    ids = sched_tfz.stages_of(rank)
    modules = {s: tfz.nn.convert_to_freezable(make_stage_module(s)) for s in ids}
    cpu = torch.device("cpu")
    if variant == "direct":
        stages = [
            FreezeAwareStage(modules[s], s, num_stages, cpu, provider=provider, timer=timer) for s in ids
        ]
    else:
        stages = [PipelineStage(modules[s], s, num_stages, cpu) for s in ids]
    loss_fn = lambda out, target: F.mse_loss(out, target)  # noqa: E731
    schedule = build_torch_schedule(sched_tfz, stages, loss_fn, csv_dir=csv_dir)
    if variant == "swap":
        for st in stages:
            make_freeze_aware(st, provider=provider, timer=timer)
    elif variant in ("none", "none-tfz"):
        for st in stages:
            make_freeze_aware(st, timer=timer)
    return sched_tfz, modules, stages, schedule


def run_schedules(rank: int, world: int, runs: list[tuple[str, str]], steps: int = 2) -> list[dict]:
    """Each (schedule, variant) of ``runs``: ``steps`` training steps; per step the stage grads, counters,
    timed action names, measured dW FLOPs (variant "direct"), and pending W work after the step."""
    import torch

    import tfz.pipeline.stage as stage_mod
    from tfz.pipeline import FixedMasks
    from tfz.timing import ActionTimer

    torch.set_num_threads(1)
    split_ok = stage_mod.torch_split_handles_functions
    out = []
    with tempfile.TemporaryDirectory() as csv_dir:
        for name, variant in runs:
            sched_tfz, num_stages = schedule_layout(name)
            provider = FixedMasks(plan(num_stages))
            timer = None if variant == "plain" else ActionTimer("cpu")
            stage_mod.torch_split_handles_functions = (lambda: False) if variant == "none-tfz" else split_ok
            _, modules, stages, schedule = _build(name, variant, rank, timer, provider, csv_dir)
            ids = sched_tfz.stages_of(rank)
            x, y = make_batch()
            result = {"schedule": name, "variant": variant, "steps": []}
            for _ in range(steps):
                for m in modules.values():
                    m.zero_grad(set_to_none=True)
                args = (x,) if 0 in ids else ()
                kwargs = {"target": y, "losses": []} if num_stages - 1 in ids else {}
                counter = dw_flop_counter() if variant == "direct" else None
                with counter if counter is not None else contextlib.nullcontext():
                    schedule.step(*args, **kwargs)
                step = {"grads": _grads(modules)}
                if timer is not None:
                    step["spans"] = [span.name for span in timer.collect_spans()]
                    step["stats"] = {st.stage_index: st.tfz.stats.to_dict() for st in stages}
                    step["pending"] = [st.tfz.store.pending() for st in stages]
                if counter is not None:
                    step["dw_flops"] = counter.flops
                result["steps"].append(step)
            out.append(result)
    return out


class _RaisingProvider:
    """Freezes nothing, but raises on (stage, mb) == ``at``."""

    def __init__(self, at):
        self.at = at

    def masks_for(self, stage, mb):
        if (stage, mb) == self.at:
            raise ValueError(f"provider failed at stage {stage} microbatch {mb}")
        return None


def run_failing(rank: int, world: int, fail_at: tuple[int, int]) -> str:
    """1F1B over 2 stages; the provider of the rank holding ``fail_at``'s stage raises mid-step."""
    import torch
    import torch.nn.functional as F
    from torch.distributed.pipelining import Schedule1F1B

    import tfz.nn
    from tfz.pipeline import FreezeAwareStage

    torch.set_num_threads(1)
    module = tfz.nn.convert_to_freezable(make_stage_module(rank))
    stage = FreezeAwareStage(module, rank, 2, torch.device("cpu"), provider=_RaisingProvider(fail_at))
    schedule = Schedule1F1B(stage, MICROBATCHES, loss_fn=lambda o, t: F.mse_loss(o, t))
    x, y = make_batch()
    schedule.step(*((x,) if rank == 0 else ()), **({"target": y, "losses": []} if rank == 1 else {}))
    return "finished"


def reference_grads(num_stages: int, table: dict, microbatches: int = MICROBATCHES, seed: int = 5) -> dict:
    """Plain float64 autograd per microbatch, gradients masked like ``table``, summed, divided by M.

    Returns {stage: {param name: flat list, or None when no microbatch trained it}}.
    """
    import torch
    import torch.nn.functional as F

    modules = {s: make_stage_module(s).double() for s in range(num_stages)}
    ids, target = make_batch(microbatches, seed)
    sums = {s: {n: None for n, _ in m.named_parameters()} for s, m in modules.items()}
    for mb, (xm, ym) in enumerate(zip(ids.chunk(microbatches), target.double().chunk(microbatches))):
        h = xm
        for s in range(num_stages):
            h = modules[s](h)
        loss = F.mse_loss(h, ym)
        for s, m in modules.items():
            names = [n for n, _ in m.named_parameters()]
            grads = torch.autograd.grad(loss, list(m.parameters()), retain_graph=True)
            masks = table.get((s, mb))
            for n, g in zip(names, grads):
                keep = _kept(masks, n, g.shape)
                if keep is None:
                    continue
                g = g * keep
                sums[s][n] = g if sums[s][n] is None else sums[s][n] + g
    return {
        s: {n: (None if g is None else (g / microbatches).reshape(-1).tolist()) for n, g in d.items()}
        for s, d in sums.items()
    }


def assert_grads_match(grads: dict, ref: dict, where: str) -> None:
    """One stage's gradients {name: flat list or None} equal ``ref``'s: None where no microbatch
    trained the parameter, else within 1e-6."""
    assert grads.keys() == ref.keys(), where
    for name, g in grads.items():
        at = f"{where} {name}"
        if ref[name] is None:
            assert g is None, f"{at}: frozen in every microbatch but has a gradient"
            continue
        assert g is not None, f"{at}: gradient missing"
        np.testing.assert_allclose(g, ref[name], rtol=0, atol=1e-6, err_msg=at)


def _kept(masks, name: str, shape):
    """float64 multiplier of a parameter gradient under ``masks`` (None: frozen as a whole)."""
    import torch

    if masks is None:
        return torch.ones(shape, dtype=torch.float64)
    if name in masks.frozen_tensors:
        return None
    layer, _, kind = name.rpartition(".")
    rows = masks.active_rows.get(layer)
    if rows is None:
        return torch.ones(shape, dtype=torch.float64)
    if not rows.any():
        return None
    keep = torch.from_numpy(rows.astype(np.float64))
    return keep[:, None].expand(shape) if kind == "weight" else keep


def expected_flops(num_stages: int, table: dict, microbatches: int = MICROBATCHES) -> dict:
    """{(stage, mb): (computed, skipped)} dW GEMM FLOPs from the masks: 2 * TOKENS * rows * in."""
    out = {}
    for s in range(num_stages):
        for mb in range(microbatches):
            masks = table.get((s, mb))
            computed = skipped = 0
            for layer, (rows, inp) in {"up": (HIDDEN, DIM), "down": (DIM, HIDDEN)}.items():
                active = rows if masks is None else int(masks.active_rows[layer].sum())
                computed += 2 * TOKENS * active * inp
                skipped += 2 * TOKENS * (rows - active) * inp
            out[(s, mb)] = (computed, skipped)
    return out


TRACER_FROZEN = {
    (0, 1): {"a.weight"},
    (0, 3): {"a.weight", "a.bias"},
    (1, 1): {"n.weight"},
    (1, 2): {"b.weight", "b.bias", "n.bias"},
}
"""Whole tensors frozen per (stage, mb) in the tracer test (stage 0 = a; stage 1 = n, b)."""


def tracer_model():
    """Plain float32 ``b(n(tanh(a(x))))``, a = b = Linear(8, 8), n = LayerNorm(8); split before n."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.n, self.b = nn.Linear(DIM, DIM), nn.LayerNorm(DIM), nn.Linear(DIM, DIM)

        def forward(self, x):
            return self.b(self.n(torch.tanh(self.a(x))))

    torch.manual_seed(11)
    return Net()


def tracer_batch():
    import torch

    g = torch.Generator().manual_seed(12)
    return torch.randn(MICROBATCHES * TOKENS, DIM, generator=g), torch.randn(
        MICROBATCHES * TOKENS, DIM, generator=g
    )


def run_tracer(rank: int, world: int) -> dict:
    """1F1B on stages built by torch's tracer (``pipeline`` + ``build_stage``), made freeze-aware
    after the schedule exists; whole-tensor freezes from TRACER_FROZEN. Returns class name and grads."""
    import torch
    import torch.nn.functional as F
    from torch.distributed.pipelining import Schedule1F1B, SplitPoint, pipeline

    from tfz.masks import StageMasks, StageUnits
    from tfz.pipeline import FixedMasks, make_freeze_aware

    torch.set_num_threads(1)
    x, y = tracer_batch()
    pipe = pipeline(
        tracer_model(), mb_args=(x.chunk(MICROBATCHES)[0],), split_spec={"n": SplitPoint.BEGINNING}
    )
    stage = pipe.build_stage(rank, torch.device("cpu"))
    units = StageUnits.from_module(stage.submod, include_tensors=True)
    table = {
        key: StageMasks(units=units, ratio=0.5, frozen=np.array([u.name in names for u in units.units]))
        for key, names in TRACER_FROZEN.items()
        if key[0] == rank
    }
    schedule = Schedule1F1B(stage, MICROBATCHES, loss_fn=lambda o, t: F.mse_loss(o, t))
    make_freeze_aware(stage, provider=FixedMasks(table))
    stage.submod.zero_grad(set_to_none=True)
    schedule.step(*((x,) if rank == 0 else ()), **({"target": y} if rank == 1 else {}))
    grads = {
        n: (None if p.grad is None else p.grad.reshape(-1).tolist())
        for n, p in stage.submod.named_parameters()
    }
    return {"class": type(stage).__name__, "base": type(stage).__mro__[1].__name__, "grads": grads}


def tracer_reference() -> dict:
    """{param name: masked mean gradient or None}: plain float64 autograd per microbatch."""
    import torch
    import torch.nn.functional as F

    model = tracer_model().double()
    x, y = tracer_batch()
    stage_of = {"a": 0, "n": 1, "b": 1}
    sums: dict = {}
    for mb, (xm, ym) in enumerate(zip(x.double().chunk(MICROBATCHES), y.double().chunk(MICROBATCHES))):
        loss = F.mse_loss(model(xm), ym)
        names = [n for n, _ in model.named_parameters()]
        for n, g in zip(names, torch.autograd.grad(loss, list(model.parameters()))):
            if n in TRACER_FROZEN.get((stage_of[n.split(".")[0]], mb), ()):
                sums.setdefault(n, None)
                continue
            sums[n] = g if sums.get(n) is None else sums[n] + g
    return {n: (None if g is None else (g / MICROBATCHES).reshape(-1).tolist()) for n, g in sums.items()}
