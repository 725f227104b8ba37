"""FreezableLinear overhead and savings against nn.Linear (tfz.nn, tfz.optim), CPU fp32.

Run: ``python -m pytest bench/bench_nn.py -q --benchmark-enable --benchmark-columns=min,median,max,rounds``

One forward + backward of a stack of 4 Linear(D, D) layers over T tokens; variants: plain nn.Linear,
FreezableLinear without masks, half the rows frozen, every row frozen, and the split mode (capture
in B, flush in W). The microbatch group accumulates four microbatches into existing grads with 3/4 of
the rows frozen, returning dW to autograd or adding it in place (``use_row_masks(in_place=True)``, what
tfz.pipeline's B actions do). The stage group times the B of the demo's last stage (a LLaMA
stage: attention, SwiGLU, LM head) with plain nn.Linear, FreezableLinear unmasked, the masks of a
plan at ratio 0.8 (each microbatch's in turn; scattered blocks or row arcs) and every row frozen
(``bench/mask_layout_backward.py`` compares the layouts with the variants alternating).
The optimizer group times AdamW.step: torch's own (for-loop and
``fused=True``), with the row-freezing hooks (``rescale=True``, ``step_scale=0.5``, ``fused=False``)
around either, and tfz's one-pass step (the default where it applies). The GPU group
(``adamw-step-gpu``, ``-m gpu``) times the same variants on CUDA at LLaMA-8B's MLP shapes (up
4096 -> 14336, down 14336 -> 4096; fp32 master weights; the one pass is the Triton kernel there),
each step with a synchronisation, so the hooks' host reads count.
"""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from tfz.nn import WeightGradStore, convert_to_freezable, prepare_row_masks, use_row_masks
from tfz.optim import attach_row_freezing

D, T, LAYERS = 512, 256, 4


def _stack():
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(D, D) for _ in range(LAYERS)])


def _masks(model, frozen_fraction):
    rows = torch.ones(D, dtype=torch.bool)
    rows[: int(D * frozen_fraction)] = False
    return prepare_row_masks({layer: rows for layer in model})


def _step(model, x, masks=None):
    model.zero_grad(set_to_none=True)
    if masks is None:
        model(x).sum().backward()
    else:
        with use_row_masks(masks):
            model(x).sum().backward()


@pytest.mark.benchmark(group="linear_fwd_bwd")
@pytest.mark.parametrize("variant", ["nn.Linear", "freezable", "frozen_0.5", "frozen_1.0", "split"])
def test_linear_fwd_bwd(benchmark, variant):
    torch.set_num_threads(1)
    x = torch.randn(T, D, requires_grad=True)
    plain = _stack()
    if variant == "nn.Linear":
        benchmark(_step, plain, x)
        return
    model = convert_to_freezable(copy.deepcopy(plain))
    if variant == "freezable":
        benchmark(_step, model, x)
    elif variant.startswith("frozen_"):
        benchmark(_step, model, x, _masks(model, float(variant.split("_")[1])))
    else:
        store = WeightGradStore()

        def split():
            model.zero_grad(set_to_none=True)
            with store.capture(0, 0):
                model(x).sum().backward()
            store.flush(0, 0)

        benchmark(split)
    assert all(p.grad is not None for p in model.parameters()) or variant == "frozen_1.0"


@pytest.mark.benchmark(group="microbatch_accumulate")
@pytest.mark.parametrize("in_place", [False, True])
def test_microbatch_accumulation(benchmark, in_place):
    """Four microbatches whose dW add into existing .grad, 3/4 of the rows frozen: autograd's dense
    add of a fresh masked gradient (default) against the active rows added in place."""
    torch.set_num_threads(1)
    model = convert_to_freezable(_stack())
    masks = _masks(model, 0.75)
    xs = [torch.randn(T, D) for _ in range(4)]
    model(xs[0]).sum().backward()  # .grad exists, as from an earlier microbatch

    def microbatches():
        for x in xs:
            with use_row_masks(masks, in_place=in_place):
                model(x).sum().backward()

    benchmark(microbatches)


STAGE_B = {  # name: (FreezableLinear, freeze ratio, tfz.masks layout of the 8 microbatch masks)
    "nn.Linear": (False, 0.0, None),
    "freezable": (True, 0.0, None),
    "cover_0.8": (True, 0.8, "select_covering"),
    "arcs_0.8": (True, 0.8, "select_row_arcs"),
    "frozen_1.0": (True, 1.0, None),
}


