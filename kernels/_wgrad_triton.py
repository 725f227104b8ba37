"""Launcher of the Triton wgrad kernels (``_triton_kernels``): config choice, device guard, launch.

One call does no host synchronisation and measures nothing:

- the row-block list and its length come from :class:`~tfz.kernels.ActiveRows` (built with the mask);
- the config comes from, in order: :data:`pinned_config` (tests; always set under the interpreter),
  a config :func:`tfz.kernels.tune` measured for this device and key, then ``configs.TABLE``,
  resolved once per (device, dtype class, shape bucket, BLOCK_M) and cached;
- the GPU's SM count and shared memory per block come from ``torch.cuda.get_device_properties``.

The launch runs on the tensors' device (a device guard when it is not the current one) and on that
device's current stream (Triton launches on ``torch.cuda.current_stream()``).

fp32 operands use TF32 when ``torch.backends.cuda.matmul.allow_tf32`` is set; the dispatcher
(``wgrad.py``) sends fp32 without TF32 to torch (cuBLAS) unless the Triton backend is asked for by
name. Under ``TRITON_INTERPRET=1`` (CPU tests) :data:`INTERPRET_CONFIG` runs and bf16 operands are
upcast before ``tl.dot``.
"""

from __future__ import annotations

import functools
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from tfz._validate import env_flag

from . import configs
from ._triton_kernels import bias_kernel, wgrad_kernel
from .configs import FALLBACK_CONFIG, INTERPRET_CONFIG, WgradConfig
from .rows import ActiveRows

__all__ = [
    "INTERPRET",
    "DeviceInfo",
    "device_info",
    "launch_config",
    "pick_config",
    "pinned_config",
    "wgrad_triton",
]

# The @triton.jit decorators read TRITON_INTERPRET when _triton_kernels is imported.
INTERPRET = env_flag("TRITON_INTERPRET")
pinned_config: WgradConfig | None = INTERPRET_CONFIG if INTERPRET else None
"""When set, every launch uses this config (no table, no tuned entry; tests, reproducible timings)."""


@dataclass(frozen=True)
class DeviceInfo:
    """What the config choice needs to know about a device."""

    name: str
    capability: tuple[int, int]
    family: str
    """Table family ("sm90" or "sm80")."""
    sm_count: int
    shared_per_block: int
    """Bytes of shared memory one block may use (opt-in maximum)."""


_INTERPRETER = DeviceInfo("cpu (Triton interpreter)", (0, 0), "sm80", 4, 1 << 30)


@functools.cache
def device_info(device: torch.device) -> DeviceInfo:
    """Properties of a CUDA device (cached), or of the interpreter for CPU tensors."""
    if device.type != "cuda":
        return _INTERPRETER
    p = torch.cuda.get_device_properties(device)
    cap = (p.major, p.minor)
    smem = getattr(p, "shared_memory_per_block_optin", 0) or p.shared_memory_per_block
    return DeviceInfo(p.name, cap, configs.family(cap), p.multi_processor_count, int(smem))


# (device name, capability, dtype class, shape bucket, BLOCK_M) -> config measured by tune()
tuned: dict[tuple, WgradConfig] = {}
_picks: dict[tuple, WgradConfig] = {}


def tuned_key(info: DeviceInfo, dclass: str, in_features: int, block_m: int) -> tuple:
    return (info.name, info.capability, dclass, configs.shape_bucket(in_features), block_m)


def pick_config(
    info: DeviceInfo, dclass: str, in_features: int, block_m: int, element_size: int
) -> WgradConfig:
    """The config for one call (before split-K): tuned, else the table's; the fallback when the
    device's shared memory is too small for it."""
    key = tuned_key(info, dclass, in_features, block_m)
    found = _picks.get(key)
    if found is None:
        found = tuned.get(key) or configs.lookup(info.family, dclass, in_features, block_m)
        if found.shared_bytes(element_size) > info.shared_per_block:
            found = FALLBACK_CONFIG
        _picks[key] = found
    return found


def clear_picks() -> None:
    """Forget resolved picks (after ``tuned`` or the table changed)."""
    _picks.clear()


def launch_config(
    info: DeviceInfo,
    dtype: torch.dtype,
    out_dtype: torch.dtype,
    n_rows: int,
    in_features: int,
    tokens: int,
    count,
    deterministic: bool,
) -> WgradConfig:
    """The config of one launch (the whole decision, given ``count(block_m)`` = active row blocks):
    BLOCK_M from the mask, the tuned or table config for it, 64-row blocks when 128-row tiles would
    fill less than half of the SMs, then split-K (see ``configs.split_k_for``)."""
    dclass = configs.dtype_class(str(dtype).removeprefix("torch."))
    element = dtype.itemsize
    cfg = pick_config(
        info, dclass, in_features, configs.choose_block_m(n_rows, count(128), count(64)), element
    )
    if cfg.block_m == 128 and configs.underfilled(
        count(128) * _cdiv(in_features, cfg.block_n), info.sm_count
    ):
        cfg = pick_config(info, dclass, in_features, 64, element)  # twice the tiles
    split = configs.split_k_for(
        cfg,
        tiles=count(cfg.block_m) * _cdiv(in_features, cfg.block_n),
        tokens=tokens,
        sm_count=info.sm_count,
        fp32_out=out_dtype == torch.float32,
        deterministic=deterministic,
    )
    return cfg if split == cfg.split_k else cfg.with_split(split)


