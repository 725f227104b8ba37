"""tfz.pipeline in one process: the backward engine against plain autograd, mask providers, the stage
API (class swap, idempotence, refusals) and a one-rank pipeline."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from _pipe_workers import (  # noqa: E402
    DIM,
    HIDDEN,
    TOKENS,
    expected_flops,
    make_batch,
    make_stage_module,
    plan,
    reference_grads,
    stage_units,
)
from torch import nn  # noqa: E402

import tfz.nn  # noqa: E402
from tfz.masks import StageMasks, StageUnits, select  # noqa: E402
from tfz.nn import WeightGradStore  # noqa: E402
from tfz.pipeline import FixedMasks, RatioMasks  # noqa: E402
from tfz.pipeline.engine import (  # noqa: E402
    MaskPlan,
    PlanCache,
    StageParams,
    full_backward,
    input_backward,
    w_flops,
    weight_backward,
)


def _module(stage=1):
    return tfz.nn.convert_to_freezable(make_stage_module(stage).double())


def _masks(stage=1, pattern=("up", 4)):
    """Stage masks freezing norm.weight, the rows [4, 8) of ``up`` and all of ``down``."""
    units = stage_units(stage)
    frozen = np.array(
        [u.name == "norm.weight" or (u.name, u.start) == pattern or u.name == "down" for u in units.units]
    )
    return StageMasks(units=units, ratio=0.5, frozen=frozen)


def _reference(stage, x, dy, masks):
    """(input grad, {name: masked grad or None}) by plain float64 autograd on an nn.Linear copy."""
    module = make_stage_module(stage).double()
    x = x.detach().clone().requires_grad_(x.requires_grad)
    out = module(x)
    params = dict(module.named_parameters())
    inputs = ([x] if x.requires_grad else []) + list(params.values())
    grads = torch.autograd.grad(out, inputs, dy)
    dx = grads[0] if x.requires_grad else None
    ref = {}
    rows = masks.active_rows
    for (name, _), g in zip(params.items(), grads[-len(params) :]):
        layer, _, kind = name.rpartition(".")
        if name in masks.frozen_tensors or (layer in rows and not rows[layer].any()):
            ref[name] = None
        elif layer in rows:
            keep = torch.from_numpy(rows[layer]).double()
            ref[name] = g * (keep[:, None] if kind == "weight" else keep)
        else:
            ref[name] = g
    return dx, ref


def _inputs(stage=1):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(TOKENS, DIM, generator=g, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(TOKENS, DIM, generator=g, dtype=torch.float64)
    return x, dy


def _check(module, ref):
    for name, p in module.named_parameters():
        if ref[name] is None:
            assert p.grad is None, name
        else:
            torch.testing.assert_close(p.grad, ref[name], rtol=0, atol=1e-12, msg=name)


# -- engine -----------------------------------------------------------------------------------------


def test_full_backward_equals_masked_autograd():
    module, masks = _module(), _masks()
    x, dy = _inputs()
    params = StageParams(module)
    plan_ = MaskPlan(masks, params)
    dx = full_backward((module(x),), (dy,), [x], plan_, params)
    dx_ref, ref = _reference(1, x, dy, masks)
    torch.testing.assert_close(dx[0], dx_ref, rtol=0, atol=1e-12)
    assert x.grad is None  # handed back, not left behind
    _check(module, ref)
    # row usage: down (fully frozen, left out of the backward) recorded as one all-frozen call
    assert module.down.row_usage.calls == 1 and module.down.row_usage.counts is None
    assert module.up.row_usage.counts.tolist() == [1] * 4 + [0] * 4 + [1] * 4


def test_full_backward_every_param_gives_frozen_parameters_zero_gradients():
    """DDP's last backward: the same gradients, but frozen parameters get zeros instead of None."""
    module, masks = _module(), _masks()
    x, dy = _inputs()
    params = StageParams(module)
    dx = full_backward((module(x),), (dy,), [x], MaskPlan(masks, params), params, every_param=True)
    dx_ref, ref = _reference(1, x, dy, masks)
    torch.testing.assert_close(dx[0], dx_ref, rtol=0, atol=1e-12)
    frozen = [n for n, g in ref.items() if g is None]
    assert set(frozen) == {"norm.weight", "down.weight", "down.bias"}
    _check(
        module, {n: torch.zeros_like(p) if ref[n] is None else ref[n] for n, p in module.named_parameters()}
    )
    # the hooks are gone: a plain backward accumulates the real gradient of a frozen tensor again
    module.zero_grad(set_to_none=True)
    module(x).backward(dy)
    assert module.norm.weight.grad.abs().sum() > 0


