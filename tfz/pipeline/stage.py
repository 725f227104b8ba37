"""Freeze-aware ``torch.distributed.pipelining`` stages: per-action masks, timing and counters.

Two ways in, same behaviour:

- ``FreezeAwareStage(submodule, stage_index, num_stages, device, ..., provider=..., timer=...)``, a
  ``PipelineStage`` built directly;
- ``make_freeze_aware(stage, provider=..., timer=...)`` on a stage someone else built (torchtitan's
  ``PipelineStage``, the tracer's ``_PipelineStage``): it swaps ``stage.__class__`` to a generated
  subclass of the stage's own class, before or after the schedule was created. Idempotent.

Every schedule runs a stage through the same methods, which the subclass overrides:

- ``forward_one_chunk`` (F), ``backward_one_chunk`` (B, or I with ``full_backward=False``) and
  ``backward_weight_one_chunk`` (W) record the action (``stage.tfz.stats.actions``) and time it with
  the :class:`tfz.timing.ActionTimer` under torch's names (``"2F0"``, ``"3I1"``, ``"0W3"``,
  ``"1B2"``). DualPipeV's overlapped F/B pairs run sequentially in torch and are recorded as their
  sub-actions. Stage 0's I runs nothing (torch defers stage 0's whole backward to its W, which runs
  as a full backward), so "0I<mb>" is recorded with its near-zero time.
- ``backward_maybe_with_nosync`` asks the provider for the masks of (stage, microbatch) at the action
  that starts that microbatch's backward (B, I, or stage 0's W; a non-first stage's W reuses the
  masks of its I) and then calls torch's own ``backward_maybe_with_nosync``. torch's DDP / FSDP
  handling there (``no_sync``, ``prepare_for_backward`` on the last backward, FSDP2's
  ``set_is_last_backward`` / ``set_requires_gradient_sync``) therefore runs unchanged around the
  freeze-aware work: tfz wraps the module-level ``stage_backward``, ``stage_backward_input`` and
  ``stage_backward_weight`` of ``torch.distributed.pipelining.stage`` once; the wrappers defer to
  torch's originals unless this thread is inside a freeze-aware action, in which case they run
  :mod:`tfz.pipeline.engine` (see there for what B, I and W compute). torch's ``backward_counter`` and
  ``last_backward`` bookkeeping is untouched (the schedule's calls are the same).

No provider (``provider=None``): every backward is torch's own; the stage only records, times and
counts. Except on torch versions whose own I/W split cannot differentiate through a custom
``autograd.Function`` (torch 2.11; :func:`torch_split_handles_functions`): there I and W run tfz's
backward with nothing frozen. With a provider, a None answer freezes nothing but still runs tfz's
backward (its I/W split queues FreezableLinear dW for the W action; see :mod:`tfz.pipeline.engine`).

First step: torch's dynamic metadata inference (``_forward_metadata_inference`` /
``_backward_metadata_inference``) runs the stage module and ``torch.autograd.grad`` over the stage
inputs outside the stage's action methods, so no masks are asked, nothing is timed or counted, and
FreezableLinear computes no dW there (the engine does not need the weight grads of an input-only
``autograd.grad``) and queues nothing (no W capture is active).

Counters (``stage.tfz.stats``, a :class:`tfz.pipeline.counters.StageStats` per step, reset when the
schedule starts a step): per microbatch the realised frozen fraction, the whole tensors left out, and
the weight-gradient GEMM FLOPs of FreezableLinear layers computed and skipped (2 * tokens * rows *
in_features). Tokens per layer come from forward pre-hooks on the FreezableLinear layers, run during
the first F action of each stage-input shape signature and then removed (dense layers assumed; see
``FreezeState``); ``count_flops="exact"`` keeps them on every F, ``count_flops=False`` counts nothing.

Data parallelism (tested on a (dp=2, pp=2) grid of gloo ranks, tests/test_pipeline_dp.py):

- FSDP2 (``fully_shard``), every schedule: torch reduces gradients after the step
  (``perform_reduce_grad``), so masked dW, the W queue and left-out tensors need nothing special. The
  stage unshards its FSDP modules when it resolves parameters for a backward, so the backward's
  ``inputs`` are the unsharded parameters the graph holds.
- DDP, schedules with full backwards (gpipe, 1f1b, interleaved1f1b): DDP reduces in autograd hooks
  once torch prepares its reducer at the last backward, and then waits for a gradient of every
  parameter. That backward therefore gives the parameters the masks leave out a zero gradient (fully
  frozen layers run an unmasked dW there, once per step); parameters no microbatch of the step trained
  get ``.grad`` None back afterwards. The stage sets ``require_backward_grad_sync = False`` on the DDP
  module, so a forward outside ``no_sync`` (the first step's metadata inference) does not prepare the
  reducer too. I/W split schedules under DDP are refused (NotImplementedError): deferred dW bypasses
  autograd, so DDP would not reduce it.

Limits: stages built with ``dw_builder`` are refused (tfz defers dW itself).
"""

