"""Torch backend of the masked weight gradient: one GEMM per run of active rows, or one gathered GEMM.

The gathered path copies the active columns of dY ([T, active rows]) once; it runs from
GATHER_MIN_RUNS runs on. On the CPU its temporaries live in a per-thread workspace (at most
WORKSPACE_MAX_BYTES per buffer; :func:`release_workspace` frees it): fresh allocations of that size
are mmapped and page-faulted on every call, which cost ~5% of the GEMM time in the benchmark.

Shapes: x [T, in], dy [T, out] (fp32/fp16/bf16, same dtype), dw [out, in] fp32 contiguous,
db [out] fp32 or None. 16-bit operands are upcast to fp32 (exact), so every product is accumulated
in fp32 as in the Triton kernel.
"""

from __future__ import annotations

import threading

import torch

from ._rows import active_index, row_runs

__all__ = ["wgrad_torch", "release_workspace"]

# From this many runs on, one GEMM over the gathered active columns of dY (plus a copy of them and
# an index_add_) beats one GEMM per run: a 2-thread MKL GEMM loses ~30% efficiency on 128-row slices.
# Measured on CPU (T=2048, in=out=4096, random 128-row blocks: bench/RESULTS.md).
GATHER_MIN_RUNS = 3
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


def _runs(active_rows: torch.Tensor | None, n_out: int) -> list[tuple[int, int]]:
    if active_rows is None:
        return [(0, n_out)] if n_out > 0 else []
    return row_runs(active_rows)


def wgrad_torch(
    x: torch.Tensor,
    dy: torch.Tensor,
    dw: torch.Tensor,
    active_rows: torch.Tensor | None,
    accumulate: bool,
    db: torch.Tensor | None,
    bias_accumulate: bool,
) -> None:
    """``dw[r] (+)= dy[:, r]ᵀ x`` and ``db[r] (+)= sum_t dy[t, r]`` for active rows r; frozen rows untouched.

    ``accumulate`` / ``bias_accumulate`` choose add (True) or overwrite (False) for dw / db.
    """
    runs = _runs(active_rows, dy.shape[1])
    if not runs:
        return
    xf = x if x.dtype == torch.float32 else _workspace("x", tuple(x.shape), torch.float32, x.device).copy_(x)
    if len(runs) >= GATHER_MIN_RUNS:
        _gathered(xf, dy, dw, active_rows, accumulate, db, bias_accumulate)
        return
    for a, b in runs:
        dy_r = dy[:, a:b]
        dst = dw[a:b]
        if accumulate:
            dst.addmm_(_upcast(dy_r).t(), xf)
        else:
            torch.mm(_upcast(dy_r).t(), xf, out=dst)
        if db is not None:
            s = dy_r.sum(dim=0, dtype=torch.float32)
            if bias_accumulate:
                db[a:b] += s
            else:
                db[a:b] = s


def _gathered(xf, dy, dw, active_rows, accumulate, db, bias_accumulate) -> None:
    idx = active_index(active_rows)
    t, n = dy.shape[0], idx.numel()
    dy_g = torch.index_select(dy, 1, idx, out=_workspace("dy", (t, n), dy.dtype, dy.device))
    dy_gf = (
        dy_g if dy.dtype == torch.float32 else _workspace("dyf", (t, n), torch.float32, dy.device).copy_(dy_g)
    )
    prod = torch.mm(dy_gf.t(), xf, out=_workspace("prod", (n, xf.shape[1]), torch.float32, dy.device))
    if accumulate:
        dw.index_add_(0, idx, prod)
    else:
        dw.index_copy_(0, idx, prod)
    if db is not None:
        s = dy_gf.sum(dim=0)
        if bias_accumulate:
            db.index_add_(0, idx, s)
        else:
            db.index_copy_(0, idx, s)