def test_stage_params_notice_replaced_parameters():
    module = _module()
    params = StageParams(module)
    assert params.current()
    module.up.weight.requires_grad_(False)
    assert not params.current()
    module.up.weight.requires_grad_(True)
    assert params.current()
    module.norm.weight = torch.nn.Parameter(module.norm.weight.detach().clone())
    assert not params.current()


def test_input_then_weight_backward_equals_masked_autograd():
    module, masks = _module(), _masks()
    x, dy = _inputs()
    params, store = StageParams(module), WeightGradStore()
    plan_ = MaskPlan(masks, params)
    dx = input_backward((module(x),), (dy,), [x], plan_, params, store, (1, 3))
    dx_ref, ref = _reference(1, x, dy, masks)
    torch.testing.assert_close(dx[0], dx_ref, rtol=0, atol=1e-12)
    # after I: norm.bias has its gradient, FreezableLinear dW is queued, frozen tensors untouched
    torch.testing.assert_close(module.norm.bias.grad, ref["norm.bias"], rtol=0, atol=1e-12)
    assert module.up.weight.grad is None and module.norm.weight.grad is None
    assert store.pending() == [(1, 3)]
    assert weight_backward(plan_, store, (1, 3)) == 1  # only `up` was queued: `down` is fully frozen
    assert store.pending() == []
    _check(module, ref)


def test_input_backward_without_trainable_work_still_opens_the_queue():
    module = _module()
    units = stage_units(1)
    masks = StageMasks(units=units, ratio=1.0, frozen=np.ones(len(units), dtype=bool))
    params, store = StageParams(module), WeightGradStore()
    plan_ = MaskPlan(masks, params)
    x, dy = _inputs()
    dx = input_backward((module(x),), (dy,), [x], plan_, params, store, (1, 0))
    assert dx[0] is not None and store.pending() == [(1, 0)]
    assert weight_backward(plan_, store, (1, 0)) == 0
    assert all(p.grad is None for p in module.parameters())


def test_fully_frozen_stage0_microbatch_runs_no_backward():
    module = tfz.nn.convert_to_freezable(make_stage_module(0))
    units = stage_units(0)
    masks = StageMasks(units=units, ratio=1.0, frozen=np.ones(len(units), dtype=bool))
    params = StageParams(module)
    ids, _ = make_batch(1)
    out = module(ids)
    ran = []
    out.register_hook(lambda g: ran.append(1))
    grads = full_backward((out,), (torch.ones_like(out),), [ids], MaskPlan(masks, params), params)
    assert ran == [] and grads == (None,)
    assert all(p.grad is None for p in module.parameters())
    assert module.up.row_usage.calls == 1 and module.up.row_usage.counts is None


def test_stage0_frozen_front_prunes_the_backward_below_it():
    """Freezing the embedding and norm of stage 0 leaves its input side out of the graph walk."""
    module = tfz.nn.convert_to_freezable(make_stage_module(0))
    units = stage_units(0)
    frozen = np.array([u.kind == "tensor" for u in units.units])
    masks = StageMasks(units=units, ratio=0.3, frozen=frozen)
    params = StageParams(module)
    ids, _ = make_batch(1)
    out = module(ids)
    full_backward((out,), (torch.ones_like(out),), [ids], MaskPlan(masks, params), params)
    assert module.embed.weight.grad is None and module.norm.weight.grad is None
    assert module.up.weight.grad is not None and module.down.weight.grad is not None


def test_w_flops_closed_form():
    module, masks = _module(), _masks()
    params = StageParams(module)
    plan_ = MaskPlan(masks, params)
    tokens = {module.up: 5, module.down: 5}
    up_active = HIDDEN - 4
    assert w_flops(plan_, params, tokens) == (2 * 5 * up_active * DIM, 2 * 5 * (4 * DIM + DIM * HIDDEN))
    assert w_flops(MaskPlan(None, params), params, tokens) == (2 * 5 * (HIDDEN * DIM + DIM * HIDDEN), 0)
    assert w_flops(plan_, params, {}) == (0, 0)


