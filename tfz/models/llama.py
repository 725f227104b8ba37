"""A LLaMA-style decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU) cut into pipeline stages.

Shape legend: B batch, L sequence, D model dim, H heads, K kv heads, E head dim, V vocab.
Every linear layer is a plain ``nn.Linear``; ``tfz.nn.convert_to_freezable`` swaps them for
FreezableLinear.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PRESETS", "LlamaConfig", "LlamaStage", "build_stages", "split_layers"]


@dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """Model shape. Presets: ``PRESETS["tiny" | "llama-1b" | "llama-8b"]``."""

    vocab_size: int = 256
    """Byte-level by default."""
    dim: int = 256
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int = 8
    """Grouped-query attention when smaller than ``n_heads``."""
    ffn_dim: int = 768
    """SwiGLU hidden size."""
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self):
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def with_(self, **changes) -> LlamaConfig:
        return replace(self, **changes)


PRESETS = {
    "tiny": LlamaConfig(),
    # layer shapes of Llama-3.2-1B and Llama-3.1-8B
    "llama-1b": LlamaConfig(
        vocab_size=128256,
        dim=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        ffn_dim=8192,
        max_seq_len=8192,
        rope_theta=500000.0,
    ),
    "llama-8b": LlamaConfig(
        vocab_size=128256,
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        ffn_dim=14336,
        max_seq_len=8192,
        rope_theta=500000.0,
    ),
}


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Norms and rotary embeddings run in at least fp32."""
    return torch.promote_types(x.dtype, torch.float32)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        x = x_BLD.to(_compute_dtype(x_BLD))
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x.type_as(x_BLD) * self.weight


def _rope_tables(cfg: LlamaConfig) -> tuple[torch.Tensor, torch.Tensor]:
    half = cfg.head_dim // 2
    freqs = cfg.rope_theta ** (-torch.arange(half, dtype=torch.float64) / half)
    angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float64), freqs)
    return angles.cos(), angles.sin()  # float64; Module.to(dtype) casts them with the weights


def _apply_rope(x_BLHE: torch.Tensor, cos_LE: torch.Tensor, sin_LE: torch.Tensor) -> torch.Tensor:
    dtype = _compute_dtype(x_BLHE)
    x1, x2 = x_BLHE.to(dtype).chunk(2, dim=-1)
    cos, sin = cos_LE[:, None, :].to(dtype), sin_LE[:, None, :].to(dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x_BLHE)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x_BLD, cos, sin):
        B, L, _ = x_BLD.shape
        q = _apply_rope(self.wq(x_BLD).view(B, L, self.n_heads, self.head_dim), cos, sin)
        k = _apply_rope(self.wk(x_BLD).view(B, L, self.n_kv, self.head_dim), cos, sin)
        v = self.wv(x_BLD).view(B, L, self.n_kv, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if self.n_kv != self.n_heads:
            rep = self.n_heads // self.n_kv
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(B, L, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x_BLD):
        return self.w2(F.silu(self.w1(x_BLD)) * self.w3(x_BLD))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x_BLD, cos, sin):
        h = x_BLD + self.attention(self.attention_norm(x_BLD), cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))


class LlamaStage(nn.Module):
    """Layers ``layer_ids`` of the decoder; the first stage embeds tokens, the last one projects to logits.

    Input: token ids [B, L] (first stage) or hidden states [B, L, D]. Output: hidden states [B, L, D] or
    logits [B, L, V] (last stage).
    """

    def __init__(self, cfg: LlamaConfig, layer_ids: list[int], *, first: bool, last: bool):
        super().__init__()
        self.cfg, self.first, self.last = cfg, first, last
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim) if first else None
        self.layers = nn.ModuleDict({str(i): Block(cfg) for i in layer_ids})
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps) if last else None
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False) if last else None
        cos, sin = _rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x):
        h = self.tok_embeddings(x) if self.first else x
        L = h.shape[1]
        if L > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {L} exceeds max_seq_len {self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[:L], self.rope_sin[:L]
        for layer in self.layers.values():
            h = layer(h, cos, sin)
        if self.last:
            h = self.output(self.norm(h))
        return h


def split_layers(n_layers: int, num_stages: int) -> list[list[int]]:
    """Contiguous, near-equal layer ranges per stage (earlier stages get the remainder)."""
    if num_stages < 1 or num_stages > n_layers:
        raise ValueError(f"cannot split {n_layers} layers into {num_stages} stages")
    base, extra = divmod(n_layers, num_stages)
    out, start = [], 0
    for s in range(num_stages):
        size = base + (1 if s < extra else 0)
        out.append(list(range(start, start + size)))
        start += size
    return out


def _init_weights(stage: LlamaStage, cfg: LlamaConfig, seed: int) -> None:
    """Normal(0, 0.02) matrices (residual projections scaled by 1/sqrt(2 n_layers)); one generator per
    layer, so a layer's weights do not depend on how the model is split into stages."""
    parts = {"tok_embeddings": stage.tok_embeddings, "output": stage.output}
    parts.update({f"layers.{i}": layer for i, layer in stage.layers.items()})
    for key, module in parts.items():
        if module is None:
            continue
        slot = {"tok_embeddings": 0, "output": cfg.n_layers + 1}.get(key)
        slot = int(key.split(".")[1]) + 1 if slot is None else slot
        gen = torch.Generator().manual_seed(seed * 1_000_003 + slot)
        for name, p in module.named_parameters():
            if p.dim() < 2:
                continue
            scale = 0.02 / math.sqrt(2 * cfg.n_layers) if name.endswith(("wo.weight", "w2.weight")) else 0.02
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


def build_stages(
    cfg: LlamaConfig,
    num_stages: int,
    *,
    stage_ids: list[int] | None = None,
    layers: list[list[int]] | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[int, LlamaStage]:
    """Build stages ``stage_ids`` (default: all) of a ``num_stages``-stage split.

    Weights depend only on (seed, layer), so every rank builds identical copies of the stages it holds
    without building the whole model, and any split gives the same model.
    """
    layers = layers or split_layers(cfg.n_layers, num_stages)
    if len(layers) != num_stages:
        raise ValueError(f"layers lists {len(layers)} stages, expected {num_stages}")
    ids = list(range(num_stages)) if stage_ids is None else list(stage_ids)
    out = {}
    for s in ids:
        if not 0 <= s < num_stages:
            raise ValueError(f"stage {s} not in [0, {num_stages})")
        stage = LlamaStage(cfg, layers[s], first=s == 0, last=s == num_stages - 1)
        _init_weights(stage, cfg, seed)
        out[s] = stage.to(device=device, dtype=dtype)
    return out
