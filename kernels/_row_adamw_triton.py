"""Triton kernel of AdamW's step with tfz.optim's row-freezing semantics (imports triton only, not
torch: the ahead-of-time compile check loads this file on its own).

A parameter is a row-major [rows, cols] tensor (a Linear's weight, or its bias with cols = 1); program
(row, column block) steps BLOCK elements of one row. ``COUNTS`` [rows] int32 (HAS_COUNTS) gives the
calls in which each row was active out of ``calls``: a row active in none is neither read nor written;
RESCALE multiplies its gradient by calls / count; SCALE_STEP multiplies a partly active row's step by
(calls / count) ** step_scale. The step count (after its increment) is read from ``STEP_ptr`` on the
device (STEP_ON_DEVICE, as torch's fused AdamW keeps it) or passed as ``step``, and the learning rate
from ``LR_ptr`` (LR_ON_DEVICE: a tensor lr, as torch's AdamW accepts) or passed as ``lr``, so nothing
waits for the host. Arithmetic is fp32 whatever the storage dtype (fp32, bf16 or fp16), rounded once
at the store:

    g = grad * scale; m += (1 - beta1) (g - m); v = beta2 v + (1 - beta2) g^2
    p = p (1 - lr wd f) - lr f / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
"""

import triton
import triton.language as tl

__all__ = ["row_adamw_kernel"]


@triton.jit(do_not_specialize=["calls"])
def row_adamw_kernel(
    P_ptr,
    G_ptr,
    M_ptr,
    V_ptr,
    COUNTS_ptr,
    STEP_ptr,
    LR_ptr,
    cols,
    calls,
    step,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    step_scale,
    HAS_COUNTS: tl.constexpr,
    RESCALE: tl.constexpr,
    SCALE_STEP: tl.constexpr,
    STEP_ON_DEVICE: tl.constexpr,
    LR_ON_DEVICE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    limit = cols
    grad_scale = 1.0
    factor = 1.0
    if HAS_COUNTS:
        count = tl.load(COUNTS_ptr + row).to(tl.float32)
        limit = tl.where(count > 0, cols, 0)  # a row active in no call: nothing read or written
        share = calls / tl.maximum(count, 1.0)
        if RESCALE:
            grad_scale = share
        if SCALE_STEP:
            factor = tl.where(share > 1.0, tl.exp2(step_scale * tl.log2(share)), 1.0)
    if STEP_ON_DEVICE:
        t = tl.load(STEP_ptr).to(tl.float32)
    else:
        t = step
    if LR_ON_DEVICE:
        lr = tl.load(LR_ptr).to(tl.float32)
    bias1 = 1.0 - tl.exp2(t * tl.log2(beta1))
    bias2_sqrt = tl.sqrt(1.0 - tl.exp2(t * tl.log2(beta2)))
    mask = offs < limit
    at = row.to(tl.int64) * cols + offs
    p = tl.load(P_ptr + at, mask=mask).to(tl.float32)
    g = tl.load(G_ptr + at, mask=mask).to(tl.float32) * grad_scale
    m = tl.load(M_ptr + at, mask=mask).to(tl.float32)
    v = tl.load(V_ptr + at, mask=mask).to(tl.float32)
    m = m + (1.0 - beta1) * (g - m)
    v = beta2 * v + (1.0 - beta2) * g * g
    p = p * (1.0 - lr * weight_decay * factor) - (lr * factor / bias1) * m / (tl.sqrt(v) / bias2_sqrt + eps)
    tl.store(M_ptr + at, m.to(M_ptr.dtype.element_ty), mask=mask)
    tl.store(V_ptr + at, v.to(V_ptr.dtype.element_ty), mask=mask)
    tl.store(P_ptr + at, p.to(P_ptr.dtype.element_ty), mask=mask)
