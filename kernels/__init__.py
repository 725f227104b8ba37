"""Masked weight-gradient GEMM for frozen-row training, installed as ``tfz.kernels``.

Entry points:

- :func:`wgrad` -- ``dW = dYᵀ X`` for the active rows only, into a fresh tensor or a ``main_grad`` /
  ``.grad`` (add or overwrite; fp32, bf16 or fp16), with an optional bias gradient.
- :func:`wgrad_gemm_accum_fp32` / :func:`wgrad_gemm_accum_fp16` -- in-place ``main_grad += dYᵀ X``,
  call-compatible with apex's fused wgrad (Megatron ``gradient_accumulation_fusion``, zero-bubble
  ``WeightGradStore``).
- :class:`ActiveRows` -- a row mask prepared once (row runs, row-block lists on its device), so a dW
  call needs no host synchronisation.
- :func:`tune` -- measure the Triton kernel's configs for a model's layer shapes once at start-up
  (cacheable); without it a fixed table is used and nothing is measured during training.
- :func:`wgrad_ref` -- float64 reference used by tests and benchmarks.
- :func:`tfz.kernels.row_adamw.row_adamw` -- AdamW's step with row freezing in one Triton launch
  (tfz.optim's path on CUDA; not imported here).

``import tfz.kernels`` imports torch but never triton; the Triton kernel loads on its first launch.
"""

from .rows import ActiveRows
from .tuning import tune
from .wgrad import (
    BACKENDS,
    has_triton,
    resolve_backend,
    wgrad,
    wgrad_gemm_accum_fp16,
    wgrad_gemm_accum_fp32,
)
from .wgrad_ref import wgrad_ref

__all__ = [
    "ActiveRows",
    "BACKENDS",
    "has_triton",
    "resolve_backend",
    "tune",
    "wgrad",
    "wgrad_gemm_accum_fp16",
    "wgrad_gemm_accum_fp32",
    "wgrad_ref",
]
