"""Benchmarks of the masked weight gradient (tfz.kernels.wgrad); results in bench/RESULTS.md.

Masks are what the runtime draws: ``tfz.masks.select`` over the layer's 64-row units at freeze ratio
r (uniform random order), prepared once as :class:`tfz.kernels.ActiveRows`, as ``tfz.pipeline`` does.

- ``wgrad-cpu-torch``: CPU, torch backend, 2048 tokens, 4096 -> 4096, fp32, accumulate into
  main_grad, r in RATIOS. Goal: time(r) / time(0) <= (1 - r) + 0.05.
- ``wgrad-call-cpu``: CPU host cost of one call at a tiny shape, one thread: ``wgrad`` (torch
  backend, prepared mask), the Triton launcher's host side with the kernel launch stubbed (config,
  grid, arguments), and ``torch.mm`` for scale.
- ``wgrad-gpu-bf16`` (GPU): the Triton kernel at LLaMA-8B shapes (in -> out: q/o 4096 -> 4096, k/v
  4096 -> 1024, gate/up 4096 -> 14336, down 14336 -> 4096; 4096 and 16384 tokens) against cuBLAS
  through torch: ``torch.mm`` (bf16 out) and ``torch.addmm(main_grad, ..., out_dtype=fp32)`` (apex's
  fused wgrad); time(r) / time(0). Goals: >= 0.95x addmm at r = 0, time(r)/time(0) <= (1 - r) + 0.05.
- ``wgrad-call-gpu`` (GPU): per-call cost at GQA k/v shapes (4096 -> 1024, 512 and 2048 tokens):
  kernel time and host time per call (launches queued without a sync), Triton with a prepared mask
  at r = 0.5 against ``torch.mm`` and ``addmm``.

GPU kernel times are CUDA-event medians from ``triton.testing.do_bench`` (L2 flushed). Every ratio is
measured in the same process; ``extra_info`` holds it, and with ``TFZ_BENCH_RECORD=file.jsonl`` each
GPU measurement is also appended to that file as soon as it is made (bench/gpu_check.sh reports from
it, so a stage killed midway still reports what ran). ``TFZ_FAKE_GPU=1`` runs the GPU benchmarks on
CPU tensors at tiny shapes with a wall-clock timer: a rehearsal of bench/gpu_check.sh, numbers
meaningless.

Run: ``python -m pytest bench/bench_wgrad.py -q --benchmark-enable`` (add ``-m gpu`` for the GPU part).
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import torch
from tfz.kernels import ActiveRows, wgrad, wgrad_gemm_accum_fp32

from tfz._validate import env_flag
from tfz.masks import LayerSpec, StageUnits, select

RATIOS = (0.0, 0.25, 0.5, 0.75, 0.9)
UNIT_ROWS = 64
CPU_TOKENS, CPU_IN, CPU_OUT = 2048, 4096, 4096
FAKE = env_flag("TFZ_FAKE_GPU")
GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
if GPU or not FAKE:
    SHAPES = [("q/o", 4096, 4096), ("k/v", 4096, 1024), ("gate/up", 4096, 14336), ("down", 14336, 4096)]
    TOKENS = (4096, 16384)
    CALL_SHAPES, CALL_TOKENS = [("k/v", 4096, 1024)], (512, 2048)
else:  # rehearsal on CPU: tiny shapes
    SHAPES = [("q/o", 64, 64), ("k/v", 64, 32)]
    TOKENS = (64,)
    CALL_SHAPES, CALL_TOKENS = [("k/v", 64, 32)], (16,)

gpu = pytest.mark.skipif(not (GPU or FAKE), reason="needs a CUDA GPU (none visible)")


def unit_mask(n_out: int, n_in: int, ratio: float, seed: int = 0) -> np.ndarray:
    """The runtime's mask of one layer at freeze ratio ``ratio``: random 64-row units (tfz.masks)."""
    units = StageUnits((LayerSpec("w", n_out, n_in),), block_rows=UNIT_ROWS)
    return select(units, ratio, stage=1, microbatch=0, step=seed).active_rows["w"]


def goal(ratio: float) -> float:
    return (1 - ratio) + 0.05


def record(**info) -> None:
    """Append one measurement to $TFZ_BENCH_RECORD (JSON lines), at once."""
    path = os.environ.get("TFZ_BENCH_RECORD")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(info) + "\n")