from __future__ import annotations

import functools
import threading
from contextlib import nullcontext
from typing import Any

import torch
from torch.distributed.pipelining import PipelineStage
from torch.nn.parallel import DistributedDataParallel

from tfz import _torch_compat
from tfz.nn import WeightGradStore
from tfz.pipeline.counters import StageStats
from tfz.pipeline.engine import (
    MaskPlan,
    PlanCache,
    StageParams,
    full_backward,
    input_backward,
    stage_module,
    w_flops,
    weight_backward,
)
from tfz.pipeline.launch import in_action

__all__ = ["FreezeAwareStage", "FreezeState", "make_freeze_aware"]

_StageBase = _torch_compat.stage_base_class()
"""torch's ``_PipelineStageBase`` (of PipelineStage and the tracer's _PipelineStage)."""
_WRAPPED = {"stage_backward": "full", "stage_backward_input": "input", "stage_backward_weight": "weight"}
"""torch.distributed.pipelining.stage function -> backward type it implements."""
_tls = threading.local()
_install_lock = threading.Lock()


class _Job:
    """The freeze-aware backward one ``backward_maybe_with_nosync`` call runs (set in a thread-local)."""

    __slots__ = ("state", "kind", "key", "plan", "params", "every_param")

    def __init__(self, state: FreezeState, kind: str, mb: int, plan: MaskPlan, params: StageParams):
        self.state, self.kind, self.plan, self.params = state, kind, plan, params
        self.key = (state.stage_index, mb)
        self.every_param = False
        """Frozen parameters get a zero gradient (DDP's last backward)."""

    def run(self, kind: str, args: tuple, kwargs: dict) -> Any:
        if kind != self.kind:
            raise RuntimeError(
                f"tfz.pipeline: torch ran a {kind!r} backward inside a {self.kind!r} action of stage "
                f"{self.key[0]} (torch {torch.__version__}'s pipelining changed?)"
            )
        if kind == "full":
            stage_output, output_grads, input_values = _bind(args, kwargs, _FULL_ARGS)
            return full_backward(
                stage_output, output_grads, input_values, self.plan, self.params, every_param=self.every_param
            )
        if kind == "input":
            stage_output, output_grads, input_values = _bind(args, kwargs, _INPUT_ARGS)
            grads = input_backward(
                stage_output, output_grads, input_values, self.plan, self.params, self.state.store, self.key
            )
            return grads, []  # no param_groups: W flushes the queue instead
        weight_backward(self.plan, self.state.store, self.key)
        return ()


_FULL_ARGS = _torch_compat.STAGE_BACKWARD_FUNCTIONS["stage_backward"]
_INPUT_ARGS = _torch_compat.STAGE_BACKWARD_FUNCTIONS["stage_backward_input"]
"""Leading parameters of torch's ``stage_backward`` / ``stage_backward_input``."""


def _bind(args: tuple, kwargs: dict, names: tuple[str, ...]) -> list:
    values = list(args[: len(names)])
    for name in names[len(values) :]:
        if name not in kwargs:
            raise TypeError(f"tfz.pipeline: torch called its backward without {name!r}")
        values.append(kwargs[name])
    return values


