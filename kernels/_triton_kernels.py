"""Triton kernels of the masked weight gradient (imports triton only, not torch: the ahead-of-time
compile check loads this file on its own).

Math (shapes): X [T, N], dY [T, M], dW [M, N] (fp32, or fp16/bf16), db [M] fp32;
``dW[m, n] (+)= sum_t dY[t, m] X[t, n]`` and ``db[m] (+)= sum_t dY[t, m]`` for active rows m only.

:func:`wgrad_kernel` runs over the *active* tiles only: program ``pid`` maps to (split, compact
row-block index, column block) with the grouped ordering of the Triton matmul tutorial applied to the
compact list ``ROWBLK`` of active row blocks, so GROUP_M consecutive active row blocks sweep the
columns together and reuse X tiles from L2. Rows of a partly active block are computed but masked at
the store, so frozen rows are never written. With ACCUMULATE the accumulator starts from dW (loaded
before the token loop: a load after it would keep a second [BLOCK_M, BLOCK_N] tile alive and spill);
products accumulate in fp32 and are rounded once, at the store, to dW's dtype. SPLIT_K > 1 splits the
tokens over several programs that add with fp32 atomics (not deterministic; the launcher zeroes the
rows first when overwriting).

:func:`bias_kernel` is the bias gradient on its own, over the same row-block list (it reads only
the active columns of dY), so the GEMM kernel carries no bias registers. Its token range may be split
over SPLIT_T programs that add with atomics.

Out-of-range rows/columns are wrapped (modulo) onto valid ones for the loads and dropped by the store
mask. Only plain pointer arithmetic and triton 3.6 features are used (``tl.make_block_ptr`` was
removed in triton 3.9). UPCAST converts bf16 operands to fp32 before ``tl.dot``: the interpreter's bf16
``tl.dot`` is wrong (triton-lang/triton#11584); compiled kernels never set it.
"""

import triton
import triton.language as tl

__all__ = ["bias_kernel", "wgrad_kernel"]


@triton.jit
def _tile_offsets(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, stride_m):
    return tl.arange(0, BLOCK_M)[:, None] * stride_m + tl.arange(0, BLOCK_N)[None, :]


@triton.jit
def _store_mask(MASK_ptr, offs_m, offs_n, M, N, HAS_MASK: tl.constexpr):
    """[BLOCK_M, BLOCK_N]: in range, and the row is active (HAS_MASK)."""
    row_ok = offs_m < M
    if HAS_MASK:
        row_ok = row_ok & (tl.load(MASK_ptr + offs_m, mask=row_ok, other=0) != 0)
    return row_ok[:, None] & (offs_n[None, :] < N)


