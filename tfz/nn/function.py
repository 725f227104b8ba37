"""The autograd Function behind FreezableLinear: dX at once, dW masked now or deferred to a W queue.

Shape legend: N tokens (all leading dims flattened), I in_features, O out_features.

Backward, given dY [..., O]:

- dX = dY W is computed at once (when the engine needs it).
- dW = dY^T X (and db = sum dY) only for the active rows of the layer's row mask, resolved from
  :func:`tfz.nn.use_row_masks` when the dW is computed. Frozen rows receive nothing. dW comes from
  ``tfz.kernels.wgrad`` (fp32 accumulation) for fp32/fp16/bf16 operands; float64 operands use one
  torch GEMM in float64 (the kernels do not take float64), so float64 models stay exact.
- Immediate mode (no W capture active): dW goes to ``weight.main_grad`` in place when the weight has
  one (Megatron style; ``weight.grad_added_to_main_grad`` is set), else it is returned to autograd
  (hooks keep working) as a fresh tensor of the weight's dtype. Under ``use_row_masks(...,
  in_place=True)`` it is added into ``.grad`` instead, for the active rows only: always for a layer
  with frozen rows, and for an all-active layer once its ``.grad`` exists (the GEMM accumulates into
  it, where autograd would add a fresh dW). A fully frozen layer returns None, so ``.grad`` stays None.
- Split mode (inside ``WeightGradStore.capture``): the dW work is queued with its saved operands and
  runs at ``WeightGradStore.flush``, accumulating into ``.grad`` / ``main_grad`` directly.

Accumulating into an existing ``.grad`` or ``main_grad`` (fp32, bf16 or fp16, contiguous) touches the
active rows only: the kernel adds in fp32 and rounds a 16-bit destination once, so no dense fp32
buffer is made per microbatch, whatever the freeze ratio. A ``.grad`` that does not exist yet is
allocated once, in the weight's dtype.

dW is skipped when the engine will not use it (``autograd.grad(out, inputs=[x])``,
``backward(inputs=...)`` without this weight): the weight and bias enter the Function through a view,
so their graph node is not a leaf and torch's ``_will_engine_execute_node`` can answer.

Limits: ``in_place=True`` is for ``.backward()``: under ``torch.autograd.grad`` the dW still goes into
``.grad``. Masks govern the first-order weight gradient: a second-order term (a gradient penalty's
``create_graph=True`` backward through dX) reaches frozen rows. ``torch.func`` transforms and
forward-mode AD are not supported. ``torch.fx.symbolic_trace`` records the layer as one call of
:func:`freezable_linear` (``torch.fx.wrap``), so traced modules keep their masks.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from tfz import kernels
from tfz._torch_compat import will_engine_execute_node
from tfz.kernels import ActiveRows
from tfz.kernels.wgrad import wgrad_unchecked
from tfz.nn.context import RowMask, _current_state, _resolve_mask

__all__ = ["FreezableLinearFunction", "freezable_linear"]


def _will_run(ctx: Any, index: int) -> bool:
    node = ctx.next_functions[index][0]
    if node is None:
        return False
    try:
        return will_engine_execute_node(node)
    except RuntimeError:  # a leaf under autograd.grad: the engine cannot tell, assume it is needed
        return True


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])  # not -1: a width of 0 leaves it ambiguous


_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""Operand and destination dtypes tfz.kernels.wgrad takes (it accumulates in fp32)."""


def _kernel_target(t: torch.Tensor, x_NI: torch.Tensor, dy_NO: torch.Tensor) -> bool:
    """Whether :func:`wgrad_unchecked` may write ``t`` from these operands (what it does not check)."""
    return (
        t.dtype in _KERNEL_DTYPES
        and x_NI.dtype in _KERNEL_DTYPES
        and dy_NO.dtype == x_NI.dtype
        and t.is_contiguous()
        and t.device == x_NI.device
    )


def _dense_dw(x_NI: torch.Tensor, dy_NO: torch.Tensor, rows: ActiveRows | None) -> torch.Tensor:
    """dW [O, I] with frozen rows 0, for destinations the kernels do not take (float64 operands keep
    one float64 GEMM: exactness tests, reference runs)."""
    if x_NI.dtype in _KERNEL_DTYPES:
        return kernels.wgrad(x_NI, dy_NO, active_rows=rows)
    dw_OI = dy_NO.t().matmul(x_NI)
    return dw_OI if rows is None else dw_OI.masked_fill_(~rows.mask[:, None], 0)


