"""AdamW's step with the row-freezing semantics in one native pass (``tfz._row_adamw``, CPU float32).

:class:`tfz.optim.RowFreezing` steps a FreezableLinear's parameters here when the optimizer is a
plain ``torch.optim.AdamW`` and :func:`fusable` holds; otherwise its hooks wrap torch's own step. The
result is the same (torch's AdamW step, then the hooks: frozen rows kept, gradients rescaled, partly
frozen rows' steps scaled) in one pass over parameter, gradient and moments instead of several, and
the state layout is torch's (``step``, ``exp_avg``, ``exp_avg_sq``), so checkpoints, learning-rate
schedulers and later plain steps carry on. ``TFZ_FORCE_SKIP_CPP=1`` turns the native pass off.
"""

from __future__ import annotations

import torch

from tfz._validate import env_flag

__all__ = ["NATIVE", "fusable", "optimizer_fusable", "step"]

try:
    from tfz._row_adamw import row_adamw as _row_adamw
except ImportError:  # not built: the hooks alone
    _row_adamw = None

NATIVE = _row_adamw is not None
"""Whether the native extension ``tfz._row_adamw`` is built."""


def optimizer_fusable(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> bool:
    """Whether this step may step FreezableLinears natively: a plain AdamW, called without a closure
    or GradScaler arguments (``args``, ``kwargs`` as a step hook sees them: ``args[0]`` is the
    optimizer), the extension built and not switched off."""
    return (
        NATIVE
        and type(optimizer) is torch.optim.AdamW
        and len(args) <= 1
        and not kwargs
        and not env_flag("TFZ_FORCE_SKIP_CPP")
    )


def _dense_f32(t: torch.Tensor | None, like: torch.Tensor) -> bool:
    return (
        isinstance(t, torch.Tensor)
        and t.layout == torch.strided
        and t.dtype == torch.float32
        and t.device.type == "cpu"
        and t.shape == like.shape
        and t.is_contiguous()
    )


def fusable(p: torch.Tensor, group: dict, state: dict | None) -> bool:
    """Whether ``p`` (in ``group``, with optimizer ``state``) can take the native step: a contiguous
    float32 CPU tensor with such a gradient and moments, and none of AdamW's amsgrad, maximize,
    capturable or differentiable options."""
    if any(group.get(flag, False) for flag in ("amsgrad", "maximize", "capturable", "differentiable")):
        return False
    if not (_dense_f32(p, p) and _dense_f32(p.grad, p)):
        return False
    if not state:
        return True
    return (
        _dense_f32(state.get("exp_avg"), p)
        and _dense_f32(state.get("exp_avg_sq"), p)
        and isinstance(state.get("step"), torch.Tensor)
        and state["step"].numel() == 1
    )


def _init_state(p: torch.Tensor, group: dict, state: dict) -> None:
    """torch's AdamW initial state: a scalar step tensor (float32, or the default dtype unfused) and zeros."""
    float64 = torch.get_default_dtype() == torch.float64 and not group.get("fused")
    state["step"] = torch.zeros((), dtype=torch.float64 if float64 else torch.float32)
    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


@torch.no_grad()
def step(
    p: torch.Tensor,
    group: dict,
    state: dict,
    counts: torch.Tensor | None,
    calls: int,
    *,
    rescale: bool,
    step_scale: float,
) -> None:
    """One AdamW step of ``p`` (checked by :func:`fusable`) with ``counts`` [rows] int32 active calls
    per row out of ``calls`` (None: every row in every call); ``state`` is created when empty."""
    if not state:
        _init_state(p, group, state)
    if counts is not None:
        counts = counts.to(device="cpu", dtype=torch.int32).contiguous()
    state["step"] += 1
    beta1, beta2 = group["betas"]
    rows = p.shape[0] if p.dim() else 1
    _row_adamw(
        p.data_ptr(),
        p.grad.data_ptr(),
        state["exp_avg"].data_ptr(),
        state["exp_avg_sq"].data_ptr(),
        rows,
        p.numel() // rows if rows else 0,
        0 if counts is None else counts.data_ptr(),
        calls,
        rescale,
        float(step_scale),
        float(group["lr"]),
        float(beta1),
        float(beta2),
        float(group["eps"]),
        float(group["weight_decay"]),
        float(state["step"]),
    )
