"""Compiled Triton wgrad kernel on a CUDA GPU (skipped without one): the table's configs on odd shapes
against the float64 reference, 16-bit destinations, split-K and determinism, streams, devices, no
synchronisation in a masked backward (torch's sync debug mode), start-up tuning, and a LLaMA-8B shape
against torch's own fp32 GEMM. Only configs the table picks are compiled.

Run with ``python -m pytest -m gpu tests/test_wgrad_gpu.py``.
"""

from contextlib import contextmanager

import numpy as np
import pytest
import torch
from test_wgrad import MODES, check_case, launch_thrice, make_mask
from tfz.kernels import ActiveRows, has_triton, resolve_backend, tune, wgrad, wgrad_gemm_accum_fp32

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not has_triton(), reason="needs triton"),
]

# tokens / out / in: none is a multiple of any tile size
T, OUT, IN = 1000, 1000, 777


@pytest.fixture
def launcher():
    from tfz.kernels import _wgrad_triton

    return _wgrad_triton


@contextmanager
def tf32(on: bool):
    matmul = torch.backends.cuda.matmul
    was = matmul.allow_tf32
    matmul.allow_tf32 = on
    try:
        yield
    finally:
        matmul.allow_tf32 = was


def units(n_out: int, ratio: float, seed: int = 0) -> np.ndarray:
    """Random 64-row units frozen at ``ratio``, as tfz.masks draws them."""
    from tfz.masks import LayerSpec, StageUnits, select

    stage = StageUnits((LayerSpec("w", n_out, 64),), block_rows=64)
    return select(stage, ratio, stage=1, microbatch=0, step=seed).active_rows["w"]


