"""The backward work of one freeze-aware pipeline action: full B, input-only I, weight-only W.

Shared by the freeze-aware stage (:mod:`tfz.pipeline.stage`) and ``tfz profile``
(:mod:`tfz.measure`), so the profile measures exactly what the runtime runs.

What one :class:`tfz.masks.StageMasks` does to a backward (a :class:`MaskPlan` is its prepared form):

- **Row blocks of FreezableLinear layers**: the layer's dW / db skips frozen rows (``tfz.nn`` row masks,
  resolved when dW is computed). A layer with every row frozen is left out of the backward entirely,
  so autograd prunes its dW (and, on stage 0, the backward below it when nothing else needs it).
- **Whole tensors** (norms, embeddings; ``StageMasks.frozen_tensors``, names relative to the stage
  module): left out of the backward's ``inputs``, so autograd never computes their gradient.

Gradients of frozen parts are not touched: ``.grad`` keeps what earlier microbatches accumulated, or
stays None. The three kinds:

- :func:`full_backward` (B, and stage 0's W, which torch runs as a full backward):
  ``torch.autograd.backward(outputs, grads, inputs=[stage inputs needing grad] + [trainable params])``
  under the row masks (FreezableLinear computes masked dW at once and adds it into ``.grad`` for the
  active rows only, ``use_row_masks(..., in_place=True)``, as an all-active layer does once its
  ``.grad`` exists, masks or not; DDP's last backward returns it to autograd instead). Skipped
  when nothing needs a gradient (a fully frozen stage-0 microbatch).
- :func:`input_backward` (I on stages > 0): the same backward inside ``WeightGradStore.capture``:
  input grads now, FreezableLinear dW queued (dX only is computed). Other trainable parameters (norms,
  plain ``nn.Linear``) get their gradient here, at I, not at W; this deviates from torch's exact I/W
  split (``stage_backward_input`` / ``stage_backward_weight``) and is cheap for norms. Convert linear
  layers with ``tfz.nn.convert_to_freezable`` to defer their dW.
- :func:`weight_backward` (W on stages > 0): flushes the queue of (stage, microbatch) under its row masks.

Row usage (``FreezableLinear.row_usage``, read by ``tfz.optim``) is recorded for layers left out of
the backward as a call with every row frozen, as if the layer had run its masked dW.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from tfz.masks import StageMasks, stage_module
from tfz.nn import RowMask, WeightGradStore, prepare_row_masks, use_row_masks

__all__ = [
    "MaskPlan",
    "PlanCache",
    "StageParams",
    "full_backward",
    "input_backward",
    "stage_module",
    "w_flops",
    "weight_backward",
]


def _walk(module: nn.Module):
    """(prefix, submodule, [(name, parameter)]) per submodule in ``named_modules()`` order, each shared
    parameter listed once: one walk over the modules (``named_parameters()`` would walk them again)."""
    seen: set[int] = set()
    for prefix, sub in module.named_modules():
        params = []
        for pname, p in sub._parameters.items():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                params.append((pname, p))
        yield prefix, sub, params


class StageParams:
    """The trainable parameters of a stage module, resolved at one point in time.

    Resolve again when the parameter objects may change (FSDP2 swaps sharded and unsharded ones).
    """

    __slots__ = ("module", "named", "layers", "layer_of", "weight_name", "names", "_flags", "_submodules")

    def __init__(self, module: nn.Module):
        self.module = stage_module(module)
        named, layers, layer_of, weight_name, flags, names_all = [], [], {}, {}, [], []
        for prefix, sub, params in _walk(self.module):
            for pname, p in params:
                flags.append((p, p.requires_grad))
                names_all.append(f"{prefix}.{pname}" if prefix else pname)
                if p.requires_grad:
                    named.append((names_all[-1], p))
            if getattr(sub, "supports_row_masks", False) and sub.weight.requires_grad:
                layers.append((prefix, sub))
                for p in (sub.weight, sub.bias):
                    if p is not None:
                        layer_of[id(p)] = sub
        names = {id(p): n for n, p in named}
        for prefix, sub in layers:
            weight_name[sub] = names.get(id(sub.weight), f"{prefix}.weight" if prefix else "weight")
        self.named: tuple[tuple[str, nn.Parameter], ...] = tuple(named)
        """(name, parameter) with ``requires_grad``, in ``named_parameters()`` order."""
        self._flags = tuple(flags)
        self.layers: tuple[tuple[str, nn.Module], ...] = tuple(layers)
        """(name, FreezableLinear) whose weight requires grad."""
        self.layer_of: dict[int, nn.Module] = layer_of
        """id(weight or bias) -> its FreezableLinear."""
        self.weight_name: dict[nn.Module, str] = weight_name
        """FreezableLinear -> its weight's parameter name."""
        self.names: frozenset[str] = frozenset(names_all)
        """Every parameter name of the module, ``requires_grad`` or not."""
        self._submodules: dict[str, nn.Module] = {name: sub for name, sub in layers}

    def submodule(self, name: str) -> nn.Module:
        """``module.get_submodule(name)``, without the walk for the trainable FreezableLinears."""
        found = self._submodules.get(name)
        if found is None:
            found = self._submodules[name] = self.module.get_submodule(name)
        return found

    @property
    def device(self) -> torch.device | None:
        return self.named[0][1].device if self.named else None

    def current(self) -> bool:
        """The module holds the same parameter objects, with the same ``requires_grad``, as when
        resolved (FSDP2 swaps sharded and unsharded objects; its unsharded ones persist)."""
        now = [p for _, _, params in _walk(self.module) for _, p in params]
        return len(now) == len(self._flags) and all(
            p is q and p.requires_grad is flag for p, (q, flag) in zip(now, self._flags)
        )

    def stale(self) -> bool:
        """Some parameter's ``requires_grad`` changed since it was resolved (replaced Parameter objects
        are not detected: resolve again yourself)."""
        return any(p.requires_grad is not flag for p, flag in self._flags)