def demo_last_stage(*, plain: bool = False):
    """The demo's last stage for timing its B (2 LLaMA layers at dim 384 and the LM head, 4 x 64
    tokens, 1 thread): ``(units, plan, forward, backward)``. ``plan(masks)`` is the masks' MaskPlan,
    ``forward()`` gives (loss, input), ``backward(loss, input, plan)`` runs the pipeline's B, adding
    into the grads. ``plain``: nn.Linear layers in place of the FreezableLinears (sharing weights)."""
    from tfz.demo import DemoConfig
    from tfz.demo.worker import _loss_fn, build_model
    from tfz.masks import StageUnits
    from tfz.pipeline.engine import MaskPlan, StageParams, full_backward

    torch.set_num_threads(1)
    cfg = DemoConfig(task="pretrain", output_layer="freezable", vocab_size=256)  # as recorded
    first, stage = build_model(cfg, 2, range(2), 0).values()
    units = StageUnits.from_module(stage, block_rows=cfg.block_rows)
    if plain:
        for name, layer in list(stage.named_modules()):
            if isinstance(layer, nn.Linear):
                linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
                linear.weight, linear.bias = layer.weight, layer.bias
                stage.set_submodule(name, linear)
    params = StageParams(stage)
    x = torch.randint(0, 256, (cfg.microbatch_size, cfg.seq_len))
    h = first(x).detach()

    def forward():
        inp = h.clone().requires_grad_(True)
        return _loss_fn(stage(inp), x), inp

    def backward(loss, inp, plan):
        full_backward(loss, None, [inp], plan, params)

    return units, lambda masks: MaskPlan(masks, params), forward, backward


def alternating_medians(backward, names, rounds: int) -> tuple[dict, dict]:
    """(median ms per name, every time in seconds per name) of ``backward(name, i)`` (seconds) over
    ``rounds`` rounds that each run every name once, in an order reversed every other round, so the
    machine's drift falls on all of them."""
    times = {name: [] for name in names}
    for i in range(rounds):
        for name in names if i % 2 else names[::-1]:
            times[name].append(backward(name, i))
    return {name: float(np.median(v)) * 1e3 for name, v in times.items()}, times


def all_frozen(units):
    """Masks freezing every unit of ``units``."""
    from tfz.masks import StageMasks

    return StageMasks(units, 1.0, np.ones(len(units), dtype=bool))


@pytest.mark.benchmark(group="stage_backward")
@pytest.mark.parametrize("variant", list(STAGE_B))
def test_stage_backward(benchmark, variant):
    """B of the demo's last stage (:func:`demo_last_stage`), added into existing grads as the pipeline
    does: plain nn.Linear layers, FreezableLinear unmasked, the 8 microbatch masks of a plan at ratio
    0.8 (32-row blocks) taken in turn, scattered blocks (cover) or one run of rows per layer (arcs),
    and every row frozen."""
    from tfz import masks as tfz_masks

    freezable, ratio, layout = STAGE_B[variant]
    units, plan, forward, backward = demo_last_stage(plain=not freezable)
    if 0.0 < ratio < 1.0:
        masks = getattr(tfz_masks, layout)(units, [ratio] * 8, stage=1)
    elif ratio == 1.0:
        masks = [all_frozen(units)]
    else:
        masks = [None]
    plans = [plan(m) for m in masks]
    turn = iter(range(1 << 30))

    def timed(loss, inp):
        backward(loss, inp, plans[next(turn) % len(plans)])

    timed(*forward())  # grads exist from here on: every timed B adds into them
    benchmark.pedantic(timed, setup=lambda: (forward(), {}), rounds=40, warmup_rounds=4)