def test_smoke_auto_backend_and_one_call():
    """Quick first check (bench/gpu_check.sh runs it before the benchmarks)."""
    with tf32(False):
        assert resolve_backend("auto", "cuda", torch.bfloat16) == "triton"
        assert resolve_backend("auto", "cuda", torch.float32) == "torch"
    check_case("triton", (T,), OUT, IN, torch.bfloat16, "blocks", "accumulate", device="cuda", prepared=True)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("mask_kind", ["random", "none", "blocks", "all_frozen"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_table_configs_match_reference(dtype, mask_kind, mode):
    with tf32(True):  # fp32 runs the kernel in TF32 (without TF32, auto sends fp32 to cuBLAS)
        check_case(
            "triton",
            (T,),
            OUT,
            IN,
            dtype,
            mask_kind,
            mode,
            device="cuda",
            seed=5,
            tf32=dtype == torch.float32,
        )


@pytest.mark.parametrize("mode", ["accumulate", "overwrite"])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16bit_destination(out_dtype, mode):
    check_case("triton", (T,), OUT, IN, torch.bfloat16, "blocks", mode, device="cuda", out_dtype=out_dtype)


def test_split_k_matches_reference_and_is_off_in_deterministic_mode(launcher):
    """A small layer at 75% frozen fills few SMs: the table's 64-row config splits the tokens 4 ways
    (atomics); in deterministic mode it does not, and two runs agree bit for bit."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(8192, 512, device="cuda", generator=g, dtype=torch.bfloat16)
    dy = torch.randn(8192, 1024, device="cuda", generator=g, dtype=torch.bfloat16)
    rows = ActiveRows(units(1024, 0.75), "cuda")
    start = torch.randn(1024, 512, device="cuda", generator=g)
    ref = start.double() + torch.where(
        rows.mask[:, None], dy.double().t() @ x.double(), torch.zeros((), device="cuda", dtype=torch.float64)
    )
    splits, results = launch_thrice(launcher.wgrad_triton, x, dy, rows, start)
    assert splits[0] > 1 and splits[1:] == [1, 1]
    for dw in results:
        torch.testing.assert_close(dw.double(), ref, rtol=1e-4, atol=1e-3)
    assert torch.equal(results[1].view(torch.int32), results[2].view(torch.int32))


@pytest.mark.parametrize("mask_kind", ["random", "blocks"])
def test_fp32_without_tf32_runs_on_cublas(mask_kind):
    with tf32(False):
        assert resolve_backend("auto", "cuda", torch.float32) == "torch"
        for mode in MODES:
            check_case("auto", (T,), OUT, IN, torch.float32, mask_kind, mode, device="cuda", seed=9)


def test_runs_on_the_current_stream():
    """The side stream first sleeps, then writes X; a kernel launched on any other stream would read
    X before that write and return dYᵀ·0."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x_new = torch.randn(512, 256, device="cuda", generator=g, dtype=torch.bfloat16)
    dy = torch.randn(512, 192, device="cuda", generator=g, dtype=torch.bfloat16)
    rows = ActiveRows(units(192, 0.5), "cuda")
    x = torch.zeros_like(x_new)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # on the order of 50-100 ms of spinning
        x.copy_(x_new)
        dw = wgrad(x, dy, active_rows=rows, backend="triton")
    torch.cuda.synchronize()
    want = torch.where(rows.mask[:, None], dy.float().t() @ x_new.float(), torch.zeros((), device="cuda"))
    torch.testing.assert_close(dw, want, rtol=1e-4, atol=1e-3)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_launches_on_the_tensors_device():
    g = torch.Generator(device="cuda:1").manual_seed(0)
    x = torch.randn(300, 200, device="cuda:1", generator=g, dtype=torch.bfloat16)
    dy = torch.randn(300, 150, device="cuda:1", generator=g, dtype=torch.bfloat16)
    with torch.cuda.device(0):
        dw = wgrad(x, dy, active_rows=ActiveRows(make_mask("blocks", 150, 1).numpy(), "cuda:1"))
    want = dy.float().t() @ x.float()
    mask = make_mask("blocks", 150, 1).to("cuda:1")
    torch.testing.assert_close(dw[mask], want[mask], rtol=1e-4, atol=1e-3)


def test_masked_backward_does_not_synchronise():
    """torch's sync debug mode raises on any synchronising CUDA call inside the masked backwards."""
    from tfz.nn import FreezableLinear, prepare_row_masks, use_row_masks

    torch.manual_seed(0)
    layers = torch.nn.Sequential(FreezableLinear(256, 512), torch.nn.GELU(), FreezableLinear(512, 384)).cuda()
    masks = prepare_row_masks({layers[0]: units(512, 0.5), layers[2]: units(384, 0.75, 1)}, device="cuda")
    x = torch.randn(64, 256, device="cuda")
    layers(x).sum().backward()  # compile and allocate outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for in_place in (False, True):
            with use_row_masks(masks, in_place=in_place):
                layers(x).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_tune_measures_and_later_calls_use_it(launcher, tmp_path):
    found = tune([(1024, 1024, 1024)], dtype=torch.bfloat16, cache=tmp_path / "tune.json")
    assert sorted(key[4] for key in found) == [64, 128]
    assert (tmp_path / "tune.json").exists()
    info = launcher.device_info(torch.device("cuda", torch.cuda.current_device()))
    key = launcher.tuned_key(info, "16bit", 1024, 128)
    assert launcher.pick_config(info, "16bit", 1024, 128, 2) == found[key]
    launcher.tuned.clear()
    launcher.clear_picks()


@pytest.mark.parametrize("n_in, n_out", [(4096, 14336), (14336, 4096)], ids=str)
def test_llama_shape_against_torch_fp32(n_in, n_out):
    """bf16 LLaMA-8B MLP shape, 4096 tokens, half the 64-row units frozen, accumulate into main_grad."""
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(4096, n_in, device="cuda", generator=g).bfloat16()
    dy = torch.randn(4096, n_out, device="cuda", generator=g).bfloat16()
    rows = ActiveRows(units(n_out, 0.5), "cuda")
    mg = torch.randn(n_out, n_in, device="cuda", generator=g)
    before = mg.clone()
    wgrad_gemm_accum_fp32(x, dy, mg, active_rows=rows, backend="triton")
    with tf32(False):
        torch_res = before + dy.float().t() @ x.float()
    ref = before.double() + dy.double().t() @ x.double()
    act = rows.mask
    err = (mg[act].double() - ref[act]).abs().max().item()
    torch_err = (torch_res[act].double() - ref[act]).abs().max().item()
    scale = ref[act].abs().max().item()
    assert err <= 2 * torch_err + 1e-6 * scale, (err, torch_err)
    assert torch.equal(mg[~act].view(torch.int32), before[~act].view(torch.int32))