class MaskPlan:
    """A :class:`StageMasks` prepared for one stage module (built once per masks object, reused).

    Preparing builds, for every partly frozen FreezableLinear, its :class:`tfz.kernels.ActiveRows`
    (row runs and row-block lists) from the masks' numpy arrays, uploaded to the stage's device in
    one copy that does not wait for the device: the masked dW calls of every later backward with
    these masks do no host synchronisation and build nothing. ``masks`` None gives the empty plan:
    nothing frozen.
    """

    __slots__ = (
        "masked",
        "row_masks",
        "frozen_layers",
        "frozen_names",
        "frozen_fraction",
        "_trainable",
        "__weakref__",
    )

    def __init__(self, masks: StageMasks | None, params: StageParams):
        self.masked = masks is not None
        """Built from masks (False: the empty plan). The masks object itself is not kept, so a
        :class:`PlanCache` entry does not keep its (weak) key alive."""
        self.row_masks: dict[nn.Module, RowMask] = {}
        """FreezableLinear -> RowMask, for layers with some row frozen."""
        self.frozen_layers: frozenset[nn.Module] = frozenset()
        """FreezableLinear layers with every row frozen (left out of the backward)."""
        self.frozen_names: frozenset[str] = frozenset()
        """Whole tensors frozen (parameter names relative to the stage module)."""
        self.frozen_fraction = 0.0
        self._trainable: tuple[Any, list[torch.Tensor]] | None = None
        if masks is None:
            return
        if not isinstance(masks, StageMasks):
            raise TypeError(f"a mask provider must return StageMasks or None, got {type(masks).__name__}")
        by_layer = {}
        for name, active in masks.active_rows.items():
            try:
                layer = params.submodule(name)
            except AttributeError as exc:
                raise ValueError(f"masks name a layer that is not in the stage module: {exc}") from None
            by_layer[layer] = None if active.all() else active
        # the row-block lists of every partly frozen layer, built from the host masks in one upload
        prepared = prepare_row_masks(by_layer, device=params.device)
        self.row_masks = {layer: m for layer, m in prepared.items() if not m.all_active}
        self.frozen_layers = frozenset(layer for layer, m in self.row_masks.items() if m.all_frozen)
        self.frozen_names = masks.frozen_tensors
        unknown = sorted(self.frozen_names - params.names)
        if unknown:
            raise ValueError(f"masks freeze tensors that are not parameters of the stage module: {unknown}")
        self.frozen_fraction = masks.frozen_fraction

    @property
    def frozen_tensor_count(self) -> int:
        return len(self.frozen_names)

    def trainable(self, params: StageParams) -> list[torch.Tensor]:
        """Parameters of ``params`` that take part in the backward (cached per ``params``)."""
        cached = self._trainable
        if cached is not None and cached[0] is params:
            return cached[1]
        out = []
        for name, p in params.named:
            if name in self.frozen_names:
                continue
            layer = params.layer_of.get(id(p))
            if layer is not None and layer in self.frozen_layers:
                continue
            out.append(p)
        self._trainable = (params, out)
        return out

    def record_skipped_layers(self) -> None:
        """Row usage of the layers left out of the backward: one call with every row frozen."""
        for layer in self.frozen_layers:
            layer.row_usage.record(self.row_masks[layer], layer.weight.device)