def _wrapper(name: str, original):
    kind = _WRAPPED[name]

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        job = getattr(_tls, "job", None)
        if job is None:
            return original(*args, **kwargs)
        return job.run(kind, args, kwargs)

    wrapper._tfz_original = original
    return wrapper


def _install_backward_wrappers() -> None:
    """Wrap torch's stage_backward* names in ``torch.distributed.pipelining.stage`` (once)."""
    with _install_lock:
        for name in _WRAPPED:
            current = _torch_compat.stage_backward(name)
            if getattr(current, "_tfz_original", None) is None:
                _torch_compat.set_stage_backward(name, _wrapper(name, current))


class FreezeState:
    """The tfz side of one freeze-aware stage (``stage.tfz``).

    Attributes:
        provider: ``masks_for(stage, microbatch) -> StageMasks | None`` (:class:`tfz.masks.MaskProvider`),
            or None; may be replaced between steps. One with ``num_microbatches`` (TimelyFreeze) has
            a step's masks prepared when the step starts.
        timer: a :class:`tfz.timing.ActionTimer` (or anything with ``action(name)``), or None.
        store: the stage's W queue (:class:`tfz.nn.WeightGradStore`).
        stats: counters of the current (or last finished) step.
        step: index of the current step (-1 before the first), reported with each action to
            :func:`tfz.pipeline.launch`'s watchdog.
    """

    def __init__(self, stage: _StageBase, provider=None, timer=None, count_flops: bool | str = True):
        if count_flops not in (True, False, "exact"):
            raise ValueError(f"count_flops must be True, False or 'exact', got {count_flops!r}")
        self.stage_index: int = stage.stage_index
        self._stage_ref = stage
        self.provider = provider
        self.timer = timer
        self.store = WeightGradStore()
        self.stats = StageStats(self.stage_index)
        self.step = -1
        self.count_flops = count_flops
        self._plans = PlanCache()
        self._params: StageParams | None = None
        self._split: dict[int, MaskPlan | None] = {}
        self._trained: set[int] = set()
        """ids of the parameters some full backward of this step trained (kept for DDP only)."""
        self._tokens: dict[int, dict] = {}
        """mb -> {FreezableLinear: tokens} of forwards whose dW is still to come."""
        self._token_cache: dict[tuple, dict] = {}
        """Stage input signature -> {FreezableLinear: tokens} (calibrated once per signature)."""
        self._flops_cache: dict[tuple[MaskPlan, int], tuple[dict, tuple[int, int]]] = {}
        self._fwd_tokens: dict | None = None
        self._local = threading.local()
        self._hooks: list = []
        self._fsdp = _uses_fsdp(stage_module(stage.submod))
        self._ddp = isinstance(stage.submod, DistributedDataParallel)
        if self._ddp:
            # torch prepares DDP's reducer itself at the last backward (and runs every other forward
            # and backward under no_sync); a forward outside no_sync (the first step's metadata
            # inference) would prepare it too, and then wait for gradients of parameters the masks
            # leave out of the next backward.
            stage.submod.require_backward_grad_sync = False
        if count_flops:
            self._install_hooks()

    # -- configuration --------------------------------------------------------------------------------
    @property
    def provider(self):
        return self._provider

    @provider.setter
    def provider(self, provider) -> None:
        if provider is not None and not callable(getattr(provider, "masks_for", None)):
            raise TypeError(f"provider must have a masks_for(stage, microbatch) method, got {provider!r}")
        check_microbatches(self.stage_index, provider, getattr(self._stage_ref, "chunks", None))
        self._provider = provider

    @property
    def timer(self):
        return self._timer

    @timer.setter
    def timer(self, timer) -> None:
        if timer is not None and not callable(getattr(timer, "action", None)):
            raise TypeError(f"timer must have an action(name) method (tfz.timing.ActionTimer), got {timer!r}")
        self._timer = timer

    # -- per step ---------------------------------------------------------------------------------------
    def new_step(self) -> None:
        """Start a step: fresh counters, forget unfinished microbatches (and their queued dW); the
        stage's parameters are resolved again if some ``requires_grad`` changed."""
        self.stats = StageStats(self.stage_index)
        self.step += 1
        self._split.clear()
        self._trained.clear()
        self._tokens.clear()
        self._flops_cache.clear()  # holds plans: let the ones of earlier steps go
        self.store.clear(self.stage_index)
        if self._params is not None and self._params.stale():
            self.refresh()
        self._prepare_masks()

    def _prepare_masks(self) -> None:
        """Build the step's mask plans (row-block lists, one upload) before its first forward, when the
        provider says how many microbatches a step has (TimelyFreeze does); else the first backward
        that meets a new mask builds its plan. FSDP2 stages resolve their parameters per action."""
        count = getattr(self._provider, "num_microbatches", None)
        if count is None or self._fsdp:
            return
        masks = [self._provider.masks_for(self.stage_index, mb) for mb in range(count)]
        self._plans.prepare(masks, self.params())

    def refresh(self) -> None:
        """Resolve the stage's parameters again at the next action (call it after replacing Parameter
        objects of the stage module between steps; FSDP2 stages check them at every action anyway)."""
        self._params = None

    def params(self) -> StageParams:
        if self._fsdp:
            # FSDP2 swaps the module's parameters: sharded after a resharding forward, unsharded (the
            # objects in the autograd graph) while unsharded. Unshard now so the backward's ``inputs``
            # are the graph's; FSDP's own pre-backward unshard then finds nothing to do.
            _unshard(stage_module(self._stage_ref.submod))
            if self._params is not None and not self._params.current():
                self._params = None
        if self._params is None:
            self._params = StageParams(self._stage_ref.submod)
            self._flops_cache.clear()
        return self._params

    # -- token counts for the FLOP counters -----------------------------------------------------------
    # Forward pre-hooks on FreezableLinear layers record the tokens each layer sees. With
    # count_flops=True they run until one forward per stage-input signature (shapes, dtypes) was seen,
    # then they are removed (hooks put nn.Module calls on a slower path); later forwards with a known
    # signature reuse its counts. This assumes dense layers (token counts fixed by the input shapes);
    # a forward with a new signature is not counted and re-installs the hooks for the next one.
    # count_flops="exact" keeps the hooks on every forward (e.g. for data-dependent routing).
    def _install_hooks(self) -> None:
        if self._hooks:
            return
        for sub in stage_module(self._stage_ref.submod).modules():
            if getattr(sub, "supports_row_masks", False):
                self._hooks.append(sub.register_forward_pre_hook(self._count_tokens))

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def _count_tokens(self, layer, args) -> None:
        record = self._fwd_tokens
        if record is not None and args and isinstance(args[0], torch.Tensor):
            record[layer] = record.get(layer, 0) + args[0].numel() // layer.in_features

    def _before_forward(self) -> None:
        self._fwd_tokens = {} if self._hooks else None

    def _after_forward(self, stage, mb: int) -> None:
        recorded, self._fwd_tokens = self._fwd_tokens, None
        if self.count_flops == "exact":
            if recorded is not None:
                self._tokens[mb] = recorded
            return
        cached = stage.fwd_cache.get(mb)
        signature = None
        if cached is not None:
            signature = tuple((tuple(t.shape), t.dtype) for t in cached[1] if isinstance(t, torch.Tensor))
        if recorded is not None:
            self._tokens[mb] = recorded
            if signature is not None:
                self._token_cache[signature] = recorded
                self._remove_hooks()
            return
        tokens = self._token_cache.get(signature)
        if tokens is None:
            self._install_hooks()
        else:
            self._tokens[mb] = tokens

    # -- actions ----------------------------------------------------------------------------------------
    def action(self, mb: int, kind: str) -> str:
        name = f"{self.stage_index}{kind}{mb}"
        self.stats.actions.append(name)
        return name

    def timed(self, name: str):
        timer = self._timer
        return in_action(name, self.step, nullcontext() if timer is None else timer.action(name))

    def _count(self, mb: int, plan: MaskPlan | None, params: StageParams) -> None:
        """W FLOPs of microbatch ``mb`` (at the action that computes its dW)."""
        tokens = self._tokens.pop(mb, None)
        if not self.count_flops or not tokens:
            return
        plan = plan or self._plans.get(None, params)
        key = (plan, id(tokens))  # the cache holds the plan; the tokens object is checked below
        entry = self._flops_cache.get(key)
        if entry is None or entry[0] is not tokens:
            entry = self._flops_cache[key] = (tokens, w_flops(plan, params, tokens))
        computed, skipped = entry[1]
        stats = self.stats.microbatch(mb)
        stats.w_flops += computed
        stats.w_flops_skipped += skipped

    def _plan(self, mb: int, params: StageParams) -> MaskPlan | None:
        """The provider's masks for ``mb``, prepared; None without a provider (torch's backward)."""
        if self._provider is None:
            return None
        plan = self._plans.get(self._provider.masks_for(self.stage_index, mb), params)
        stats = self.stats.microbatch(mb)
        stats.masked = plan.masked
        stats.frozen_fraction = plan.frozen_fraction
        stats.frozen_tensors = plan.frozen_tensor_count
        return plan

    def job(self, backward_type: str) -> _Job | None:
        """What tfz runs for torch's ``backward_type`` in the current action (None: torch's own)."""
        current = getattr(self._local, "action", None)
        if current is None:  # not inside one of this stage's actions
            return None
        mb, _ = current
        params = self.params()
        if backward_type == "full":
            plan = self._plan(mb, params)
            self._count(mb, plan, params)
            if plan is not None and self._ddp:
                self._trained.update(id(p) for p in plan.trainable(params))
            return None if plan is None else _Job(self, "full", mb, plan, params)
        if backward_type == "input":
            plan = self._plan(mb, params)
            if plan is None and not torch_split_handles_functions():
                plan = self._plans.get(None, params)  # torch's own I/W split would fail: tfz's, unmasked
            self._split[mb] = plan
            return None if plan is None else _Job(self, "input", mb, plan, params)
        if backward_type == "weight":
            if mb not in self._split:
                return None  # torch reports the missing I itself
            plan = self._split.pop(mb)
            self._count(mb, plan, params)
            return None if plan is None else _Job(self, "weight", mb, plan, params)
        return None

    def close(self) -> None:
        """Stop counting FLOPs and remove the token-counting hooks."""
        self.count_flops = False
        self._remove_hooks()

    def __repr__(self) -> str:
        return f"FreezeState(stage={self.stage_index}, provider={self._provider!r}, timer={self._timer!r})"


