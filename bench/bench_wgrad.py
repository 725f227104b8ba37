"""Benchmarks of the masked weight gradient (tfz.kernels.wgrad); results in bench/RESULTS.md.

- CPU, torch backend: 2048 tokens, 4096 -> 4096, fp32, accumulate into main_grad, freeze ratio r in
  {0, 0.25, 0.5, 0.75, 0.9} of 128-row blocks. Goal: time(r) / time(0) <= (1 - r) + 0.05.
- GPU (skipped without CUDA): Triton kernel, bf16 LLaMA-8B shapes (in -> out: 4096 -> 4096,
  4096 -> 14336, 14336 -> 4096) at 4096 and 16384 tokens, against cuBLAS through torch: ``torch.mm``
  (bf16 out) and ``torch.addmm(main_grad, ..., out_dtype=fp32)`` (the apex fused-wgrad equivalent:
  bf16 in, fp32 accumulate into main_grad). Goals: >= 0.95x cuBLAS at r = 0 and
  time(r) / time(0) <= (1 - r) + 0.05. GPU times are CUDA-event medians from
  ``triton.testing.do_bench`` (L2 flushed); the pytest-benchmark wall-clock rounds end with a sync.

Every ratio is measured in the same process; ``extra_info`` of each benchmark holds it.
Run: ``python -m pytest bench/bench_wgrad.py -q --benchmark-enable`` (add ``-m gpu`` for the GPU part).
"""

from __future__ import annotations

import time

import pytest
import torch
from tfz.kernels import wgrad_gemm_accum_fp32

RATIOS = (0.0, 0.25, 0.5, 0.75, 0.9)
ROW_BLOCK = 128
CPU_TOKENS, CPU_IN, CPU_OUT = 2048, 4096, 4096
GPU_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]  # (in, out) of the Linear
GPU_TOKENS = (4096, 16384)


def block_mask(n_out: int, ratio: float, seed: int = 0, device="cpu") -> torch.Tensor:
    """Row mask [n_out] with round(ratio * blocks) random 128-row blocks frozen (False)."""
    n_blocks = -(-n_out // ROW_BLOCK)
    n_frozen = round(ratio * n_blocks)
    order = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed))
    blocks = torch.ones(n_blocks, dtype=torch.bool)
    blocks[order[:n_frozen]] = False
    return blocks.repeat_interleave(ROW_BLOCK)[:n_out].to(device)


def goal(ratio: float) -> float:
    return (1 - ratio) + 0.05


# ---------------------------------------------------------------- CPU, torch backend


@pytest.fixture(scope="module")
def cpu_operands():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(CPU_TOKENS, CPU_IN, generator=g)
    dy = torch.randn(CPU_TOKENS, CPU_OUT, generator=g)
    return x, dy, torch.zeros(CPU_OUT, CPU_IN)


_cpu_median_s: dict[float, float] = {}