@triton.jit(do_not_specialize=["T", "num_row_blocks"])
def wgrad_kernel(
    DY_ptr,  # dY [T, M]
    X_ptr,  # X [T, N]
    DW_ptr,  # dW [M, N], unit column stride
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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
    HAS_MASK: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
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
    # 64-bit scalar base, 32-bit offsets inside the tile: no 64-bit pointer tensors in registers
    dw_base = DW_ptr + (row_block * BLOCK_M).to(tl.int64) * stride_dw_m + pid_n * BLOCK_N
    if ACCUMULATE and SPLIT_K == 1:
        # wrapped, unmasked: rows and columns out of range read valid memory and are never stored
        pre = DW_ptr + (offs_m % M).to(tl.int64)[:, None] * stride_dw_m + (offs_n % N)[None, :]
        acc = tl.load(pre).to(tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    # token range of this split, in whole BLOCK_K steps except at the very end
    k_per_split = tl.cdiv(tl.cdiv(T, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = split * k_per_split
    k_len = tl.maximum(tl.minimum(T - k_start, k_per_split), 0)
    k_full = (k_len // BLOCK_K) * BLOCK_K
    # Wrapped rows/columns keep every load in bounds without a row/column mask; the store drops them.
    rows = offs_m % M
    cols = offs_n % N
    a_base = DY_ptr + k_start.to(tl.int64) * stride_dy_t
    b_base = X_ptr + k_start.to(tl.int64) * stride_x_t
    a_offs = offs_k[None, :] * stride_dy_t + rows[:, None] * stride_dy_m
    b_offs = offs_k[:, None] * stride_x_t + cols[None, :] * stride_x_n
    for _ in range(0, k_full, BLOCK_K):
        a = tl.load(a_base + a_offs)  # dYᵀ tile [BLOCK_M, BLOCK_K]
        b = tl.load(b_base + b_offs)  # X tile [BLOCK_K, BLOCK_N]
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_base += BLOCK_K * stride_dy_t
        b_base += BLOCK_K * stride_x_t
    k_tail = k_len - k_full
    if k_tail > 0:
        a = tl.load(a_base + a_offs, mask=offs_k[None, :] < k_tail, other=0.0)
        b = tl.load(b_base + b_offs, mask=offs_k[:, None] < k_tail, other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    # recomputed here rather than kept alive through the token loop
    dw_ptrs = dw_base + _tile_offsets(BLOCK_M, BLOCK_N, stride_dw_m)
    store_ok = _store_mask(MASK_ptr, offs_m, offs_n, M, N, HAS_MASK)
    if SPLIT_K > 1:
        tl.atomic_add(dw_ptrs, acc, mask=store_ok, sem="relaxed")
    else:
        tl.store(dw_ptrs, acc.to(DW_ptr.dtype.element_ty), mask=store_ok)


@triton.jit(do_not_specialize=["T"])
def bias_kernel(
    DY_ptr,  # dY [T, M]
    DB_ptr,  # db [M] fp32
    MASK_ptr,  # active rows [M] uint8 (HAS_MASK)
    ROWBLK_ptr,  # active row-block indices int32
    T,
    M,
    stride_dy_t,
    stride_dy_m,
    BLOCK_M: tl.constexpr,
    BLOCK_T: tl.constexpr,
    SPLIT_T: tl.constexpr,
    HAS_MASK: tl.constexpr,
    ACCUMULATE: tl.constexpr,
):
    """``db[m] (+)= sum_t dY[t, m]`` for the active rows of row block ROWBLK[program_id(0)]; program
    ``program_id(1)`` sums its share of the tokens (SPLIT_T > 1 adds with atomics)."""
    row_block = tl.load(ROWBLK_ptr + tl.program_id(0))
    split = tl.program_id(1)
    offs_m = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_t = tl.arange(0, BLOCK_T)
    rows = (offs_m % M).to(tl.int64)
    t_per_split = tl.cdiv(tl.cdiv(T, SPLIT_T), BLOCK_T) * BLOCK_T
    t_start = split * t_per_split
    t_stop = tl.minimum(T, t_start + t_per_split)
    ptrs = DY_ptr + (t_start + offs_t).to(tl.int64)[:, None] * stride_dy_t + rows[None, :] * stride_dy_m
    # a [BLOCK_T, BLOCK_M] partial sum, reduced once after the loop
    acc = tl.zeros((BLOCK_T, BLOCK_M), dtype=tl.float32)
    for t0 in range(t_start, t_stop, BLOCK_T):
        acc += tl.load(ptrs, mask=(t0 + offs_t)[:, None] < t_stop, other=0.0).to(tl.float32)
        ptrs += BLOCK_T * stride_dy_t
    db = tl.sum(acc, axis=0)
    row_ok = offs_m < M
    if HAS_MASK:
        row_ok = row_ok & (tl.load(MASK_ptr + offs_m, mask=row_ok, other=0) != 0)
    db_ptrs = DB_ptr + offs_m
    if SPLIT_T > 1:
        tl.atomic_add(db_ptrs, db, mask=row_ok, sem="relaxed")
    else:
        if ACCUMULATE:
            db += tl.load(db_ptrs, mask=row_ok, other=0.0)
        tl.store(db_ptrs, db, mask=row_ok)
