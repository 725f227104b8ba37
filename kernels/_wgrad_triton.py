"""Triton kernel for the masked weight gradient and its launcher.

Math (shapes): X [T, in], dY [T, out], dW [out, in] fp32, db [out] fp32;
``dW[o, i] (+)= sum_t dY[t, o] X[t, i]`` and ``db[o] (+)= sum_t dY[t, o]`` for active rows o only.

Launch: a 1-D grid over the *active* tiles only. The host builds (and caches per mask) the int32 list
of row blocks of height BLOCK_M holding at least one active row; program ``pid`` maps to
``(split, compact row-block index, column block)`` with the grouped ordering of the Triton matmul
tutorial applied to the compact row-block index, so GROUP_M consecutive active row blocks sweep the
columns together and reuse X tiles from L2. Rows of a partly active block are computed but masked
at the store, so frozen rows are never written.

Each program loops over the tokens (the GEMM's K dimension) in BLOCK_K steps: unmasked full steps,
then one masked tail step. Out-of-range rows/columns are wrapped (modulo) onto valid ones for the
loads and dropped by the store mask. Epilogue: ``dW = acc`` (overwrite), ``dW += acc`` by load-add-store
(SPLIT_K = 1), or ``tl.atomic_add`` (SPLIT_K > 1, token range split over several programs).

On a GPU the tile shape is autotuned (``restore_value`` keeps the in-place ``dW``/``db`` intact across
trial runs). The key holds N, the flags, and power-of-two buckets of the token count and of the
computed rows, so changing sequence lengths or masks do not retune every step. Split-K configs are
pruned in deterministic mode (``torch.use_deterministic_algorithms``) and for overwrites.
BLOCK_M is chosen on the host from the mask (128, or 64 when 128-row blocks would waste rows).
Under ``TRITON_INTERPRET=1`` one fixed 64x64x64 config runs, and bf16 operands are upcast to fp32
before ``tl.dot`` (the interpreter's bf16 ``tl.dot`` is wrong, triton-lang/triton#11584).

Only plain pointer arithmetic and triton 3.6 features are used (no ``tl.make_block_ptr``, removed in
triton 3.9); tested with triton 3.9 (interpreter, and ahead-of-time compilation for sm_90).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._rows import active_row_blocks

__all__ = ["WgradConfig", "wgrad_triton", "INTERPRET", "INTERPRET_CONFIG", "pinned_config", "choose_block_m"]

# The @triton.jit decorator below reads this when the module is imported.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on", "y")


@dataclass(frozen=True)
class WgradConfig:
    """One launch configuration of the wgrad kernel (tile shape and scheduling)."""

    block_m: int = 64
    """Rows of dW per tile (also the granularity of skipped row blocks)."""
    block_n: int = 64
    """Columns of dW per tile."""
    block_k: int = 64
    """Tokens per K step."""
    group_m: int = 8
    """Active row blocks that sweep the columns together (L2 reuse of X tiles)."""
    split_k: int = 1
    """Programs sharing one tile's token range (> 1 accumulates with fp32 atomics: not deterministic)."""
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"WgradConfig.{name} must be a power of two, got {v}")
        if self.group_m < 1 or self.split_k < 1:
            raise ValueError(
                f"WgradConfig.group_m and split_k must be >= 1, got {self.group_m}, {self.split_k}"
            )


INTERPRET_CONFIG = WgradConfig(block_m=64, block_n=64, block_k=64, group_m=8, split_k=1)
# Set to a WgradConfig to launch that configuration instead of autotuning (tests, reproducible timings).
pinned_config: WgradConfig | None = INTERPRET_CONFIG if INTERPRET else None
BLOCK_M_CHOICES = (128, 64)