class PlanCache:
    """MaskPlans keyed by their StageMasks object (weakly: a plan lives as long as its masks)."""

    def __init__(self):
        self._plans: weakref.WeakKeyDictionary[StageMasks, MaskPlan] = weakref.WeakKeyDictionary()
        self._empty: MaskPlan | None = None
        self._params: StageParams | None = None

    def prepare(self, masks: Iterable[StageMasks | None], params: StageParams) -> None:
        """Build the plans of ``masks`` now (e.g. right after a decision step drew them), so the
        first backward that uses them finds them ready."""
        for m in masks:
            self.get(m, params)

    def get(self, masks: StageMasks | None, params: StageParams) -> MaskPlan:
        if params is not self._params:  # parameters re-resolved: plans hold layer objects, rebuild
            self._plans = weakref.WeakKeyDictionary()
            self._empty = None
            self._params = params
        if masks is None:
            if self._empty is None:
                self._empty = MaskPlan(None, params)
            return self._empty
        try:
            plan = self._plans.get(masks)
        except TypeError:
            raise TypeError(
                f"a mask provider must return StageMasks or None, got {type(masks).__name__}"
            ) from None
        if plan is None:
            plan = self._plans[masks] = MaskPlan(masks, params)
        return plan


def _tensors_with_grads(outputs: Any, grads: Any, out_t: list, grad_t: list) -> None:
    """Flatten (outputs, grads) like torch's ``stage_backward``: outputs that need no grad are skipped."""
    if isinstance(outputs, torch.Tensor):
        if not outputs.requires_grad and outputs.grad_fn is None:
            return
        if grads is not None and not isinstance(grads, torch.Tensor):
            raise TypeError(f"expected a Tensor or None gradient for a tensor output, got {type(grads)}")
        out_t.append(outputs)
        grad_t.append(grads)
    elif isinstance(outputs, (tuple, list)):
        if grads is None:
            return
        if not isinstance(grads, (tuple, list)) or len(grads) != len(outputs):
            raise ValueError(f"output grads {type(grads).__name__} do not match {len(outputs)} stage outputs")
        for o, g in zip(outputs, grads):
            _tensors_with_grads(o, g, out_t, grad_t)
    elif isinstance(outputs, dict):
        if grads is None:
            return
        if not isinstance(grads, dict) or set(grads) != set(outputs):
            raise ValueError("output grads do not match the keys of the stage outputs")
        for k in outputs:
            _tensors_with_grads(outputs[k], grads[k], out_t, grad_t)


def _input_targets(input_values: Sequence[Any]) -> list[torch.Tensor]:
    return [v for v in input_values if isinstance(v, torch.Tensor) and v.requires_grad]


def _pop_input_grads(input_values: Sequence[Any]) -> tuple[torch.Tensor | None, ...]:
    """Input grads, read from ``.grad`` and cleared (as torch's ``stage_backward`` returns them)."""
    out = []
    for v in input_values:
        if isinstance(v, torch.Tensor):
            out.append(v.grad)
            v.grad = None
        else:
            out.append(None)
    return tuple(out)


def _run(outputs: list, grads: list, targets: list, row_masks: dict, in_place: bool) -> None:
    with use_row_masks(row_masks, in_place=in_place) if row_masks or in_place else nullcontext():
        torch.autograd.backward(outputs, grad_tensors=grads, inputs=targets)