def _wall_median(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


# ---------------------------------------------------------------- CPU, torch backend


@pytest.fixture(scope="module")
def cpu_operands():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(CPU_TOKENS, CPU_IN, generator=g)
    dy = torch.randn(CPU_TOKENS, CPU_OUT, generator=g)
    return x, dy, torch.zeros(CPU_OUT, CPU_IN)


_cpu_median_s: dict[float, float] = {}


@pytest.mark.benchmark(group="wgrad-cpu-torch")
@pytest.mark.parametrize("ratio", RATIOS)
def test_cpu_torch_backend(benchmark, cpu_operands, ratio):
    x, dy, main_grad = cpu_operands
    rows = ActiveRows(unit_mask(CPU_OUT, CPU_IN, ratio)) if ratio else None
    run = lambda: wgrad_gemm_accum_fp32(x, dy, main_grad, active_rows=rows, backend="torch")
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
        runs=0 if rows is None else len(rows.runs),
        time_ratio=median / _cpu_median_s[0.0],
        goal=goal(ratio),
        gflops=2 * CPU_TOKENS * CPU_IN * CPU_OUT * (1 - ratio) / median / 1e9,
    )


# ---------------------------------------------------------------- CPU, host cost of one call


@pytest.fixture
def stub_launches(monkeypatch):
    """The Triton launcher with its kernel launches replaced by no-ops (host side only)."""
    pytest.importorskip("triton")
    from tfz.kernels import _wgrad_triton as mod

    class Stub:
        def __getitem__(self, grid):
            return lambda *args, **meta: None

    monkeypatch.setattr(mod, "wgrad_kernel", Stub())
    monkeypatch.setattr(mod, "bias_kernel", Stub())
    monkeypatch.setattr(mod, "pinned_config", None)
    monkeypatch.setattr(mod, "INTERPRET", True)
    yield mod
    mod.clear_picks()


@pytest.mark.benchmark(group="wgrad-call-cpu")
@pytest.mark.parametrize("provider", ["torch.mm", "wgrad-torch", "triton-host"])
def test_cpu_call_cost(benchmark, provider, request):
    """Host cost per call at 16 tokens, 64 -> 256 (half the 64-row units frozen); one thread, so an
    OpenMP barrier on a busy machine does not stand in for the call's own cost."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    g = torch.Generator().manual_seed(0)
    x, dy = torch.randn(16, 64, generator=g), torch.randn(16, 256, generator=g)
    out = torch.zeros(256, 64)
    rows = ActiveRows(unit_mask(256, 64, 0.5))
    if provider == "torch.mm":
        fn = lambda: torch.mm(dy.t(), x)
    elif provider == "wgrad-torch":
        fn = lambda: wgrad(x, dy, active_rows=rows, out=out, backend="torch")
    else:
        request.getfixturevalue("stub_launches")
        fn = lambda: wgrad(x.bfloat16(), dy.bfloat16(), active_rows=rows, out=out, backend="triton")
    benchmark(fn)
    benchmark.extra_info.update(provider=provider, tokens=16, n_in=64, n_out=256, ratio=0.5)


# ---------------------------------------------------------------- GPU: Triton vs cuBLAS


def _sync():
    if GPU:
        torch.cuda.synchronize()


def kernel_ms(fn) -> float:
    """CUDA-event median (L2 flushed) on a GPU; wall-clock median in the CPU rehearsal."""
    fn()  # compile outside the timed region
    _sync()
    if GPU:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    return 1e3 * _wall_median(fn, 3)


def host_us(fn, calls: int = 200) -> float:
    """Host time per call, queueing ``calls`` calls without waiting for the device."""
    fn()
    _sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    _sync()
    return (t1 - t0) / calls * 1e6


class _Case:
    """bf16 operands and an fp32 main_grad for one (in, out, tokens) shape, with memoized timings."""

    def __init__(self, n_in: int, n_out: int, tokens: int):
        g = torch.Generator(device=DEVICE).manual_seed(0)
        self.n_in, self.n_out, self.tokens = n_in, n_out, tokens
        self.x = torch.randn(tokens, n_in, device=DEVICE, generator=g, dtype=torch.bfloat16)
        self.dy = torch.randn(tokens, n_out, device=DEVICE, generator=g, dtype=torch.bfloat16)
        self.main_grad = torch.zeros(n_out, n_in, device=DEVICE)
        self.ms: dict[str, float] = {}
        self._rows: dict[float, ActiveRows | None] = {}

    def flop(self, ratio: float = 0.0) -> float:
        return 2 * self.tokens * self.n_in * self.n_out * (1 - ratio)

    def rows(self, ratio: float) -> ActiveRows | None:
        if ratio not in self._rows:
            self._rows[ratio] = ActiveRows(unit_mask(self.n_out, self.n_in, ratio), DEVICE) if ratio else None
        return self._rows[ratio]

    def tfz_fn(self, ratio: float):
        rows = self.rows(ratio)
        return lambda: wgrad_gemm_accum_fp32(self.x, self.dy, self.main_grad, active_rows=rows)

    def mm_fn(self):
        return lambda: torch.mm(self.dy.t(), self.x)

    def addmm_fn(self):
        """apex's fused wgrad through torch: bf16 operands, fp32 accumulate into main_grad (beta = 1)."""
        mg, a, b = self.main_grad, self.dy.t(), self.x
        try:
            torch.addmm(mg, a, b, out_dtype=torch.float32, out=mg)
        except (TypeError, RuntimeError):
            return None
        return lambda: torch.addmm(mg, a, b, out_dtype=torch.float32, out=mg)

    def time_ms(self, name: str, fn) -> float:
        if name not in self.ms:
            self.ms[name] = kernel_ms(fn)
        return self.ms[name]


