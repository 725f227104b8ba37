"""LLaMA-style stages: any split computes the same model; pieces checked against plain references."""

import math

import pytest
import torch
import torch.nn.functional as F

from tfz.models import PRESETS, LlamaConfig, build_stages, split_layers


def _run(stages, x):
    for s in sorted(stages):
        x = stages[s](x)
    return x


def test_split_layers():
    assert split_layers(8, 3) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert sum(map(len, split_layers(13, 5))) == 13
    with pytest.raises(ValueError, match="cannot split 2 layers into 3 stages"):
        split_layers(2, 3)


def test_any_split_gives_the_same_model():
    cfg = LlamaConfig(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=32)
    x = torch.randint(0, cfg.vocab_size, (2, 17))
    ref = _run(build_stages(cfg, 1, seed=3), x)
    for n in (2, 4):
        torch.testing.assert_close(_run(build_stages(cfg, n, seed=3), x), ref, rtol=0, atol=0)
    assert ref.shape == (2, 17, cfg.vocab_size)
    assert not torch.equal(_run(build_stages(cfg, 1, seed=4), x), ref)


def _reference_forward(stage, tokens, cfg):
    """Float64 re-derivation: RMSNorm, RoPE (rotate-half form), causal softmax attention with repeated
    kv heads, SwiGLU. Independent of the module code paths (no SDPA)."""
    sd = {k: v.double() for k, v in stage.state_dict().items()}
    h = sd["tok_embeddings.weight"][tokens]
    B, L, D = h.shape
    E, H, K = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    half = E // 2
    freqs = cfg.rope_theta ** (-torch.arange(half, dtype=torch.float64) / half)
    ang = torch.outer(torch.arange(L, dtype=torch.float64), freqs)
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]

    def norm(x, w):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * w

    def rope(x):
        a, b = x[..., :half], x[..., half:]
        return torch.cat((a * cos - b * sin, a * sin + b * cos), -1)

    mask = torch.full((L, L), -math.inf, dtype=torch.float64).triu(1)
    for i in stage.layers:
        p = f"layers.{i}."
        x = norm(h, sd[p + "attention_norm.weight"])
        q = rope((x @ sd[p + "attention.wq.weight"].T).view(B, L, H, E)).transpose(1, 2)
        k = rope((x @ sd[p + "attention.wk.weight"].T).view(B, L, K, E)).transpose(1, 2)
        v = (x @ sd[p + "attention.wv.weight"].T).view(B, L, K, E).transpose(1, 2)
        k, v = k.repeat_interleave(H // K, 1), v.repeat_interleave(H // K, 1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(E) + mask, -1) @ v
        h = h + att.transpose(1, 2).reshape(B, L, D) @ sd[p + "attention.wo.weight"].T
        x = norm(h, sd[p + "ffn_norm.weight"])
        ff = F.silu(x @ sd[p + "feed_forward.w1.weight"].T) * (x @ sd[p + "feed_forward.w3.weight"].T)
        h = h + ff @ sd[p + "feed_forward.w2.weight"].T
    return norm(h, sd["norm.weight"]) @ sd["output.weight"].T


def test_forward_matches_float64_reference():
    cfg = LlamaConfig(dim=48, n_layers=2, n_heads=6, n_kv_heads=3, ffn_dim=80, max_seq_len=16)
    stage = build_stages(cfg, 1, seed=1, dtype=torch.float64)[0]
    tokens = torch.randint(0, cfg.vocab_size, (3, 11))
    torch.testing.assert_close(stage(tokens), _reference_forward(stage, tokens, cfg), rtol=1e-10, atol=1e-10)


def test_config_validation_and_presets():
    with pytest.raises(ValueError, match="dim 10 is not divisible by n_heads 3"):
        LlamaConfig(dim=10, n_heads=3, n_kv_heads=3)
    with pytest.raises(ValueError, match="n_layers must be >= 1"):
        LlamaConfig(n_layers=0)
    assert PRESETS["llama-8b"].ffn_dim == 14336 and PRESETS["llama-1b"].dim == 2048
    stage = build_stages(
        LlamaConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=32, max_seq_len=4), 1
    )[0]
    with pytest.raises(ValueError, match="sequence length 5 exceeds max_seq_len 4"):
        stage(torch.zeros(1, 5, dtype=torch.long))