def test_mask_plan_errors():
    module = _module()
    params = StageParams(module)
    other = StageUnits.from_module(nn.Sequential(tfz.nn.FreezableLinear(4, 4)), include_tensors=True)
    with pytest.raises(ValueError, match="masks name a layer that is not in the stage module"):
        MaskPlan(select(other, 0.5, stage=1, microbatch=0), params)
    units = StageUnits(stage_units(1).specs + (tfz.masks.TensorSpec("ghost.weight", 3),), block_rows=4)
    frozen = np.array([u.name == "ghost.weight" for u in units.units])
    with pytest.raises(ValueError, match=r"not parameters of the stage module: \['ghost.weight'\]"):
        MaskPlan(StageMasks(units=units, ratio=0.1, frozen=frozen), params)
    with pytest.raises(TypeError, match="must return StageMasks or None, got dict"):
        PlanCache().get({"up": None}, params)


def test_plan_cache_reuses_plans_per_masks_object():
    module, masks = _module(), _masks()
    params, cache = StageParams(module), PlanCache()
    a = cache.get(masks, params)
    assert cache.get(masks, params) is a
    assert cache.get(None, params) is cache.get(None, params)
    assert cache.get(masks, StageParams(module)) is not a  # parameters re-resolved: rebuilt


# -- providers --------------------------------------------------------------------------------------


def test_fixed_masks():
    table = plan(2)
    provider = FixedMasks(table)
    assert provider.masks_for(1, 2) is table[(1, 2)]
    assert provider.masks_for(5, 0) is None
    with pytest.raises(ValueError, match=r"\(stage, microbatch\) pairs .* got \(1, -1\)"):
        FixedMasks({(1, -1): None})
    with pytest.raises(TypeError, match=r"masks\[\(0, 0\)\] must be StageMasks or None, got float"):
        FixedMasks({(0, 0): 0.5})


def test_ratio_masks_match_select_and_cache():
    units = {0: stage_units(0), 1: stage_units(1)}
    provider = RatioMasks({(0, 1): 0.4, (1, 0): 1.0}, units, seed=3, step=2)
    m = provider.masks_for(0, 1)
    expected = select(units[0], 0.4, stage=0, microbatch=1, step=2, seed=3)
    assert np.array_equal(m.frozen, expected.frozen) and m.ratio == 0.4
    assert provider.masks_for(0, 1) is m
    assert provider.masks_for(1, 0).frozen.all()
    assert provider.masks_for(1, 1) is None
    provider.update(step=3)
    redrawn = provider.masks_for(0, 1)
    assert redrawn is not m
    assert np.array_equal(redrawn.frozen, select(units[0], 0.4, stage=0, microbatch=1, step=3, seed=3).frozen)
    with pytest.raises(ValueError, match=r"ratio of \(0, 0\) must be a finite number in \[0, 1\], got 1.5"):
        RatioMasks({(0, 0): 1.5}, units)
    with pytest.raises(ValueError, match="ratio given for stage 7, which has no entry"):
        RatioMasks({(7, 0): 0.5}, units)
    with pytest.raises(TypeError, match=r"units_by_stage\[0\] must be StageUnits"):
        RatioMasks({}, {0: "units"})


def test_ratio_masks_take_numpy_scalars_as_plain_numbers():
    units = {0: stage_units(0)}
    plain = RatioMasks({(0, 1): 0.5, (0, 2): 1}, units, seed=3, step=2)
    given = RatioMasks(
        {(np.int64(0), np.int32(1)): np.float32(0.5), (0, 2): np.int64(1)},
        units,
        seed=np.int64(3),
        step=np.int64(2),
    )
    for mb in (1, 2):
        assert np.array_equal(given.masks_for(0, mb).frozen, plain.masks_for(0, mb).frozen)
    assert given.seed == 3 and type(given.seed) is int
    fixed = FixedMasks({(np.int64(0), np.int64(1)): plain.masks_for(0, 1)})
    assert fixed.masks_for(0, 1) is plain.masks_for(0, 1)
    for kwargs, match in (({"seed": -1}, "seed"), ({"step": 1.5}, "step"), ({"policy": "random"}, "policy")):
        with pytest.raises((ValueError, TypeError), match=match):
            RatioMasks({}, units, **kwargs)
    with pytest.raises(ValueError, match="step must be an integer >= 0, got 'a'"):
        plain.update(step="a")


# -- stage API on a one-rank process group ----------------------------------------------------------


def _one_stage(cls=None, **kwargs):
    from torch.distributed.pipelining import PipelineStage

    module = tfz.nn.convert_to_freezable(make_stage_module(0))
    return (cls or PipelineStage)(module, 0, 1, torch.device("cpu"), **kwargs)


