"""Torch backend of the masked weight gradient: one GEMM per run of active rows, or one gathered GEMM.

The gathered path copies the active columns of dY ([T, active rows]) once; on the CPU it runs from
GATHER_MIN_RUNS runs on, on GPUs only when the runs are short (fewer than GATHER_MAX_MEAN_RUN rows on
average: a GEMM per run then costs more launches than the gather; tfz.masks' 64-row units always take
one GEMM per run there, directly into dW's rows). On the CPU the temporaries live in a per-thread
workspace (at most WORKSPACE_MAX_BYTES per buffer; :func:`release_workspace` frees it): fresh
allocations of that size are mmapped and page-faulted on every call, which cost ~5% of the GEMM time
in the benchmark.

Shapes: x [T, in], dy [T, out] (fp32/fp16/bf16, same dtype), dw [out, in] contiguous, fp32 or
fp16/bf16, db [out] fp32 or None. 16-bit operands are upcast to fp32 (exact), so every product is
accumulated in fp32 as in the Triton kernel; a 16-bit dW is read, added to in fp32 and rounded once,
for its active rows only. Runs and indices come from :class:`~tfz.kernels.ActiveRows`: nothing here
reads the mask's device copy on the host.
"""

from __future__ import annotations

import threading

import torch

from .rows import ActiveRows

__all__ = ["wgrad_torch", "release_workspace"]

# From this many runs on, one GEMM over the gathered active columns of dY (plus a copy of them and
# an index_add_) beats one GEMM per run: a 2-thread MKL GEMM loses ~30% efficiency on 128-row slices.
# Measured on CPU (T=2048, in=out=4096, random 128-row blocks: bench/RESULTS.md).
GATHER_MIN_RUNS = 3
GATHER_MAX_MEAN_RUN = 32
WORKSPACE_MAX_BYTES = 1 << 29
_local = threading.local()


def release_workspace() -> None:
    """Free this thread's CPU workspace buffers."""
    _local.__dict__.pop("buffers", None)


def _workspace(slot: str, shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised [shape] tensor; on the CPU a view of a reused per-thread buffer."""
    numel = shape[0] * shape[1]
    if device.type != "cpu" or numel * dtype.itemsize > WORKSPACE_MAX_BYTES:
        return torch.empty(shape, dtype=dtype, device=device)
    buffers = _local.__dict__.setdefault("buffers", {})
    buf = buffers.get((slot, dtype))
    if buf is None or buf.numel() < numel:
        buf = buffers[(slot, dtype)] = torch.empty(numel, dtype=dtype)
    return buf[:numel].view(shape)


def _upcast(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()


def _gather(rows: ActiveRows, device: torch.device) -> bool:
    if len(rows.runs) < GATHER_MIN_RUNS:
        return False
    return device.type == "cpu" or rows.n_active < GATHER_MAX_MEAN_RUN * len(rows.runs)


def wgrad_torch(
    x: torch.Tensor,
    dy: torch.Tensor,
    dw: torch.Tensor,
    rows: ActiveRows | None,
    accumulate: bool,
    db: torch.Tensor | None,
    bias_accumulate: bool,
) -> None:
    """``dw[r] (+)= dy[:, r]ᵀ x`` and ``db[r] (+)= sum_t dy[t, r]`` for active rows r; frozen rows untouched.

    ``accumulate`` / ``bias_accumulate`` choose add (True) or overwrite (False) for dw / db.
    """
    runs = [(0, dy.shape[1])] if rows is None else rows.runs
    if not runs:
        return
    xf = x if x.dtype == torch.float32 else _workspace("x", tuple(x.shape), torch.float32, x.device).copy_(x)
    if rows is not None and _gather(rows, dy.device):
        _gathered(xf, dy, dw, rows.index, accumulate, db, bias_accumulate)
        return
    whole = len(runs) == 1 and runs[0] == (0, dy.shape[1])
    for a, b in runs:
        dy_r = _upcast(dy if whole else dy[:, a:b])
        _add_rows(dw if whole else dw[a:b], dy_r.t(), xf, accumulate)
        if db is not None:
            s = dy_r.sum(dim=0)
            if bias_accumulate:
                db[a:b] += s
            else:
                db[a:b] = s


def _add_rows(dst: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> None:
    """``dst (+)= a @ b`` in fp32; a 16-bit ``dst`` is rounded once."""
    if dst.dtype == torch.float32:
        if accumulate:
            dst.addmm_(a, b)
        else:
            torch.mm(a, b, out=dst)
    elif accumulate:
        dst.copy_(torch.addmm(dst.float(), a, b))
    else:
        dst.copy_(torch.mm(a, b))


def _gathered(xf, dy, dw, idx, accumulate, db, bias_accumulate) -> None:
    t, n = dy.shape[0], idx.numel()
    dy_g = torch.index_select(dy, 1, idx, out=_workspace("dy", (t, n), dy.dtype, dy.device))
    dy_gf = (
        dy_g if dy.dtype == torch.float32 else _workspace("dyf", (t, n), torch.float32, dy.device).copy_(dy_g)
    )
    prod = torch.mm(dy_gf.t(), xf, out=_workspace("prod", (n, xf.shape[1]), torch.float32, dy.device))
    if dw.dtype != torch.float32:
        if accumulate:
            prod += dw.index_select(0, idx)
        dw.index_copy_(0, idx, prod.to(dw.dtype))
    elif accumulate:
        dw.index_add_(0, idx, prod)
    else:
        dw.index_copy_(0, idx, prod)
    if db is not None:
        s = dy_gf.sum(dim=0)
        if bias_accumulate:
            db.index_add_(0, idx, s)
        else:
            db.index_copy_(0, idx, s)