@pytest.mark.benchmark(group="mask_plan")
@pytest.mark.parametrize("stage_id", [0, 1])
def test_mask_plan(benchmark, stage_id):
    """What a freeze-aware stage prepares at the start of a step whose masks were redrawn: the 8
    MaskPlans of one covering draw at ratio 0.8 for a stage of the demo's model (15 FreezableLinears,
    32-row blocks), a fresh draw per round."""
    from tfz.demo import DemoConfig
    from tfz.demo.worker import build_model
    from tfz.masks import StageUnits, select_covering
    from tfz.pipeline.engine import MaskPlan, StageParams

    cfg = DemoConfig(task="pretrain", output_layer="freezable", vocab_size=256)  # as recorded
    stage = build_model(cfg, 2, range(2), 0)[stage_id]
    units = StageUnits.from_module(stage, block_rows=cfg.block_rows)
    params = StageParams(stage)
    draws = iter(range(1 << 30))

    def draw():
        return (select_covering(units, [0.8] * 8, stage=stage_id, step=next(draws)),), {}

    def prepare(masks):
        return [MaskPlan(m, params) for m in masks]

    plans = benchmark.pedantic(prepare, setup=draw, rounds=100, warmup_rounds=5)
    assert len(plans) == 8 and all(0 < len(p.row_masks) for p in plans)


ADAMW = {  # name: (torch's fused=True, row freezing: None or attach_row_freezing's fused)
    "torch": (False, None),
    "torch_fused": (True, None),
    "hooks": (False, False),
    "hooks_torch_fused": (True, False),
    "native": (False, True),
}


@pytest.mark.benchmark(group="adamw_step")
@pytest.mark.parametrize("variant", list(ADAMW))
def test_adamw_step(benchmark, variant):
    """Four microbatches, each with a different quarter of the rows active (a covering plan at ratio
    0.75): every row is partly frozen in the step."""
    torch_fused, row_fused = ADAMW[variant]
    torch.set_num_threads(1)
    model = convert_to_freezable(_stack())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, fused=torch_fused)
    quarters = [
        prepare_row_masks({layer: torch.arange(D) // (D // 4) == q for layer in model}) for q in range(4)
    ]
    x = torch.randn(T, D, requires_grad=True)
    handle = None
    if row_fused is not None:
        handle = attach_row_freezing(opt, model, rescale=True, step_scale=0.5, fused=row_fused)

    def microbatches():  # not timed: grads and row usage are recorded afresh for every step
        model.zero_grad(set_to_none=True)
        for masks in quarters:
            with use_row_masks(masks):
                model(x).sum().backward()

    benchmark.pedantic(opt.step, setup=microbatches, rounds=60, warmup_rounds=5)
    if handle is not None:
        assert (handle.fused_tensors > 0) == row_fused
        handle.remove()


def _quarter_step(model, x, quarters):
    """Four microbatches, each with a different quarter of every layer's rows active."""
    model.zero_grad(set_to_none=True)
    for masks in quarters:
        with use_row_masks(masks):
            model(x).sum().backward()
    if x.is_cuda:
        torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.benchmark(group="adamw-step-gpu")
@pytest.mark.parametrize("variant", list(ADAMW))
def test_adamw_step_gpu(benchmark, variant):
    from bench_wgrad import FAKE, GPU, gpu, record

    if not (GPU or FAKE):
        pytest.skip(gpu.kwargs["reason"])
    device = torch.device("cuda" if GPU else "cpu")
    shapes = [(4096, 14336), (14336, 4096)] if GPU else [(64, 128), (128, 64)]  # (in, out)
    torch_fused, row_fused = ADAMW[variant]
    torch.manual_seed(0)
    model = convert_to_freezable(nn.Sequential(*[nn.Linear(i, o) for i, o in shapes])).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, fused=torch_fused)
    quarters = [
        prepare_row_masks(
            {layer: torch.arange(layer.out_features) % 4 == q for layer in model}, device=device
        )
        for q in range(4)
    ]
    x = torch.randn(512 if GPU else 8, shapes[0][0], device=device)
    handle = None
    if row_fused is not None:
        handle = attach_row_freezing(opt, model, rescale=True, step_scale=0.5, fused=row_fused)

    def step():
        opt.step()
        if GPU:
            torch.cuda.synchronize()

    benchmark.pedantic(step, setup=lambda: _quarter_step(model, x, quarters), rounds=20, warmup_rounds=3)
    median_ms = benchmark.stats.stats.median * 1e3
    record(
        group="adamw-step-gpu",
        variant=variant,
        ms=median_ms,
        params=sum(p.numel() for p in model.parameters()),
    )
    benchmark.extra_info.update(variant=variant, ms=median_ms)
    if handle is not None:
        assert (handle.fused_tensors > 0) == row_fused
        handle.remove()
