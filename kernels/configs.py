"""Launch configurations of the Triton wgrad kernel: one table, no tuning inside training steps.

The config of a call comes from :data:`TABLE`, keyed by GPU family ("sm90": H100/H200, "sm80": A100
and every other GPU), operand class ("16bit": bf16/fp16, "tf32": fp32 with TF32 on) and a shape bucket
of the layer (in_features, tokens). The key never holds the number of active rows, so changing masks
never changes the kernel that runs. Each entry gives one config per BLOCK_M (128, or 64 where
128-row blocks would compute >10% more rows than 64-row blocks; :func:`choose_block_m`). A config
whose shared memory (:meth:`WgradConfig.shared_bytes`) exceeds what the device allows per block
(``torch.cuda.get_device_properties(...).shared_memory_per_block_optin``) is replaced by
:data:`FALLBACK_CONFIG`.

Split-K (token range split over :data:`SPLIT_K` programs adding with fp32 atomics) is used only when
the active tiles fill less than half of the GPU's SMs, dW is fp32 and deterministic algorithms are off
(:func:`split_k_for`). ``tfz.kernels.tune`` can replace table entries for the shapes of a model at
start-up (measured once, cacheable); nothing is ever measured inside a training step.

This module imports neither torch nor triton (the ahead-of-time compile check reads it on its own).
Every config the table can pick is compiled ahead of time for sm_80 and sm_90 by
``tests/test_wgrad_aot.py`` (zero spill bytes asserted); registers, spills and shared memory per
config are in bench/RESULTS.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = [
    "BIAS_CONFIG",
    "BLOCK_M_CHOICES",
    "FALLBACK_CONFIG",
    "INTERPRET_CONFIG",
    "SPLIT_K",
    "TABLE",
    "WgradConfig",
    "choose_block_m",
    "dtype_class",
    "family",
    "shape_bucket",
    "split_k_for",
    "table_configs",
    "underfilled",
]


@dataclass(frozen=True)
class WgradConfig:
    """One launch configuration of the wgrad kernel (tile shape and scheduling)."""

    block_m: int = 64
    """Rows of dW per tile (also the granularity of skipped row blocks): 64 or 128 on GPUs."""
    block_n: int = 64
    """Columns of dW per tile."""
    block_k: int = 64
    """Tokens per K step."""
    group_m: int = 8
    """Active row blocks that sweep the columns together (L2 reuse of X tiles)."""
    split_k: int = 1
    """Programs sharing one tile's token range (> 1 adds with fp32 atomics: not deterministic)."""
    num_warps: int = 4
    """Warps per program."""
    num_stages: int = 3
    """Software pipeline depth of the token loop (shared-memory buffers per operand)."""

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k", "group_m", "split_k", "num_warps", "num_stages"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"WgradConfig.{name} must be an integer >= 1, got {v!r}")
        for name in ("block_m", "block_n", "block_k", "num_warps"):
            v = getattr(self, name)
            if v & (v - 1):
                raise ValueError(f"WgradConfig.{name} must be a power of two, got {v}")

    def shared_bytes(self, element_size: int) -> int:
        """Shared memory of the operand buffers: num_stages x (dYᵀ tile + X tile) x element size."""
        return self.num_stages * (self.block_m + self.block_n) * self.block_k * element_size

    def with_split(self, split_k: int) -> WgradConfig:
        return WgradConfig(**{**asdict(self), "split_k": split_k})

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


BLOCK_M_CHOICES = (128, 64)
SPLIT_K = 4
"""Programs per tile when split-K applies (see :func:`split_k_for`)."""

FALLBACK_CONFIG = WgradConfig(block_m=64, block_n=64, block_k=32, num_warps=4, num_stages=2)
"""Fits every CUDA GPU Triton supports (16 KB of shared memory for fp32): used when a table
config needs more shared memory than the device has."""
INTERPRET_CONFIG = WgradConfig(block_m=64, block_n=64, block_k=64)
"""The config under ``TRITON_INTERPRET=1`` (CPU tests)."""
BIAS_CONFIG = WgradConfig(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=3)
"""The bias kernel's launch: 64-row blocks, ``block_k`` tokens per step (``block_n`` unused)."""


def _c(bm, bn, bk, warps, stages) -> WgradConfig:
    return WgradConfig(block_m=bm, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages)