def test_make_freeze_aware_swaps_class_once(one_rank_group):
    from tfz.pipeline import FreezeAwareStage, make_freeze_aware

    stage = _one_stage()
    provider = FixedMasks({})
    assert make_freeze_aware(stage, provider=provider) is stage
    assert type(stage) is FreezeAwareStage
    state = stage.tfz
    assert state.provider is provider
    other = FixedMasks({})
    assert make_freeze_aware(stage) is stage and stage.tfz is state and state.provider is provider
    make_freeze_aware(stage, provider=other)
    assert type(stage) is FreezeAwareStage and stage.tfz is state and state.provider is other


def test_make_freeze_aware_keeps_subclass_overrides(one_rank_group):
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    from tfz.pipeline import make_freeze_aware

    class Logging(PipelineStage):
        def forward_one_chunk(self, fwd_chunk_id, *args, **kwargs):
            self.log.append(fwd_chunk_id)
            return super().forward_one_chunk(fwd_chunk_id, *args, **kwargs)

    stage = _one_stage(Logging)
    stage.log = []
    schedule = ScheduleGPipe(stage, 2, loss_fn=lambda o, t: F.mse_loss(o, t))
    make_freeze_aware(stage)
    assert isinstance(stage, Logging) and type(stage).__name__ == "FreezeAwareLogging"
    ids, target = make_batch(2)
    schedule.step(ids, target=target)
    assert stage.log == [0, 1]
    assert stage.tfz.stats.actions == ["0F0", "0F1", "0B0", "0B1"]


def test_tracer_stage_class_gets_the_overrides():
    from torch.distributed.pipelining.stage import _PipelineStage

    from tfz.pipeline.stage import _OVERRIDES, _freeze_aware_class

    cls = _freeze_aware_class(_PipelineStage)
    assert issubclass(cls, _PipelineStage) and cls.__name__ == "FreezeAwarePipelineStage"
    assert _freeze_aware_class(_PipelineStage) is cls
    for name, fn in _OVERRIDES.items():
        assert cls.__dict__[name] is fn


def test_refusals(one_rank_group):
    from tfz.pipeline import FreezeAwareStage, make_freeze_aware

    with pytest.raises(TypeError, match="expected a torch pipeline stage"):
        make_freeze_aware(nn.Linear(2, 2))
    stage = _one_stage(dw_builder=lambda: lambda: None)
    cls = type(stage)
    with pytest.raises(ValueError, match="built with a dw_builder"):
        make_freeze_aware(stage)
    assert type(stage) is cls
    with pytest.raises(TypeError, match="provider must have a masks_for"):
        _one_stage(FreezeAwareStage, provider=object())
    with pytest.raises(TypeError, match="timer must have an action"):
        _one_stage(FreezeAwareStage, timer="cpu")


def test_wrappers_defer_to_torch_outside_actions(one_rank_group):
    from torch.distributed.pipelining import stage as torch_stage

    from tfz.pipeline import FreezeAwareStage

    _one_stage(FreezeAwareStage)
    wrapper = torch_stage.stage_backward
    assert wrapper._tfz_original is not None
    a = torch.randn(3, requires_grad=True)
    out = a * 2
    grads = wrapper((out,), (torch.ones(3),), [a])  # torch's own stage_backward
    assert grads[0].tolist() == [2.0, 2.0, 2.0]


def test_requires_grad_change_between_steps_is_picked_up(one_rank_group):
    from torch.distributed.pipelining import ScheduleGPipe

    from tfz.pipeline import FreezeAwareStage

    stage = _one_stage(FreezeAwareStage, provider=FixedMasks({}))
    schedule = ScheduleGPipe(stage, 2, loss_fn=lambda o, t: F.mse_loss(o, t))
    ids, target = make_batch(2)
    schedule.step(ids, target=target)
    stage.submod.norm.weight.requires_grad_(False)
    stage.submod.zero_grad(set_to_none=True)
    schedule.step(ids, target=target)  # would raise if the frozen tensor were still an autograd input
    assert stage.submod.norm.weight.grad is None and stage.submod.norm.bias.grad is not None