def check_microbatches(stage_index: int, provider, count: int | None) -> None:
    """Refuse a ``provider`` that plans another number of microbatches per step than the schedule
    running the stage (``count``; None: not known yet)."""
    planned = getattr(provider, "num_microbatches", None)
    if count is not None and planned is not None and planned != count:
        raise ValueError(
            f"stage {stage_index}: its provider ({type(provider).__name__}) plans {planned} microbatches "
            f"per step, but the pipeline schedule runs {count}"
        )


@functools.cache
def torch_split_handles_functions() -> bool:
    """Whether torch's own I/W split (``stage_backward_input`` / ``stage_backward_weight``) can take
    gradients through a custom ``autograd.Function`` such as FreezableLinear's. torch 2.11's cannot
    (its weight pass reads attributes of the Function's graph node, which raises); there, a stage
    without a provider runs tfz's backward with nothing frozen for I and W instead of torch's."""

    class _Scale(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w):
            ctx.save_for_backward(x, w)
            return x * w

        @staticmethod
        def backward(ctx, g):
            x, w = ctx.saved_tensors
            return g * w, (g * x).sum(0)

    backward_input, backward_weight = _torch_compat.split_backward_functions()
    x = torch.ones(2, 1, requires_grad=True)
    w = torch.nn.Parameter(torch.ones(1))
    y = _Scale.apply(x, w)
    try:
        _, groups = backward_input([y], [torch.ones_like(y)], [x], iter([w]))
        backward_weight(iter([w]), groups)
    except RuntimeError:
        return False
    return w.grad is not None