@triton.jit
def _k_step(a, b, acc, bias_acc, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """One token step: ``acc += a @ b`` (fp32 accumulate) and ``bias_acc += a`` (the row sums are
    taken once after the loop: a row sum inside the loop broke triton 3.6's sm_90 lowering for fp32)."""
    if HAS_BIAS:
        bias_acc += a.to(tl.float32)
    if UPCAST:  # interpreter only: its bf16 tl.dot is wrong
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return acc, bias_acc


@triton.jit(do_not_specialize=["T_BUCKET", "ROWS_BUCKET", "DETERMINISTIC"])
def _wgrad_kernel(
    DY_ptr,  # dY [T, M]
    X_ptr,  # X [T, N]
    DW_ptr,  # dW [M, N] fp32, unit column stride
    DB_ptr,  # db [M] fp32 (HAS_BIAS)
    MASK_ptr,  # active rows [M] uint8 (HAS_MASK)
    ROWBLK_ptr,  # active row-block indices int32 [num_row_blocks]
    T,
    M,
    N,
    num_row_blocks,
    stride_dy_t,
    stride_dy_m,
    stride_x_t,
    stride_x_n,
    stride_dw_m,
    T_BUCKET,  # autotune key only
    ROWS_BUCKET,  # autotune key only
    DETERMINISTIC,  # autotune key only (split-K configs are pruned when set)
    BLOCK_M: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    BIAS_ACCUMULATE: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_row_blocks * num_pid_n
    split = pid // num_tiles
    tile = pid % num_tiles
    # grouped ordering over the compact list of active row blocks
    tiles_per_group = GROUP_M * num_pid_n
    first_m = (tile // tiles_per_group) * GROUP_M
    group_rows = tl.minimum(num_row_blocks - first_m, GROUP_M)
    pid_mc = first_m + (tile % tiles_per_group) % group_rows
    pid_n = (tile % tiles_per_group) // group_rows
    row_block = tl.load(ROWBLK_ptr + pid_mc)

    offs_m = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Wrapped rows/columns keep every load in bounds without a row/column mask; the store drops them.
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)

    # token range of this split, in whole BLOCK_K steps except at the very end
    k_per_split = tl.cdiv(tl.cdiv(T, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = split * k_per_split
    k_len = tl.maximum(tl.minimum(T - k_start, k_per_split), 0)
    k_full = (k_len // BLOCK_K) * BLOCK_K

    a_ptrs = (
        DY_ptr
        + k_start.to(tl.int64) * stride_dy_t
        + rows[:, None] * stride_dy_m
        + offs_k[None, :] * stride_dy_t
    )
    b_ptrs = (
        X_ptr + k_start.to(tl.int64) * stride_x_t + offs_k[:, None] * stride_x_t + cols[None, :] * stride_x_n
    )
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_M, BLOCK_K) if HAS_BIAS else (1, 1), dtype=tl.float32)
    for _ in range(0, k_full, BLOCK_K):
        a = tl.load(a_ptrs)  # dYᵀ tile [BLOCK_M, BLOCK_K]
        b = tl.load(b_ptrs)  # X tile [BLOCK_K, BLOCK_N]
        acc, bias_acc = _k_step(a, b, acc, bias_acc, HAS_BIAS, UPCAST, INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_dy_t
        b_ptrs += BLOCK_K * stride_x_t
    k_tail = k_len - k_full
    if k_tail > 0:
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_tail, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < k_tail, other=0.0)
        acc, bias_acc = _k_step(a, b, acc, bias_acc, HAS_BIAS, UPCAST, INPUT_PRECISION)

    row_ok = offs_m < M
    if HAS_MASK:
        row_ok = row_ok & (tl.load(MASK_ptr + offs_m, mask=row_ok, other=0) != 0)
    dw_ptrs = DW_ptr + offs_m.to(tl.int64)[:, None] * stride_dw_m + offs_n[None, :]
    store_ok = row_ok[:, None] & (offs_n[None, :] < N)
    if SPLIT_K > 1:
        tl.atomic_add(dw_ptrs, acc, mask=store_ok, sem="relaxed")
    else:
        if ACCUMULATE:
            acc += tl.load(dw_ptrs, mask=store_ok, other=0.0)
        tl.store(dw_ptrs, acc, mask=store_ok)
    if HAS_BIAS:
        if pid_n == 0:
            db = tl.sum(bias_acc, axis=1)
            db_ptrs = DB_ptr + offs_m
            if SPLIT_K > 1:
                tl.atomic_add(db_ptrs, db, mask=row_ok, sem="relaxed")
            else:
                if BIAS_ACCUMULATE:
                    db += tl.load(db_ptrs, mask=row_ok, other=0.0)
                tl.store(db_ptrs, db, mask=row_ok)


def _gpu_configs() -> list[triton.Config]:
    # (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages); BLOCK_M comes from the host, GROUP_M = 8
    shapes = [
        (256, 64, 1, 8, 3),
        (128, 64, 1, 4, 4),
        (128, 64, 1, 8, 4),
        (128, 128, 1, 8, 3),
        (64, 64, 1, 4, 4),
        (128, 32, 1, 8, 4),  # BLOCK_K = 32: the fp32 configs that fit in shared memory
        (256, 32, 1, 8, 3),
        (256, 64, 4, 8, 3),
        (128, 64, 2, 8, 4),
        (128, 64, 4, 4, 4),
    ]
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "SPLIT_K": sk}, num_warps=w, num_stages=s)
        for bn, bk, sk, w, s in shapes
    ]


_SMEM_BYTES = 220 * 1024  # conservative for H100/H200 (227 KB per block)


def _prune_configs(configs, named_args, **kwargs):
    """Drop configs that cannot be used for this call (split-K needs accumulate + non-determinism; smem)."""
    # split-K adds with atomics: only when both outputs accumulate and non-determinism is allowed
    allow_split = (
        bool(kwargs["ACCUMULATE"])
        and (not kwargs["HAS_BIAS"] or bool(kwargs["BIAS_ACCUMULATE"]))
        and not named_args["DETERMINISTIC"]
    )
    elt = named_args["DY_ptr"].element_size()
    bm = kwargs["BLOCK_M"]
    t = named_args["T"]
    kept = []
    for c in configs:
        kw = c.kwargs
        if kw["SPLIT_K"] > 1 and (not allow_split or t < kw["SPLIT_K"] * kw["BLOCK_K"] * 4):
            continue
        if c.num_stages * (bm * kw["BLOCK_K"] + kw["BLOCK_K"] * kw["BLOCK_N"]) * elt > _SMEM_BYTES:
            continue
        kept.append(c)
    return kept or [configs[4]]  # 64x64 tiles, no split: fits in every case


