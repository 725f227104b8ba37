"""AdamW's step with tfz.optim's row-freezing semantics in one Triton launch (GPU; CPU tensors under
``TRITON_INTERPRET=1``): the device path of :mod:`tfz.optim.row_adamw` (the CPU path is the C++
extension ``tfz._row_adamw``).

The launch needs no host synchronisation: row counts and, where the optimizer keeps it there, the step
count stay on the device. Kernel and formulas: ``kernels/_row_adamw_triton.py``.
"""

from __future__ import annotations

import torch

from tfz._validate import env_flag

from .wgrad import _check_tensor, has_triton

__all__ = ["row_adamw", "DTYPES", "BLOCK"]

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""Storage dtypes of parameter, gradient and moments (computed in fp32)."""

BLOCK = 1024
"""Elements of one row per program."""

_kernel = None


def _load_kernel():
    global _kernel
    if _kernel is None:
        from ._row_adamw_triton import row_adamw_kernel

        _kernel = row_adamw_kernel
    return _kernel


def available(device: torch.device) -> bool:
    """Whether the kernel can run on ``device``: triton installed, not disabled (TFZ_DISABLE_TRITON),
    and CUDA, or CPU under the interpreter."""
    if env_flag("TFZ_DISABLE_TRITON") or not has_triton():
        return False
    return device.type == "cuda" or (device.type == "cpu" and env_flag("TRITON_INTERPRET"))


def _device_scalar(name: str, value, param: torch.Tensor) -> tuple[torch.Tensor, float, bool]:
    """(pointer, number, read on the device) for a kernel scalar given as a tensor on ``param``'s
    device (the number is unused) or as a number (the pointer, ``param``, is not read)."""
    if isinstance(value, torch.Tensor):
        _check_tensor(name, value, shape=(), device=param.device)
        return value, 1.0, True
    return param, float(value), False


def row_adamw(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: torch.Tensor | float,
    *,
    lr: torch.Tensor | float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    counts: torch.Tensor | None = None,
    calls: int = 1,
    rescale: bool = False,
    step_scale: float = 0.0,
) -> None:
    """Step ``param`` [rows, ...] in place: AdamW at ``step`` (already incremented: a scalar tensor on
    ``param``'s device, read there, or a number) and learning rate ``lr`` (likewise), rows active in
    ``counts`` [rows] int32 of
    ``calls`` (None: every row in every call). ``rescale`` and ``step_scale`` as in
    :class:`tfz.optim.RowFreezing`. All tensors contiguous on one device, one dtype of :data:`DTYPES`.
    """
    dev = param.device
    for name, t in (("param", param), ("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        _check_tensor(name, t, dtypes=DTYPES, shape=param.shape, device=dev, contiguous=True)
    rows = param.shape[0] if param.dim() else 1
    if counts is not None:
        _check_tensor("counts", counts, dtypes=(torch.int32,), shape=(rows,), device=dev, contiguous=True)
    if rows == 0 or param.numel() == 0:
        return
    cols = param.numel() // rows
    step_ptr, step, on_device = _device_scalar("step", step, param)
    lr_ptr, lr, lr_on_device = _device_scalar("lr", lr, param)
    block = min(BLOCK, max(16, 1 << (cols - 1).bit_length()))
    _load_kernel()[(rows, -(-cols // block))](
        param,
        grad,
        exp_avg,
        exp_avg_sq,
        counts if counts is not None else param,  # not read without HAS_COUNTS
        step_ptr,
        lr_ptr,
        cols,
        calls,
        step,
        lr,
        float(beta1),
        float(beta2),
        float(eps),
        float(weight_decay),
        float(step_scale),
        HAS_COUNTS=counts is not None,
        RESCALE=bool(rescale),
        SCALE_STEP=step_scale != 0.0,
        STEP_ON_DEVICE=on_device,
        LR_ON_DEVICE=lr_on_device,
        BLOCK=block,
    )