def _unshard(module: torch.nn.Module) -> None:
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.unshard()


def _uses_fsdp(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


# The overriding methods. They are plain functions put into each freeze-aware class (FreezeAwareStage
# and the classes make_freeze_aware generates): a mixin base class would change the instance layout
# CPython compares on ``__class__`` assignment. ``_tfz_base`` is the class they extend.


def _base(stage) -> type:
    return type(stage)._tfz_base


def _forward_one_chunk(self, fwd_chunk_id: int, *args, **kwargs):
    state = self.tfz
    if fwd_chunk_id == 0:  # the schedule has set ``chunks`` by the first forward of a step
        check_microbatches(self.stage_index, state.provider, self.chunks)
    name = state.action(fwd_chunk_id, "F")
    counting = state.count_flops
    if counting:
        state._before_forward()
    with state.timed(name):
        out = _base(self).forward_one_chunk(self, fwd_chunk_id, *args, **kwargs)
    if counting:
        state._after_forward(self, fwd_chunk_id)
    return out


def _timed_backward(self, kind: str, mb: int, call):
    state = self.tfz
    name = state.action(mb, kind)
    local = state._local
    outer = getattr(local, "action", None)
    local.action = (mb, kind)
    try:
        with state.timed(name):
            return call()
    finally:
        local.action = outer


def _backward_one_chunk(self, bwd_chunk_id: int, loss=None, full_backward: bool = True, last_backward=False):
    base = _base(self)

    def call():
        return base.backward_one_chunk(
            self, bwd_chunk_id, loss=loss, full_backward=full_backward, last_backward=last_backward
        )

    if not self.has_backward:
        return call()
    return _timed_backward(self, "B" if full_backward else "I", bwd_chunk_id, call)


def _backward_weight_one_chunk(self, bwd_chunk_id: int, last_backward=False):
    base = _base(self)

    def call():
        return base.backward_weight_one_chunk(self, bwd_chunk_id, last_backward=last_backward)

    if not self.has_backward:
        return call()
    return _timed_backward(self, "W", bwd_chunk_id, call)


def _backward_maybe_with_nosync(self, backward_type, bwd_kwargs: dict, last_backward: bool = False):
    base = _base(self)
    job = self.tfz.job(backward_type)
    if job is None:
        return base.backward_maybe_with_nosync(self, backward_type, bwd_kwargs, last_backward=last_backward)
    untouched = _prepare_ddp(self, job, backward_type, last_backward) if self.tfz._ddp else ()
    outer = getattr(_tls, "job", None)
    _tls.job = job
    try:
        return base.backward_maybe_with_nosync(self, backward_type, bwd_kwargs, last_backward=last_backward)
    finally:
        _tls.job = outer
        for p in untouched:
            p.grad = None


def _prepare_ddp(self, job: _Job, backward_type: str, last_backward: bool) -> list:
    """DDP's reducer (prepared by torch at the last backward) waits for a gradient of every parameter:
    that backward gives frozen ones a zero gradient. Returns the parameters no microbatch of the step
    trained and whose ``.grad`` is None: they get None back once DDP has reduced the zeros."""
    if backward_type != "full":
        raise NotImplementedError(
            f"tfz.pipeline: stage {self.stage_index} is wrapped in DistributedDataParallel, whose "
            f"reducer runs in autograd hooks, but a {backward_type!r} backward (I/W split schedule) "
            "computes deferred dW outside autograd, so DDP would not reduce it. Use FSDP2 "
            "(torch.distributed.fsdp.fully_shard), which reduces after the step, or a schedule with "
            "full backwards (gpipe, 1f1b, interleaved1f1b)."
        )
    if not last_backward:
        return []
    job.every_param = True
    trained = self.tfz._trained
    return [p for _, p in job.params.named if p.grad is None and id(p) not in trained]


def _clear_runtime_states(self) -> None:
    _base(self).clear_runtime_states(self)
    self.tfz.new_step()


_OVERRIDES = {
    "forward_one_chunk": _forward_one_chunk,
    "backward_one_chunk": _backward_one_chunk,
    "backward_weight_one_chunk": _backward_weight_one_chunk,
    "backward_maybe_with_nosync": _backward_maybe_with_nosync,
    "clear_runtime_states": _clear_runtime_states,
}


class FreezeAwareStage(PipelineStage):
    """A ``PipelineStage`` that applies a mask provider's freezing per (stage, microbatch).

    Same arguments as ``PipelineStage`` plus, keyword-only:

    Args:
        provider: :class:`tfz.masks.MaskProvider` or None (nothing frozen; torch's own backward).
        timer: :class:`tfz.timing.ActionTimer` timing every F/B/I/W action, or None.
        count_flops: count weight-gradient FLOPs per microbatch: True (token counts calibrated once per
            input shape signature), "exact" (counted on every forward) or False.
    """

    _tfz_base = PipelineStage
    tfz: FreezeState
    forward_one_chunk = _forward_one_chunk
    backward_one_chunk = _backward_one_chunk
    backward_weight_one_chunk = _backward_weight_one_chunk
    backward_maybe_with_nosync = _backward_maybe_with_nosync
    clear_runtime_states = _clear_runtime_states

    def __init__(self, *args, provider=None, timer=None, count_flops: bool | str = True, **kwargs):
        super().__init__(*args, **kwargs)
        _attach(self, provider, timer, count_flops)


_CLASSES: dict[type, type] = {PipelineStage: FreezeAwareStage}


def _is_freeze_aware(stage) -> bool:
    return getattr(type(stage), "_tfz_base", None) is not None


def _freeze_aware_class(cls: type) -> type:
    with _install_lock:
        new = _CLASSES.get(cls)
        if new is None:
            namespace = dict(_OVERRIDES)
            namespace.update(
                _tfz_base=cls,
                __module__=__name__,
                __doc__=f"Freeze-aware {cls.__qualname__} (tfz.pipeline.make_freeze_aware).",
            )
            new = _CLASSES[cls] = type(f"FreezeAware{cls.__name__.lstrip('_')}", (cls,), namespace)
    return new


def _attach(stage, provider, timer, count_flops) -> None:
    if getattr(stage, "dw_builder", None) is not None:
        raise ValueError(
            f"stage {stage.stage_index} was built with a dw_builder; freeze-aware stages defer dW "
            "themselves (FreezableLinear W queue): build it without one"
        )
    _install_backward_wrappers()
    stage.tfz = FreezeState(stage, provider, timer, count_flops)


def make_freeze_aware(stage, *, provider=None, timer=None, count_flops: bool | str = True):
    """Make an existing pipeline stage freeze-aware in place (class swap); returns the stage.

    Works for ``PipelineStage``, the tracer's ``_PipelineStage`` and their subclasses, before or after
    a schedule was built on it. Calling it again on a freeze-aware stage keeps its state and only
    replaces ``provider`` / ``timer`` when they are given (use ``stage.tfz.provider = None`` to remove
    one).
    """
    if not isinstance(stage, _StageBase):
        raise TypeError(f"expected a torch pipeline stage (PipelineStage), got {type(stage).__name__}")
    if _is_freeze_aware(stage):
        if provider is not None:
            stage.tfz.provider = provider
        if timer is not None:
            stage.tfz.timer = timer
        return stage
    original = type(stage)
    if getattr(stage, "dw_builder", None) is not None:
        _attach(stage, provider, timer, count_flops)  # raises ValueError
    stage.__class__ = _freeze_aware_class(original)
    try:
        _attach(stage, provider, timer, count_flops)
    except BaseException:
        stage.__class__ = original
        raise
    return stage
