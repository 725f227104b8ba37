"""Masked weight gradient ``dW = dYᵀ X`` over active rows only: public entry points and backend dispatch.

For a Linear layer ``Y = X Wᵀ`` with X [T, in] and dY [T, out] (leading dims collapsed into T tokens),
the weight gradient is ``dW[o, i] = sum_t dY[t, o] X[t, i]`` ([out, in]) and the bias gradient is
``db[o] = sum_t dY[t, o]``. tfz freezes whole rows of W; the entry points here compute only the active
rows (``active_rows[o]`` True) and leave frozen rows of the destination bit-for-bit untouched.
Products are accumulated in fp32 for fp32/fp16/bf16 inputs.

Backends: ``"triton"`` (a Triton kernel launched over the active tiles only; CUDA tensors, or CPU tensors
when ``TRITON_INTERPRET=1`` is set before the kernel module is imported), ``"torch"`` (one GEMM per run
of active rows, or one gathered GEMM; any device) and ``"auto"``: triton for CUDA tensors with bf16/fp16
operands, and for fp32 operands when ``torch.backends.cuda.matmul.allow_tf32`` is set (the kernel then
multiplies in TF32); torch (cuBLAS) for fp32 without TF32, where a Triton kernel would run on FMA
units, and on every other device. ``TFZ_DISABLE_TRITON=1`` makes "auto" use torch. An explicit
``backend="triton"`` that cannot run raises; with fp32 operands and TF32 off it runs the exact-fp32
(FMA) kernel, which is slow.

Masks: ``active_rows`` is an :class:`~tfz.kernels.ActiveRows` (prepared once per mask: the call then
needs no host synchronisation) or a bool tensor, prepared on every call (one device-to-host copy for a
CUDA tensor; prepare it once instead when it is reused).

Reproducibility (bitwise, same inputs, mask, destination and device):

- Triton: each dW element is made by one program adding the token tiles in a fixed order, so a call
  repeats bit for bit given the same launch config. The config follows the GPU, the dtype, the layer's
  in_features bucket, BLOCK_M (64 or 128, chosen from the mask) and any :func:`~tfz.kernels.tune`
  result (load a tuning cache to get the same config in every process). Split-K and the bias
  kernel's token split add with fp32 atomics in a varying order; they are used only for launches that
  fill less than half of the GPU and never while ``torch.are_deterministic_algorithms_enabled()``.
- torch: one GEMM per run of active rows, or one gathered GEMM when the runs are many and short; a
  given mask always takes the same path, with the reproducibility of torch's GEMMs (set
  ``CUBLAS_WORKSPACE_CONFIG`` as torch's deterministic mode asks).
- Different masks may compute a row's value with a different tile shape or GEMM, so the last bits of
  an active row can differ between masks; frozen rows are never written.

Entry points: :func:`wgrad`, :func:`wgrad_gemm_accum_fp32` / :func:`wgrad_gemm_accum_fp16`
(call-compatible with apex's ``fused_weight_gradient_mlp_cuda``), :func:`has_triton`,
:func:`resolve_backend`.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from tfz._validate import env_flag

from ._wgrad_torch import wgrad_torch
from .rows import ActiveRows, parse_device

__all__ = [
    "wgrad",
    "wgrad_gemm_accum_fp32",
    "wgrad_gemm_accum_fp16",
    "has_triton",
    "resolve_backend",
    "BACKENDS",
]

BACKENDS = ("auto", "torch", "triton")
_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def has_triton() -> bool:
    """True when the ``triton`` package is importable (it is not imported here)."""
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return env_flag("TRITON_INTERPRET")


def resolve_backend(backend: str, device: torch.device | str, dtype: torch.dtype | None = None) -> str:
    """The backend ("torch" or "triton") that ``backend`` selects for ``dtype`` operands on ``device``
    (``dtype`` None: 16-bit operands).

    Raises:
        ValueError: ``backend`` is not one of :data:`BACKENDS`.
        RuntimeError: ``backend="triton"`` was requested but cannot run here (reason in the message).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device = parse_device(device)
    if backend == "torch":
        return "torch"
    disabled = env_flag("TFZ_DISABLE_TRITON")
    if backend == "auto":
        fma = dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
        return "triton" if (device.type == "cuda" and not disabled and not fma and has_triton()) else "torch"
    if disabled:
        raise RuntimeError("backend='triton' was requested but TFZ_DISABLE_TRITON=1 is set")
    if not has_triton():
        raise RuntimeError("backend='triton' was requested but the 'triton' package is not installed")
    if device.type == "cpu" and not _interpreting():
        raise RuntimeError(
            "backend='triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 before "
            "tfz.kernels runs its first Triton launch"
        )
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(
            f"backend='triton' supports CUDA (or interpreted CPU) tensors, got device {device}"
        )
    return "triton"


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def _check_tensor(name: str, t, *, dtypes=None, shape=None, device=None, contiguous=False) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {_describe(t)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {_describe(t)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on device {device}, got {_describe(t)}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {t.stride()} ({_describe(t)})")


def _span(t: torch.Tensor) -> tuple[int, int]:
    """Byte range [first, last + 1) that ``t``'s elements occupy (strides are never negative)."""
    first = t.data_ptr()
    if t.is_contiguous():
        return first, first + t.numel() * t.element_size()
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return first, first + (last + 1) * t.element_size()


def _check_no_overlap(name: str, dest: torch.Tensor, sources: tuple) -> None:
    """``dest`` (written) must not share memory with any ``(name, tensor)`` of ``sources`` (read, on
    the same device): a kernel reading what it writes gives a wrong result without an error. Meta
    tensors hold no memory."""
    if dest.is_meta or dest.numel() == 0:
        return
    first, stop = _span(dest)
    for source_name, t in sources:
        if t is None or t.numel() == 0:
            continue
        t_first, t_stop = _span(t)
        if first < t_stop and t_first < stop:
            raise ValueError(
                f"{name} shares memory with {source_name} ({_describe(dest)}; {source_name} "
                f"{_describe(t)}): the destination must be a separate tensor"
            )


def _as_tokens(input: torch.Tensor, grad_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate X [..., in] and dY [..., out] and collapse their leading dims (as apex does)."""
    _check_tensor("input", input, dtypes=_INPUT_DTYPES)
    _check_tensor("grad_output", grad_output, dtypes=_INPUT_DTYPES)
    if input.dim() < 1 or grad_output.dim() < 1:
        raise ValueError(
            f"input and grad_output need at least 1 dim, got input {tuple(input.shape)} and "
            f"grad_output {tuple(grad_output.shape)}"
        )
    if input.dtype != grad_output.dtype:
        raise TypeError(
            f"input and grad_output must have the same dtype, got input {input.dtype} and "
            f"grad_output {grad_output.dtype}"
        )
    if input.device != grad_output.device:
        raise ValueError(
            f"input and grad_output must be on the same device, got {input.device} and {grad_output.device}"
        )
    x = input.reshape(-1, input.shape[-1]) if input.dim() != 2 else input
    dy = grad_output.reshape(-1, grad_output.shape[-1]) if grad_output.dim() != 2 else grad_output
    if x.shape[0] != dy.shape[0]:
        raise ValueError(
            f"input and grad_output must have the same number of tokens (product of leading dims), got "
            f"input {tuple(input.shape)} ({x.shape[0]} tokens) and grad_output {tuple(grad_output.shape)} "
            f"({dy.shape[0]} tokens)"
        )
    return x, dy


def wgrad(
    input: torch.Tensor,
    grad_output: torch.Tensor,
    *,
    active_rows: torch.Tensor | ActiveRows | None = None,
    out: torch.Tensor | None = None,
    accumulate: bool = True,
    bias_grad: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Weight gradient ``dW = dYᵀ X`` of a Linear layer, computed for the active rows only.

    Args:
        input: X [..., in], fp32/fp16/bf16.
        grad_output: dY [..., out], same dtype and device as ``input``, same number of tokens
            (leading dims are collapsed: T = prod(leading dims)).
        active_rows: :class:`~tfz.kernels.ActiveRows` with ``n_rows`` = out (its device is used as
            is), or a bool tensor [out] on the same device; True = row o of W trains. None = all rows.
        out: contiguous [out, in] destination (e.g. ``weight.main_grad`` or ``weight.grad``), fp32,
            bf16 or fp16 (products accumulate in fp32; a 16-bit ``out`` is rounded once per call), or
            None. It must not share memory with ``input`` or ``grad_output`` (ValueError).
        accumulate: with ``out`` given, True adds (``out[o] += dY[:, o]ᵀ X``, beta = 1) and False
            overwrites the active rows. Also selects add/overwrite for ``bias_grad``.
        bias_grad: optional fp32 contiguous [out], sharing memory with no other argument; its active
            entries get ``sum_t dY[t, o]`` added (or written, with ``accumulate=False``).
        backend: "auto", "torch" or "triton" (see the module docstring).

    Returns:
        dW fp32 [out, in]: ``out`` itself when given (frozen rows untouched), else a new tensor whose
        frozen rows are 0.
    """
    x, dy = _as_tokens(input, grad_output)
    device = x.device
    n_out, n_in = dy.shape[1], x.shape[1]
    rows = _prepared(active_rows, n_out, device)
    if out is not None:
        _check_tensor(
            "out (main_grad)", out, dtypes=_OUT_DTYPES, shape=(n_out, n_in), device=device, contiguous=True
        )
    if bias_grad is not None:
        _check_tensor(
            "bias_grad", bias_grad, dtypes=(torch.float32,), shape=(n_out,), device=device, contiguous=True
        )
        _check_no_overlap("bias_grad", bias_grad, (("input", x), ("grad_output", dy), ("out", out)))
    if out is not None:
        _check_no_overlap("out (main_grad)", out, (("input", x), ("grad_output", dy)))
    chosen = resolve_backend(backend, device, x.dtype)
    if out is None:
        alloc = torch.empty if rows is None else torch.zeros
        out = alloc(n_out, n_in, dtype=torch.float32, device=device)
        dw_accumulate = False
    else:
        dw_accumulate = bool(accumulate)
    if n_out == 0 or n_in == 0:
        return out
    _dispatch(x, dy, out, rows, dw_accumulate, bias_grad, bool(accumulate), chosen, backend == "triton")
    return out


def _dispatch(x, dy, out, rows, accumulate, bias_grad, bias_accumulate, chosen: str, required: bool) -> None:
    launch = _triton_launcher(required) if chosen == "triton" else None
    if launch is not None:  # a kernel launch records nothing for autograd
        launch(x, dy, out, rows, accumulate, bias_grad, bias_accumulate)
    else:
        with torch.no_grad():
            wgrad_torch(x, dy, out, rows, accumulate, bias_grad, bias_accumulate)


def wgrad_unchecked(
    x: torch.Tensor, dy: torch.Tensor, out: torch.Tensor, rows: ActiveRows | None, accumulate: bool
) -> None:
    """:func:`wgrad` (backend "auto", no bias) without its checks, for callers that already hold what
    they check: x [T, in] and dy [T, out] 2-D, of one dtype in fp32/fp16/bf16 and one device; ``out``
    a contiguous [out, in] fp32/bf16/fp16 tensor there that shares no memory with them; ``rows``
    prepared there or None. FreezableLinear's backward calls it for every layer and microbatch, where
    the checks cost as much as a small layer's masked GEMM."""
    if out.numel() == 0:
        return
    chosen = "torch" if x.device.type != "cuda" else resolve_backend("auto", x.device, x.dtype)
    _dispatch(x, dy, out, rows, accumulate, None, accumulate, chosen, False)


_launcher = None


def _triton_launcher(required: bool):
    """The Triton launcher (imports triton on first use), or None when it cannot be imported and the
    Triton backend was not asked for by name."""
    global _launcher
    if _launcher is None:
        try:
            from ._wgrad_triton import wgrad_triton
        except ImportError:
            if required:
                raise
            return None
        _launcher = wgrad_triton
    return _launcher


def _prepared(active_rows, n_out: int, device: torch.device) -> ActiveRows | None:
    """``active_rows`` as ActiveRows on ``device`` (None: every row active)."""
    if active_rows is None:
        return None
    if isinstance(active_rows, ActiveRows):
        if active_rows.n_rows != n_out:
            raise ValueError(f"active_rows has {active_rows.n_rows} rows, expected {n_out} ({active_rows!r})")
        if active_rows.device != device:
            raise ValueError(f"active_rows must be on device {device}, got {active_rows!r}")
        return active_rows
    _check_tensor("active_rows", active_rows, dtypes=(torch.bool,), shape=(n_out,), device=device)
    return ActiveRows(active_rows, device)


def wgrad_gemm_accum_fp32(
    input: torch.Tensor,
    grad_output: torch.Tensor,
    main_grad: torch.Tensor,
    *,
    active_rows: torch.Tensor | ActiveRows | None = None,
    backend: str = "auto",
) -> None:
    """``main_grad[o] += dY[:, o]ᵀ X`` for active rows o, in place; frozen rows untouched.

    Call-compatible with apex's ``fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32(input, d_output,
    d_weight)``: ``input`` X [..., in] and ``grad_output`` dY [..., out] (fp32/fp16/bf16, leading dims
    collapsed), ``main_grad`` fp32 contiguous [out, in]. Runs on the current stream; returns None.
    """
    _check_tensor("main_grad", main_grad, dtypes=(torch.float32,))
    wgrad(input, grad_output, active_rows=active_rows, out=main_grad, accumulate=True, backend=backend)


def wgrad_gemm_accum_fp16(
    input: torch.Tensor,
    grad_output: torch.Tensor,
    main_grad: torch.Tensor,
    *,
    active_rows: torch.Tensor | ActiveRows | None = None,
    backend: str = "auto",
) -> None:
    """As :func:`wgrad_gemm_accum_fp32` for a 16-bit ``main_grad`` (bf16 or fp16, like apex's
    ``wgrad_gemm_accum_fp16``): products accumulate in fp32 and each active element is rounded once."""
    _check_tensor("main_grad", main_grad, dtypes=(torch.bfloat16, torch.float16))
    wgrad(input, grad_output, active_rows=active_rows, out=main_grad, accumulate=True, backend=backend)