def _weight_grad(param, x_NI, dy_NO, rows, into_grad):
    main_grad = getattr(param, "main_grad", None)
    target = main_grad if main_grad is not None else (param.grad if into_grad else None)
    if target is None and rows is None and param.dtype == x_NI.dtype == dy_NO.dtype == torch.float32:
        grad = dy_NO.t().mm(x_NI)  # every row, fp32: the GEMM the kernels' torch backend runs
    elif target is None and _kernel_target(param, x_NI, dy_NO):
        # a fresh gradient in the weight's dtype: the active rows written, the frozen ones 0
        alloc = torch.empty if rows is None else torch.zeros
        grad = alloc(param.shape, dtype=param.dtype, device=param.device)
        wgrad_unchecked(x_NI, dy_NO, grad, rows, accumulate=False)
    elif target is None:
        grad = _dense_dw(x_NI, dy_NO, rows).to(param.dtype)
    elif _kernel_target(target, x_NI, dy_NO):
        if target.shape == param.shape:
            wgrad_unchecked(x_NI, dy_NO, target, rows, accumulate=True)
        else:  # the checked entry names the bad shape
            kernels.wgrad(x_NI, dy_NO, active_rows=rows, out=target, accumulate=True)
        grad = None
    else:
        target.add_(_dense_dw(x_NI, dy_NO, rows).to(target.dtype))
        grad = None
    if grad is not None:
        if not into_grad:
            return grad
        param.grad = grad
    if main_grad is not None:
        param.grad_added_to_main_grad = True
    return None


def _bias_grad(param, dy_NO, rows, into_grad):
    grad = dy_NO.sum(0, dtype=torch.promote_types(dy_NO.dtype, torch.float32))
    if rows is not None:
        grad.masked_fill_(~rows.mask, 0)
    main_grad = getattr(param, "main_grad", None)
    target = main_grad if main_grad is not None else (param.grad if into_grad else None)
    if target is None:
        grad = grad.to(param.dtype)
        if not into_grad:
            return grad
        param.grad = grad
    else:
        target.add_(grad.to(target.dtype))
    if main_grad is not None:
        param.grad_added_to_main_grad = True
    return None


def apply_weight_grads(
    layer: Any,
    x: torch.Tensor,
    dy: torch.Tensor,
    mask: RowMask,
    *,
    weight: bool,
    bias: bool,
    into_grad: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Compute the masked dW / db of ``layer`` from saved X [..., I] and dY [..., O].

    Records the layer's row usage. With ``into_grad`` the grads are accumulated into ``.grad``
    (split mode); otherwise the ones without ``main_grad`` are returned (immediate mode).
    """
    layer.row_usage.record(mask, dy.device)
    if mask.all_frozen:
        return None, None
    rows = mask.on(dy.device)
    x_NI, dy_NO = _flat(x), _flat(dy)
    grad_w = _weight_grad(layer.weight, x_NI, dy_NO, rows, into_grad) if weight else None
    grad_b = _bias_grad(layer.bias, dy_NO, rows, into_grad) if bias else None
    return grad_w, grad_b


def _adds_in_place(state: Any, mask: RowMask, layer: Any) -> bool:
    """Whether this immediate-mode backward adds its dW into ``.grad`` itself: under
    ``use_row_masks(..., in_place=True)``, a layer with frozen rows always, an all-active one once its
    ``.grad`` exists (one GEMM accumulating into it instead of a fresh dW that autograd then adds)."""
    if state is None or not state.in_place:
        return False
    return not mask.all_active or layer.weight.grad is not None


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype in force for ``device_type`` (None: off, or a device without autocast,
    such as meta)."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _autocast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``t`` as autocast casts an operand: floating point other than float64 to ``dtype``."""
    if t is None or not t.is_floating_point() or t.dtype == torch.float64:
        return t
    return t.to(dtype)


class FreezableLinearFunction(torch.autograd.Function):
    """``y = x W^T + b`` with a row-masked, optionally deferred weight gradient (see module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer):
        dtype = _autocast_dtype(x.device.type)
        if dtype is not None:  # the casts nn.Linear gets under autocast
            x, weight, bias = (_autocast(t, dtype) for t in (x, weight, bias))
        ctx.save_for_backward(x, weight)
        ctx.layer = layer
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dx = dy.matmul(weight.to(dy.dtype)) if ctx.needs_input_grad[0] and _will_run(ctx, 0) else None
        want_w = ctx.needs_input_grad[1] and _will_run(ctx, 1)
        want_b = ctx.has_bias and ctx.needs_input_grad[2] and _will_run(ctx, 2)
        grad_w = grad_b = None
        if want_w or want_b:
            state = _current_state()
            if state is not None and state.capture is not None:
                state.capture.store._enqueue(state.capture.key, ctx.layer, x, dy, want_w, want_b)
            else:
                mask = _resolve_mask(state, ctx.layer)
                in_place = _adds_in_place(state, mask, ctx.layer)
                grad_w, grad_b = apply_weight_grads(
                    ctx.layer, x, dy, mask, weight=want_w, bias=want_b, into_grad=in_place
                )
        return dx, grad_w, grad_b, None


def freezable_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, layer: Any
) -> torch.Tensor:
    """F.linear through :class:`FreezableLinearFunction`; ``layer`` keys the row mask and row usage.

    Args:
        x: [..., I]; weight: [O, I]; bias: [O] or None.
    Returns:
        [..., O].
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
    if not torch.is_grad_enabled():
        return F.linear(x, weight, bias)
    # views give the weight and bias a non-leaf graph node the engine can be asked about
    if weight.requires_grad:
        weight = weight.view_as(weight)
    if bias is not None and bias.requires_grad:
        bias = bias.view_as(bias)
    return FreezableLinearFunction.apply(x, weight, bias, layer)