def full_backward(
    stage_output: Any,
    output_grads: Any,
    input_values: Sequence[Any],
    plan: MaskPlan,
    params: StageParams,
    *,
    every_param: bool = False,
) -> tuple[torch.Tensor | None, ...]:
    """B: input grads and the unfrozen weight grads of one microbatch; returns the input grads.

    Args:
        stage_output: the stage's outputs (tensor, tuple/list/dict of tensors) or the loss.
        output_grads: matching gradients (None for the loss).
        input_values: the stage's flattened inputs; those requiring grad get their gradient.
        every_param: frozen parameters take part too, with a zero gradient (DDP's last backward:
            its reducer waits for a gradient of every parameter; ``.grad`` None becomes zeros).
    """
    outs: list[torch.Tensor] = []
    grads: list[torch.Tensor | None] = []
    _tensors_with_grads(stage_output, output_grads, outs, grads)
    trainable = plan.trainable(params)
    row_masks = plan.row_masks
    handles = []
    if every_param and len(trainable) < len(params.named):
        # fully frozen layers run an unmasked dW here (a masked one returns no gradient at all)
        row_masks = {layer: m for layer, m in row_masks.items() if layer not in plan.frozen_layers}
        kept = {id(p) for p in trainable}
        frozen = [p for _, p in params.named if id(p) not in kept]
        handles = [p.register_hook(torch.zeros_like) for p in frozen]
        trainable = trainable + frozen
    targets = _input_targets(input_values) + trainable
    try:
        if outs and targets:
            # FreezableLinears add into .grad themselves (masked: the active rows only, no dense
            # gradient per microbatch), except in DDP's last backward, whose reducer waits for
            # autograd's accumulation hooks
            _run(outs, grads, targets, row_masks, in_place=not every_param)
    finally:
        for h in handles:
            h.remove()
    plan.record_skipped_layers()
    return _pop_input_grads(input_values)


def input_backward(
    stage_output: Sequence[torch.Tensor],
    output_grads: Sequence[torch.Tensor | None] | None,
    input_values: Sequence[Any],
    plan: MaskPlan,
    params: StageParams,
    store: WeightGradStore,
    key: tuple[int, int],
) -> tuple[torch.Tensor | None, ...]:
    """I: input grads now, FreezableLinear dW queued in ``store`` under ``key`` = (stage, microbatch).

    ``stage_output`` is a tuple of outputs (or ``(loss,)``); ``output_grads`` None means the outputs
    are losses (gradient ones). Returns the input grads. The queue entry exists after this call even
    when nothing was queued, so the W action always finds it.
    """
    if isinstance(stage_output, torch.Tensor):
        stage_output = (stage_output,)
    outs: list[torch.Tensor] = []
    grads: list[torch.Tensor | None] = []
    if output_grads is None:
        for o in stage_output:
            if isinstance(o, torch.Tensor) and (o.requires_grad or o.grad_fn is not None):
                outs.append(o)
                grads.append(torch.ones_like(o))
    else:
        _tensors_with_grads(tuple(stage_output), tuple(output_grads), outs, grads)
    targets = _input_targets(input_values) + plan.trainable(params)
    with store.capture(*key):
        if outs and targets:
            torch.autograd.backward(outs, grad_tensors=grads, inputs=targets)
    return _pop_input_grads(input_values)


def weight_backward(plan: MaskPlan, store: WeightGradStore, key: tuple[int, int]) -> int:
    """W: run the dW queued for ``key`` under the plan's row masks; returns the layer calls run."""
    ran = store.flush(*key, masks=plan.row_masks or None)
    plan.record_skipped_layers()
    return ran


def w_flops(plan: MaskPlan, params: StageParams, tokens: dict[nn.Module, int]) -> tuple[int, int]:
    """(computed, skipped) weight-gradient GEMM FLOPs of one microbatch: 2 * tokens * rows * in_features
    per FreezableLinear, active rows counted as computed, frozen rows as skipped.

    ``tokens``: FreezableLinear -> tokens it processed in the microbatch's forward.
    """
    computed = skipped = 0
    for _, layer in params.layers:
        n = tokens.get(layer, 0)
        if not n:
            continue
        per_row = 2 * n * layer.in_features
        if layer in plan.frozen_layers or params.weight_name[layer] in plan.frozen_names:
            active = 0
        else:
            mask = plan.row_masks.get(layer)
            active = layer.out_features if mask is None else mask.n_active
        computed += per_row * active
        skipped += per_row * (layer.out_features - active)
    return computed, skipped
