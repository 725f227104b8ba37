"""Float64 reference for the masked weight gradient; shared by the tests and the benchmarks."""

from __future__ import annotations

import torch

__all__ = ["wgrad_ref"]


def wgrad_ref(
    input: torch.Tensor,
    grad_output: torch.Tensor,
    *,
    active_rows: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    accumulate: bool = True,
    bias_grad: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What :func:`tfz.kernels.wgrad` must return, computed densely in float64. Inputs are not modified.

    Args:
        input: X [..., in].
        grad_output: dY [..., out] (same number of tokens as ``input``).
        active_rows: bool [out], :class:`~tfz.kernels.ActiveRows`, or None (all rows active).
        out: previous dW [out, in] or None (zeros).
        accumulate: add to ``out`` (True) or replace its active rows (False).
        bias_grad: previous bias gradient [out], or None for no bias gradient.

    Returns:
        ``(dW, db)`` in float64: dW [out, in] with active rows ``out + dYᵀX`` (or ``dYᵀX``) and frozen rows
        equal to ``out`` (or 0); db [out] likewise with ``sum_t dY[t]``, or None without ``bias_grad``.
    """
    x = input.detach().reshape(-1, input.shape[-1]).to("cpu", torch.float64)
    dy = grad_output.detach().reshape(-1, grad_output.shape[-1]).to("cpu", torch.float64)
    n_out, n_in = dy.shape[1], x.shape[1]
    if active_rows is None:
        mask = torch.ones(n_out, dtype=torch.bool)
    elif isinstance(active_rows, torch.Tensor):
        mask = active_rows.detach().to("cpu").bool()
    else:  # ActiveRows
        mask = torch.from_numpy(active_rows.host.copy())
    prod = torch.einsum("to,ti->oi", dy, x)
    base = torch.zeros(n_out, n_in, dtype=torch.float64) if out is None else out.detach().to("cpu").double()
    new_rows = base + prod if (accumulate and out is not None) else prod
    dw = torch.where(mask[:, None], new_rows, base)
    if bias_grad is None:
        return dw, None
    b_base = bias_grad.detach().to("cpu").double()
    b_sum = dy.sum(dim=0)
    b_new = b_base + b_sum if accumulate else b_sum
    return dw, torch.where(mask, b_new, b_base)
