"""AdamW's step with the row-freezing semantics in one pass: the C++ extension ``tfz._row_adamw`` for
CPU float32 tensors, the Triton kernel :func:`tfz.kernels.row_adamw.row_adamw` for CUDA tensors
(fp32, bf16 or fp16; no host synchronisation).

:class:`tfz.optim.RowFreezing` steps a FreezableLinear's parameters here when the optimizer is a
plain ``torch.optim.AdamW`` and :func:`fusable` holds; otherwise its hooks wrap torch's own step. The
result is the same (torch's AdamW step, then the hooks: frozen rows kept, gradients rescaled, partly
frozen rows' steps scaled) in one pass over parameter, gradient and moments instead of several, and
the state layout is torch's (``step``, ``exp_avg``, ``exp_avg_sq``), so checkpoints, learning-rate
schedulers and later plain steps carry on. ``TFZ_FORCE_SKIP_CPP=1`` turns the C++ pass off,
``TFZ_DISABLE_TRITON=1`` the kernel.
"""

from __future__ import annotations

import torch

from tfz._validate import env_flag
from tfz.kernels import row_adamw as _kernel

__all__ = ["NATIVE", "fusable", "optimizer_fusable", "path", "step"]

try:
    from tfz._row_adamw import row_adamw as _row_adamw
except ImportError:  # not built: the hooks alone
    _row_adamw = None

NATIVE = _row_adamw is not None
"""Whether the native extension ``tfz._row_adamw`` is built."""


def optimizer_fusable(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> bool:
    """Whether this step may step FreezableLinears in one pass: a plain AdamW, called without a
    closure or GradScaler arguments (``args``, ``kwargs`` as a step hook sees them: ``args[0]`` is the
    optimizer)."""
    return type(optimizer) is torch.optim.AdamW and len(args) <= 1 and not kwargs


def path(p: torch.Tensor) -> str | None:
    """The one-pass implementation for ``p``'s device and dtype: "native" (C++, CPU float32),
    "triton" (CUDA) or None (the hooks around torch's step)."""
    if p.device.type == "cpu":
        native = NATIVE and p.dtype == torch.float32 and not env_flag("TFZ_FORCE_SKIP_CPP")
        return "native" if native else None
    if p.dtype in _kernel.DTYPES and _kernel.available(p.device):
        return "triton"
    return None


def _like(t: torch.Tensor | None, p: torch.Tensor) -> bool:
    return (
        isinstance(t, torch.Tensor)
        and t.layout == torch.strided
        and t.dtype == p.dtype
        and t.device == p.device
        and t.shape == p.shape
        and t.is_contiguous()
    )


def fusable(p: torch.Tensor, group: dict, state: dict | None) -> bool:
    """Whether ``p`` (in ``group``, with optimizer ``state``) can take the one-pass step: a :func:`path`
    exists, gradient and moments are contiguous and of ``p``'s dtype and device, and none of AdamW's
    amsgrad, maximize, capturable or differentiable options is set."""
    if any(group.get(flag, False) for flag in ("amsgrad", "maximize", "capturable", "differentiable")):
        return False
    if path(p) is None or not (_like(p, p) and _like(p.grad, p)):
        return False
    if not state:
        return True
    step = state.get("step")
    return (
        _like(state.get("exp_avg"), p)
        and _like(state.get("exp_avg_sq"), p)
        and isinstance(step, torch.Tensor)
        and step.numel() == 1
        and step.device in (p.device, torch.device("cpu"))
    )


def _init_state(p: torch.Tensor, group: dict, state: dict) -> None:
    """torch's AdamW initial state: a scalar step tensor (float32 on the parameter's device when fused,
    else on the CPU in the default dtype's precision) and zeros."""
    fused = bool(group.get("fused"))
    float64 = torch.get_default_dtype() == torch.float64 and not fused
    device = p.device if fused else torch.device("cpu")
    state["step"] = torch.zeros((), dtype=torch.float64 if float64 else torch.float32, device=device)
    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _scalar(value, p: torch.Tensor) -> torch.Tensor | float:
    """A hyperparameter for the kernel: a tensor on ``p``'s device as is (read there), else a float
    (a CPU tensor is read on the host, which does not wait for the device)."""
    if isinstance(value, torch.Tensor) and value.device == p.device:
        return value.reshape(())
    return float(value)


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
    if counts is not None and (counts.device != p.device or counts.dtype != torch.int32):
        counts = counts.to(device=p.device, dtype=torch.int32)
    state["step"] += 1
    beta1, beta2 = group["betas"]
    if path(p) == "triton":
        _kernel.row_adamw(
            p,
            p.grad,
            state["exp_avg"],
            state["exp_avg_sq"],
            _scalar(state["step"], p),
            lr=_scalar(group["lr"], p),
            beta1=float(beta1),
            beta2=float(beta2),
            eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]),
            counts=counts,
            calls=calls,
            rescale=rescale,
            step_scale=step_scale,
        )
        return
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