_cases: dict[tuple[int, int, int], _Case] = {}


def _case(n_in: int, n_out: int, tokens: int) -> _Case:
    key = (n_in, n_out, tokens)
    if key not in _cases:
        _cases.clear()  # one shape's operands on the device at a time
        if GPU:
            torch.cuda.empty_cache()
        _cases[key] = _Case(*key)
    return _cases[key]


def _synced(fn):
    def run():
        fn()
        _sync()

    return run


_ids = [f"{name}-{i}to{o}" for name, i, o in SHAPES]


@gpu
@pytest.mark.gpu
@pytest.mark.benchmark(group="wgrad-gpu-bf16")
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_gpu_wgrad(benchmark, shape, tokens, ratio):
    name, n_in, n_out = shape
    case = _case(n_in, n_out, tokens)
    ms = case.time_ms(f"tfz-{ratio}", case.tfz_fn(ratio))
    ms0 = case.time_ms("tfz-0.0", case.tfz_fn(0.0))
    info = dict(
        group="wgrad-gpu-bf16", provider="tfz", layer=name, n_in=n_in, n_out=n_out, tokens=tokens,
        ratio=ratio, ms=ms, tflops=case.flop(ratio) / ms / 1e9, time_ratio=ms / ms0, goal=goal(ratio),
    )  # fmt: skip
    if ratio == 0.0:
        info["mm_ms"] = case.time_ms("torch.mm", case.mm_fn())
        addmm = case.addmm_fn()
        if addmm is not None:
            info["addmm_ms"] = case.time_ms("addmm", addmm)
            info["vs_addmm"] = info["addmm_ms"] / ms
        info["vs_mm"] = info["mm_ms"] / ms
    record(**info)
    benchmark.pedantic(_synced(case.tfz_fn(ratio)), rounds=5, warmup_rounds=1, iterations=1)
    benchmark.extra_info.update(info)


@gpu
@pytest.mark.gpu
@pytest.mark.benchmark(group="wgrad-call-gpu")
@pytest.mark.parametrize("tokens", CALL_TOKENS)
@pytest.mark.parametrize("shape", CALL_SHAPES, ids=[f"{n}-{i}to{o}" for n, i, o in CALL_SHAPES])
def test_gpu_call_cost(benchmark, shape, tokens):
    """Small GQA k/v layers: does the call (mask lookup, config, launch) cost more than torch.mm's?"""
    name, n_in, n_out = shape
    case = _case(n_in, n_out, tokens)
    fns = {"tfz-r0.5": case.tfz_fn(0.5), "tfz-r0": case.tfz_fn(0.0), "torch.mm": case.mm_fn()}
    addmm = case.addmm_fn()
    if addmm is not None:
        fns["addmm"] = addmm
    info = dict(group="wgrad-call-gpu", layer=name, n_in=n_in, n_out=n_out, tokens=tokens)
    for provider, fn in fns.items():
        info[f"{provider}_ms"] = kernel_ms(fn)
        info[f"{provider}_host_us"] = host_us(fn)
    record(**info)
    benchmark.pedantic(_synced(fns["tfz-r0.5"]), rounds=5, warmup_rounds=1, iterations=1)
    benchmark.extra_info.update(info)