def _wall_median(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


@pytest.mark.benchmark(group="wgrad-cpu-torch")
@pytest.mark.parametrize("ratio", RATIOS)
def test_cpu_torch_backend(benchmark, cpu_operands, ratio):
    x, dy, main_grad = cpu_operands
    mask = block_mask(CPU_OUT, ratio)
    run = lambda: wgrad_gemm_accum_fp32(x, dy, main_grad, active_rows=mask, backend="torch")
    benchmark.pedantic(run, rounds=3, warmup_rounds=1, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: ran once as a smoke test
        return
    median = benchmark.stats.stats.median
    _cpu_median_s[ratio] = median
    if 0.0 not in _cpu_median_s:  # r = 0 was deselected: measure it now, in this run
        full = lambda: wgrad_gemm_accum_fp32(x, dy, main_grad, backend="torch")
        full()
        _cpu_median_s[0.0] = _wall_median(full, 3)
    benchmark.extra_info.update(
        provider="tfz-torch",
        tokens=CPU_TOKENS,
        n_in=CPU_IN,
        n_out=CPU_OUT,
        dtype="float32",
        ratio=ratio,
        time_ratio=median / _cpu_median_s[0.0],
        goal=goal(ratio),
        gflops=2 * CPU_TOKENS * CPU_IN * CPU_OUT * (1 - ratio) / median / 1e9,
    )


# ---------------------------------------------------------------- GPU, Triton vs cuBLAS

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class _GpuCase:
    """bf16 operands and an fp32 main_grad for one (in, out, tokens) shape, with memoized timings."""

    def __init__(self, n_in: int, n_out: int, tokens: int):
        g = torch.Generator(device="cuda").manual_seed(0)
        self.n_in, self.n_out, self.tokens = n_in, n_out, tokens
        self.x = torch.randn(tokens, n_in, device="cuda", generator=g, dtype=torch.bfloat16)
        self.dy = torch.randn(tokens, n_out, device="cuda", generator=g, dtype=torch.bfloat16)
        self.main_grad = torch.zeros(n_out, n_in, device="cuda")
        self.ms: dict[str, float] = {}

    def flop(self, ratio: float = 0.0) -> float:
        return 2 * self.tokens * self.n_in * self.n_out * (1 - ratio)

    def triton_fn(self, ratio: float):
        mask = None if ratio == 0 else block_mask(self.n_out, ratio, device="cuda")
        return lambda: wgrad_gemm_accum_fp32(
            self.x, self.dy, self.main_grad, active_rows=mask, backend="triton"
        )

    def torch_mm_fn(self):
        return lambda: torch.mm(self.dy.t(), self.x)

    def addmm_fp32_fn(self):
        """apex's fused wgrad through torch: bf16 operands, fp32 accumulate into main_grad (beta = 1)."""
        mg, a, b = self.main_grad, self.dy.t(), self.x
        try:
            torch.addmm(mg, a, b, out_dtype=torch.float32, out=mg)
        except (TypeError, RuntimeError):
            return None
        return lambda: torch.addmm(mg, a, b, out_dtype=torch.float32, out=mg)

    def time_ms(self, name: str, fn) -> float:
        if name not in self.ms:
            import triton.testing

            fn()  # compile / autotune outside the timed region
            torch.cuda.synchronize()
            self.ms[name] = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        return self.ms[name]


_gpu_cases: dict[tuple[int, int, int], _GpuCase] = {}


def _case(shape, tokens) -> _GpuCase:
    key = (*shape, tokens)
    if key not in _gpu_cases:
        _gpu_cases.clear()  # keep one shape's operands on the device at a time
        torch.cuda.empty_cache()
        _gpu_cases[key] = _GpuCase(*shape, tokens)
    return _gpu_cases[key]


def _synced(fn):
    def run():
        fn()
        torch.cuda.synchronize()

    return run


_shape_ids = [f"{i}to{o}" for i, o in GPU_SHAPES]


@gpu
@pytest.mark.gpu
@pytest.mark.benchmark(group="wgrad-gpu-bf16")
@pytest.mark.parametrize("tokens", GPU_TOKENS)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=_shape_ids)
@pytest.mark.parametrize("provider", ["torch.mm", "torch.addmm-fp32"])
def test_gpu_cublas(benchmark, provider, shape, tokens):
    case = _case(shape, tokens)
    fn = case.torch_mm_fn() if provider == "torch.mm" else case.addmm_fp32_fn()
    if fn is None:
        pytest.skip("torch.addmm(out_dtype=float32) is not supported by this torch build")
    ms = case.time_ms(provider, fn)
    benchmark.pedantic(_synced(fn), rounds=10, warmup_rounds=2, iterations=1)
    benchmark.extra_info.update(
        provider=provider, n_in=shape[0], n_out=shape[1], tokens=tokens, ratio=0.0, ms=ms,
        tflops=case.flop() / ms / 1e9,
    )  # fmt: skip


@gpu
@pytest.mark.gpu
@pytest.mark.benchmark(group="wgrad-gpu-bf16")
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("tokens", GPU_TOKENS)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=_shape_ids)
def test_gpu_triton(benchmark, shape, tokens, ratio):
    case = _case(shape, tokens)
    fn = case.triton_fn(ratio)
    ms = case.time_ms(f"triton-{ratio}", fn)
    ms0 = case.time_ms("triton-0.0", case.triton_fn(0.0))
    benchmark.pedantic(_synced(fn), rounds=10, warmup_rounds=2, iterations=1)
    info = dict(
        provider="tfz-triton", n_in=shape[0], n_out=shape[1], tokens=tokens, ratio=ratio, ms=ms,
        tflops=case.flop(ratio) / ms / 1e9, time_ratio=ms / ms0, goal=goal(ratio),
    )  # fmt: skip
    if ratio == 0.0:
        info["vs_torch_mm"] = case.time_ms("torch.mm", case.torch_mm_fn()) / ms
        addmm = case.addmm_fp32_fn()
        if addmm is not None:
            info["vs_addmm_fp32"] = case.time_ms("torch.addmm-fp32", addmm) / ms
    benchmark.extra_info.update(info)