_tuned_kernel = None


def _autotuned():
    global _tuned_kernel
    if _tuned_kernel is None:
        _tuned_kernel = triton.autotune(
            configs=_gpu_configs(),
            key=[
                "N",
                "T_BUCKET",
                "ROWS_BUCKET",
                "DETERMINISTIC",
                "BLOCK_M",
                "HAS_BIAS",
                "ACCUMULATE",
                "BIAS_ACCUMULATE",
            ],
            prune_configs_by={"early_config_prune": _prune_configs},
            restore_value=["DW_ptr", "DB_ptr"],
        )(_wgrad_kernel)
    return _tuned_kernel


def _pow2_bucket(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def choose_block_m(active_rows: torch.Tensor | None, n_rows: int, device: torch.device) -> int:
    """BLOCK_M for the GPU: 128 unless 128-row blocks compute >10% more rows than 64-row blocks."""
    if INTERPRET:
        return INTERPRET_CONFIG.block_m
    if n_rows <= 64:
        return 64
    if active_rows is None:
        return 128
    n128 = active_row_blocks(active_rows, n_rows, 128, device).numel()
    n64 = active_row_blocks(active_rows, n_rows, 64, device).numel()
    return 128 if 128 * n128 <= 1.1 * 64 * n64 else 64


def wgrad_triton(
    x: torch.Tensor,
    dy: torch.Tensor,
    dw: torch.Tensor,
    active_rows: torch.Tensor | None,
    accumulate: bool,
    db: torch.Tensor | None,
    bias_accumulate: bool,
    *,
    config: WgradConfig | None = None,
) -> None:
    """Launch the kernel: ``dw[r] (+)= dy[:, r]ᵀ x``, ``db[r] (+)= sum_t dy[t, r]`` for active rows r.

    Shapes: x [T, N], dy [T, M] (same dtype), dw [M, N] fp32 contiguous, db [M] fp32 or None,
    active_rows [M] bool or None. ``config`` pins one launch configuration (no autotuning); by default
    :data:`pinned_config` is used when set (always under the interpreter), else the GPU autotunes.
    """
    if x.device.type != "cuda" and not INTERPRET:
        raise RuntimeError(
            f"the Triton wgrad kernel was compiled for GPUs (TRITON_INTERPRET was not set when "
            f"tfz.kernels._wgrad_triton was imported) and cannot take {x.device} tensors"
        )
    t, n = x.shape
    m = dy.shape[1]
    if config is None:
        config = pinned_config
    block_m = config.block_m if config is not None else choose_block_m(active_rows, m, dw.device)
    row_blocks = active_row_blocks(active_rows, m, block_m, dw.device)
    n_rb = row_blocks.numel()
    if n_rb == 0:
        return
    is_bf16 = dy.dtype == torch.bfloat16
    tf32 = (
        dy.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and dw.is_cuda and not INTERPRET
    )
    mask_arg = active_rows.contiguous().view(torch.uint8) if active_rows is not None else row_blocks
    args = (
        dy,
        x,
        dw,
        db if db is not None else dw,
        mask_arg,
        row_blocks,
        t,
        m,
        n,
        n_rb,
        dy.stride(0),
        dy.stride(1),
        x.stride(0),
        x.stride(1),
        dw.stride(0),
        _pow2_bucket(t),
        _pow2_bucket(n_rb * block_m),
        int(torch.are_deterministic_algorithms_enabled()),
    )
    meta = {
        "BLOCK_M": block_m,
        "HAS_MASK": active_rows is not None,
        "HAS_BIAS": db is not None,
        "ACCUMULATE": accumulate,
        "BIAS_ACCUMULATE": bias_accumulate,
        "UPCAST": INTERPRET and is_bf16,
        "INPUT_PRECISION": "tf32" if tf32 else "ieee",
    }
    if config is None:
        grid = lambda META: (n_rb * triton.cdiv(n, META["BLOCK_N"]) * META["SPLIT_K"],)
        _autotuned()[grid](*args, **meta)
        return
    if config.split_k > 1:  # atomics add: overwrite = zero the active rows first, then add
        if not accumulate:
            _zero_rows(dw, active_rows)
        if db is not None and not bias_accumulate:
            _zero_rows(db, active_rows)
    grid = (n_rb * triton.cdiv(n, config.block_n) * config.split_k,)
    _wgrad_kernel[grid](
        *args,
        **meta,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        GROUP_M=config.group_m,
        SPLIT_K=config.split_k,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )


def _zero_rows(t: torch.Tensor, active_rows: torch.Tensor | None) -> None:
    if active_rows is None:
        t.zero_()
    else:
        t[active_rows] = 0