# (family, dtype class, shape bucket) -> {BLOCK_M: config}. Picked among the configs that compile to
# zero spills with tensor-core MMA (wgmma on sm_90) ahead of time; GPU timings replace guesses via
# tfz.kernels.tune. 64-row configs use one warpgroup (4 warps), 128-row ones two.
_SM90_16 = {128: _c(128, 256, 64, 8, 3), 64: _c(64, 256, 64, 8, 3)}
_SM90_16_NARROW = {128: _c(128, 128, 64, 8, 4), 64: _c(64, 128, 64, 4, 4)}
_SM90_TF32 = {128: _c(128, 128, 32, 8, 4), 64: _c(64, 128, 32, 4, 4)}
_SM80_16 = {128: _c(128, 256, 32, 8, 3), 64: _c(64, 256, 32, 8, 3)}
_SM80_16_NARROW = {128: _c(128, 128, 32, 4, 4), 64: _c(64, 128, 32, 4, 4)}
_SM80_TF32 = {128: _c(128, 128, 32, 8, 3), 64: _c(64, 128, 32, 4, 3)}

TABLE: dict[tuple[str, str, str], dict[int, WgradConfig]] = {
    ("sm90", "16bit", "wide"): _SM90_16,
    ("sm90", "16bit", "narrow"): _SM90_16_NARROW,
    ("sm90", "tf32", "wide"): _SM90_TF32,
    ("sm90", "tf32", "narrow"): _SM90_TF32,
    ("sm80", "16bit", "wide"): _SM80_16,
    ("sm80", "16bit", "narrow"): _SM80_16_NARROW,
    ("sm80", "tf32", "wide"): _SM80_TF32,
    ("sm80", "tf32", "narrow"): _SM80_TF32,
}

WIDE_MIN_IN_FEATURES = 2048
"""in_features from which a layer is "wide": enough column tiles for 256-wide tiles."""


def family(capability: tuple[int, int]) -> str:
    """Table family of a CUDA compute capability: "sm90" for (9, 0), else "sm80"."""
    return "sm90" if tuple(capability) == (9, 0) else "sm80"


def dtype_class(dtype_name: str) -> str:
    """ "16bit" for bfloat16/float16 operands, "tf32" for float32 (the kernel runs fp32 only with TF32)."""
    if dtype_name in ("bfloat16", "float16"):
        return "16bit"
    if dtype_name == "float32":
        return "tf32"
    raise ValueError(f"the Triton wgrad kernel takes bfloat16, float16 or float32 operands, got {dtype_name}")


def shape_bucket(in_features: int) -> str:
    """Shape bucket of a layer: "wide" from WIDE_MIN_IN_FEATURES in_features on, else "narrow"."""
    return "wide" if in_features >= WIDE_MIN_IN_FEATURES else "narrow"


def choose_block_m(n_rows: int, n_blocks_128: int, n_blocks_64: int) -> int:
    """BLOCK_M for a mask with the given active block counts: 128 unless 128-row blocks compute more
    than 10% more rows than 64-row blocks (random 64-row units make 64 the usual choice when frozen)."""
    if n_rows <= 64:
        return 64
    return 128 if 128 * n_blocks_128 <= 1.1 * 64 * n_blocks_64 else 64


def underfilled(tiles: int, sm_count: int) -> bool:
    """The tiles of a launch fill less than half of the GPU's SMs."""
    return 2 * tiles <= sm_count


def split_k_for(
    config: WgradConfig, *, tiles: int, tokens: int, sm_count: int, fp32_out: bool, deterministic: bool
) -> int:
    """SPLIT_K for one launch of a 64-row config: :data:`SPLIT_K` when the tiles fill less than half
    of the SMs, every split keeps at least 4 token steps, dW is fp32 and ``deterministic`` is False;
    else 1. (An under-filled launch first switches to 64-row blocks, which doubles its tiles; 128-row
    tiles adding with per-element atomics spill registers on sm_80.)"""
    if deterministic or not fp32_out or config.block_m != 64 or not underfilled(tiles, sm_count):
        return 1
    return SPLIT_K if tokens >= SPLIT_K * 4 * config.block_k else 1


def lookup(fam: str, dclass: str, in_features: int, block_m: int) -> WgradConfig:
    """The table's config (before the shared-memory check) for one call."""
    return TABLE[(fam, dclass, shape_bucket(in_features))][block_m]


def table_configs(fam: str, dclass: str) -> list[WgradConfig]:
    """Every config a launch can use for (family, dtype class): table entries, the split-K twins of
    the 64-row ones, and the fallback (with its twin); what the ahead-of-time check compiles."""
    out: list[WgradConfig] = []
    for (f, d, _), by_block in TABLE.items():
        if (f, d) != (fam, dclass):
            continue
        for cfg in by_block.values():
            for c in (cfg, cfg.with_split(SPLIT_K)) if cfg.block_m == 64 else (cfg,):
                if c not in out:
                    out.append(c)
    for c in (FALLBACK_CONFIG, FALLBACK_CONFIG.with_split(SPLIT_K)):
        if c not in out:
            out.append(c)
    return out