@pytest.mark.parametrize("count_flops", [True, "exact", False])
def test_one_rank_pipeline_with_masks(one_rank_group, count_flops):
    from torch.distributed.pipelining import ScheduleGPipe

    from tfz.pipeline import FreezeAwareStage
    from tfz.timing import ActionTimer

    M = 4
    table = plan(1, M)
    timer = ActionTimer("cpu")
    stage = _one_stage(FreezeAwareStage, provider=FixedMasks(table), timer=timer, count_flops=count_flops)
    schedule = ScheduleGPipe(stage, M, loss_fn=lambda o, t: F.mse_loss(o, t))
    ids, target = make_batch(M)
    for _ in range(2):
        stage.submod.zero_grad(set_to_none=True)
        schedule.step(ids, target=target)
        ref = reference_grads(1, table, M)[0]
        for name, p in stage.submod.named_parameters():
            if ref[name] is None:
                assert p.grad is None, name
            else:
                np.testing.assert_allclose(p.grad.reshape(-1).tolist(), ref[name], rtol=0, atol=1e-6)
        stats = stage.tfz.stats
        assert [s.name for s in timer.collect_spans()] == stats.actions
        assert stats.microbatch(2).frozen_fraction == 1.0
        assert (stats.w_flops_skipped > 0) == bool(count_flops)
        expected = expected_flops(1, table, M)
        for mb in range(M) if count_flops else ():
            got = stats.microbatch(mb)
            assert (got.w_flops, got.w_flops_skipped) == expected[(0, mb)]
    # calibrated counting removed its hooks after the first forward; "exact" keeps them
    assert len(stage.tfz._hooks) == (2 if count_flops == "exact" else 0)


def test_plan_cache_does_not_keep_masks_alive():
    import gc
    import weakref

    module = _module()
    params, cache = StageParams(module), PlanCache()
    masks = _masks()
    ref = weakref.ref(masks)
    cache.get(masks, params)
    del masks
    gc.collect()
    assert ref() is None and len(cache._plans) == 0


class _PlannedMasks(FixedMasks):
    """Freezes nothing; plans ``num_microbatches`` per step, as TimelyFreeze does."""

    def __init__(self, num_microbatches: int):
        super().__init__({})
        self.num_microbatches = num_microbatches


def _stages(indices, num_stages, **kwargs):
    from tfz.pipeline import FreezeAwareStage

    return [
        FreezeAwareStage(
            tfz.nn.convert_to_freezable(make_stage_module(s)), s, num_stages, torch.device("cpu"), **kwargs
        )
        for s in indices
    ]


def test_build_torch_schedule_refuses_stages_that_do_not_match(one_rank_group):
    from tfz.pipeline import build_torch_schedule
    from tfz.schedule import build_schedule

    loss = lambda o, t: F.mse_loss(o, t)  # noqa: E731
    interleaved = build_schedule("interleaved1f1b", 1, 4)  # stages (0, 1) on rank 0
    build_torch_schedule(interleaved, _stages([0, 1], 2), loss)
    with pytest.raises(
        ValueError, match=r"runs stages \[0, 1\] on rank 0 \(in this order\), got stages \[1, 0\]"
    ):
        build_torch_schedule(interleaved, _stages([1, 0], 2), loss)
    with pytest.raises(
        ValueError, match=r"stages\[0\] \(stage 0\) was built with num_stages=3, but schedule "
    ):
        build_torch_schedule(interleaved, _stages([0, 1], 3), loss)
    with pytest.raises(
        ValueError, match=r"runs stages \[0, 1\] on rank 0 \(in this order\), got stages \[0\]"
    ):
        build_torch_schedule(interleaved, _stages([0], 2), loss)
    with pytest.raises(
        ValueError, match="stage 0: its provider .* plans 8 microbatches per step, but the pipeline"
    ):
        build_torch_schedule(interleaved, _stages([0, 1], 2, provider=_PlannedMasks(8)), loss)


def test_provider_planning_other_microbatch_counts_is_refused_before_a_backward(one_rank_group):
    from torch.distributed.pipelining import ScheduleGPipe

    from tfz.pipeline import make_freeze_aware

    (stage,) = _stages([0], 1, provider=_PlannedMasks(4))
    schedule = ScheduleGPipe(stage, 2, loss_fn=lambda o, t: F.mse_loss(o, t))  # built by torch: unchecked
    ids, target = make_batch(2)
    with pytest.raises(
        ValueError, match="stage 0: its provider .* plans 4 microbatches per step, but .* runs 2"
    ):
        schedule.step(ids, target=target)
    assert stage.tfz.stats.actions == []  # refused before the first action
    stage.tfz.provider = _PlannedMasks(2)
    schedule.step(ids, target=target)
    with pytest.raises(ValueError, match="plans 3 microbatches per step, but the pipeline schedule runs 2"):
        make_freeze_aware(stage, provider=_PlannedMasks(3))
