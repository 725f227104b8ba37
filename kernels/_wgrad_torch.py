"""Torch backend of the masked weight gradient: one GEMM per run of active rows, or one gathered GEMM.

The gathered path copies the active columns of dY ([T, active rows]) once; it runs from
GATHER_MIN_RUNS runs on.

Shapes: x [T, in], dy [T, out] (fp32/fp16/bf16, same dtype), dw [out, in] fp32 contiguous,
db [out] fp32 or None. 16-bit operands are upcast to fp32 (exact), so every product is accumulated
in fp32 as in the Triton kernel.
"""

from __future__ import annotations

import torch

from ._rows import active_index, row_runs

__all__ = ["wgrad_torch"]

# From this many runs on, one GEMM over the gathered active columns of dY (plus a copy of them and
# an index_add_) beats one GEMM per run: a 2-thread MKL GEMM loses ~30% efficiency on 128-row slices.
# Measured on CPU (T=2048, in=out=4096, random 128-row blocks: bench/RESULTS.md).
GATHER_MIN_RUNS = 3


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
    xf = _upcast(x)
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
    dy_g = dy.index_select(1, idx)
    prod = _upcast(dy_g).t() @ xf
    if accumulate:
        dw.index_add_(0, idx, prod)
    else:
        dw.index_copy_(0, idx, prod)
    if db is not None:
        s = dy_g.sum(dim=0, dtype=torch.float32)
        if bias_accumulate:
            db.index_add_(0, idx, s)
        else:
            db.index_copy_(0, idx, s)
