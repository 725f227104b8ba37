"""Masked weight-gradient GEMM for frozen-row training, installed as ``tfz.kernels``.

Entry points:

- :func:`wgrad` -- ``dW = dYᵀ X`` for the active rows only, into a fresh tensor or an fp32 ``main_grad``
  (add or overwrite), with an optional bias gradient.
- :func:`wgrad_gemm_accum_fp32` -- in-place ``main_grad += dYᵀ X``, call-compatible with apex's fused
  wgrad (Megatron ``gradient_accumulation_fusion``, zero-bubble ``WeightGradStore``).
- :func:`wgrad_ref` -- float64 reference used by tests and benchmarks.

``import tfz.kernels`` imports torch but never triton; the Triton kernel loads on its first launch.
"""

from .wgrad import BACKENDS, has_triton, resolve_backend, wgrad, wgrad_gemm_accum_fp32
from .wgrad_ref import wgrad_ref

__all__ = ["wgrad", "wgrad_gemm_accum_fp32", "wgrad_ref", "has_triton", "resolve_backend", "BACKENDS"]
