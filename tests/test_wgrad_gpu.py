"""Compiled Triton wgrad kernel on a CUDA GPU (skipped without one): odd shapes against the float64
reference, the autotuned public path, split-K, determinism, streams, and a LLaMA-8B shape against
torch's own fp32 GEMM. Run with ``python -m pytest -m gpu tests/test_wgrad_gpu.py``.
"""

import pytest
import torch
from test_wgrad import DTYPES, MODES, check_case, make_mask
from tfz.kernels import has_triton, resolve_backend, wgrad, wgrad_gemm_accum_fp32

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not has_triton(), reason="needs triton"),
]

# tokens / out / in: none is a multiple of any tile size
T, OUT, IN = 1000, 1000, 777


@pytest.fixture
def triton_mod():
    from tfz.kernels import _wgrad_triton

    return _wgrad_triton


@pytest.fixture
def pinned(monkeypatch, triton_mod):
    """One fixed configuration: a handful of compiles instead of an autotuning sweep per case."""
    cfg = triton_mod.WgradConfig(block_m=128, block_n=128, block_k=64, group_m=8, num_warps=8, num_stages=3)
    monkeypatch.setattr(triton_mod, "pinned_config", cfg)
    return cfg


def test_auto_backend_is_triton_on_cuda(monkeypatch):
    monkeypatch.delenv("TFZ_DISABLE_TRITON", raising=False)
    assert resolve_backend("auto", "cuda") == "triton"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("mask_kind", ["random", "none", "blocks", "all_frozen"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pinned_config_matches_reference(dtype, mask_kind, mode, pinned):
    check_case("triton", (T,), OUT, IN, dtype, mask_kind, mode, device="cuda", seed=5)


def test_split_k_matches_reference(monkeypatch, triton_mod):
    cfg = triton_mod.WgradConfig(block_m=64, block_n=128, block_k=64, split_k=4, num_warps=4, num_stages=3)
    monkeypatch.setattr(triton_mod, "pinned_config", cfg)
    for mode in MODES:
        check_case("triton", (T,), OUT, IN, torch.bfloat16, "random", mode, device="cuda", seed=6)


@pytest.mark.parametrize(
    "lead, dtype, mask_kind, mode",
    [
        ((T,), torch.bfloat16, "random", "accumulate"),
        ((4, 250), torch.float32, "none", "accumulate"),
        ((T,), torch.bfloat16, "blocks", "fresh"),
    ],
    ids=str,
)
def test_autotuned_matches_reference(lead, dtype, mask_kind, mode):
    check_case("triton", lead, OUT, IN, dtype, mask_kind, mode, device="cuda", seed=8)


@pytest.mark.parametrize("mask_kind", ["random", "blocks"])
def test_torch_backend_on_cuda(mask_kind):
    for mode in MODES:
        check_case("torch", (T,), OUT, IN, torch.bfloat16, mask_kind, mode, device="cuda", seed=9)


def test_deterministic_mode_is_bitwise_reproducible(triton_mod):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4096, 512, device="cuda", generator=g, dtype=torch.bfloat16)
    dy = torch.randn(4096, 384, device="cuda", generator=g, dtype=torch.bfloat16)
    mask = (torch.rand(3, device="cuda", generator=g) < 0.7).repeat_interleave(128)
    mask[0] = True
    start = torch.randn(384, 512, device="cuda", generator=g)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        outs = []
        for _ in range(2):
            mg = start.clone()
            wgrad_gemm_accum_fp32(x, dy, mg, active_rows=mask, backend="triton")
            outs.append(mg)
        assert triton_mod._autotuned().best_config.kwargs["SPLIT_K"] == 1
    finally:
        torch.use_deterministic_algorithms(was)
    assert torch.equal(outs[0].view(torch.int32), outs[1].view(torch.int32))


def test_runs_on_the_current_stream():
    x = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(512, 192, device="cuda", dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        dw = wgrad(x, dy, backend="triton")
        want = dy.float().t() @ x.float()
    side.synchronize()
    torch.testing.assert_close(dw, want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("n_in, n_out", [(4096, 14336), (14336, 4096)], ids=str)
def test_llama_shape_against_torch_fp32(n_in, n_out):
    """bf16 LLaMA-8B MLP shape, 4096 tokens, 50% of 128-row blocks active, accumulate into main_grad."""
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(4096, n_in, device="cuda", generator=g).bfloat16()
    dy = torch.randn(4096, n_out, device="cuda", generator=g).bfloat16()
    mask = make_mask("random", n_out // 128, 3).repeat_interleave(128).cuda()
    mg = torch.randn(n_out, n_in, device="cuda", generator=g)
    before = mg.clone()
    wgrad_gemm_accum_fp32(x, dy, mg, active_rows=mask, backend="triton")
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        torch_res = before + dy.float().t() @ x.float()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    ref = before.double() + dy.double().t() @ x.double()
    act = mask
    err = (mg[act].double() - ref[act]).abs().max().item()
    torch_err = (torch_res[act].double() - ref[act]).abs().max().item()
    scale = ref[act].abs().max().item()
    assert err <= 2 * torch_err + 1e-6 * scale, (err, torch_err)
    assert torch.equal(mg[~act].view(torch.int32), before[~act].view(torch.int32))