def _guard(device: torch.device):
    """Make ``device`` current for a launch when it is not (Triton launches on the current device)."""
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return nullcontext()
    return torch.cuda.device(device.index)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # triton.cdiv is a JIT function: slow to call from Python


def _zero_rows(t: torch.Tensor, rows: ActiveRows | None) -> None:
    if rows is None:
        t.zero_()
    else:
        t.index_fill_(0, rows.index, 0)


def wgrad_triton(
    x: torch.Tensor,
    dy: torch.Tensor,
    dw: torch.Tensor,
    rows: ActiveRows | None,
    accumulate: bool,
    db: torch.Tensor | None,
    bias_accumulate: bool,
    *,
    config: WgradConfig | None = None,
) -> WgradConfig | None:
    """Launch: ``dw[r] (+)= dy[:, r]ᵀ x``, ``db[r] (+)= sum_t dy[t, r]`` for active rows r.

    Shapes: x [T, N], dy [T, M] (same dtype), dw [M, N] contiguous (fp32, fp16 or bf16), db [M] fp32 or
    None, rows on dw's device or None (all rows). ``config`` overrides the choice (see the module
    docstring). Returns the config launched (None when no row is active).
    """
    if x.device.type != "cuda" and not INTERPRET:
        raise RuntimeError(
            f"the Triton wgrad kernel was compiled for GPUs (TRITON_INTERPRET was not set when "
            f"tfz.kernels._wgrad_triton was imported) and cannot take {x.device} tensors"
        )
    t, n = x.shape
    m = dy.shape[1]
    info = device_info(dw.device)
    deterministic = torch.are_deterministic_algorithms_enabled()

    def count(block_m: int) -> int:
        return _cdiv(m, block_m) if rows is None else rows.n_blocks(block_m)

    cfg = config or pinned_config
    if cfg is None:
        cfg = launch_config(info, dy.dtype, dw.dtype, m, n, t, count, deterministic)
    elif cfg.split_k > 1 and (deterministic or dw.dtype != torch.float32):
        cfg = cfg.with_split(1)  # atomics only into fp32, never in deterministic mode
    n_rb = count(cfg.block_m)
    if n_rb == 0:
        return None
    row_blocks = rows.blocks(cfg.block_m) if rows is not None else _all_blocks(n_rb, dw.device)
    mask = rows.mask_bytes if rows is not None else row_blocks
    with _guard(dw.device):
        if cfg.split_k > 1 and not accumulate:  # atomics add: overwrite = zero the rows first
            _zero_rows(dw, rows)
        grid = (n_rb * _cdiv(n, cfg.block_n) * cfg.split_k,)
        wgrad_kernel[grid](
            dy,
            x,
            dw,
            mask,
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
            BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k,
            GROUP_M=cfg.group_m,
            SPLIT_K=cfg.split_k,
            HAS_MASK=rows is not None,
            ACCUMULATE=accumulate,
            UPCAST=INTERPRET and dy.dtype == torch.bfloat16,
            INPUT_PRECISION="tf32" if _tf32(dy) else "ieee",
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
        if db is not None:
            _bias(dy, db, rows, bias_accumulate, info, deterministic, config or pinned_config)
    return cfg


def _tf32(dy: torch.Tensor) -> bool:
    return (
        dy.dtype == torch.float32 and dy.is_cuda and not INTERPRET and torch.backends.cuda.matmul.allow_tf32
    )


@functools.cache
def _all_blocks(n_blocks: int, device: torch.device) -> torch.Tensor:
    """int32 [0, n_blocks): the row-block list of an all-active call (built once per size)."""
    return torch.arange(n_blocks, dtype=torch.int32, device=device)


def _bias(dy, db, rows, accumulate, info, deterministic, pinned) -> None:
    cfg = configs.BIAS_CONFIG
    t, m = dy.shape
    n_rb = -(-m // cfg.block_m) if rows is None else rows.n_blocks(cfg.block_m)
    if pinned is not None:
        split = pinned.split_k
    else:
        split = configs.SPLIT_K if configs.underfilled(n_rb, info.sm_count) else 1
    if deterministic or t < split * 4 * cfg.block_k:
        split = 1
    if split > 1 and not accumulate:
        _zero_rows(db, rows)
    row_blocks = rows.blocks(cfg.block_m) if rows is not None else _all_blocks(n_rb, db.device)
    bias_kernel[(n_rb, split)](
        dy,
        db,
        rows.mask_bytes if rows is not None else row_blocks,
        row_blocks,
        t,
        m,
        dy.stride(0),
        dy.stride(1),
        BLOCK_M=cfg.block_m,
        BLOCK_T=cfg.block_k,
        SPLIT_T=split,
        HAS_MASK=rows is not None,
        ACCUMULATE=accumulate,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
