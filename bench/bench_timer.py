"""Stream timer cost per record: tfz._C vs time.perf_counter (CPU) and vs torch.cuda.Event (GPU).

Run: ``python -m pytest bench/bench_timer.py -q --benchmark-enable --benchmark-time-unit=us
--benchmark-columns=min,median,rounds --benchmark-group-by=group``. One round = ``N_RECORDS`` records
(group "*-record") or ``N_RECORDS`` records and one resolve ("*-record+resolve"), or ``N_ACTIONS``
actions and one collect ("*-action"); divide by the count for the per-record / per-action cost.
"""

from __future__ import annotations

import os
import time

import pytest

from tfz.timing import ActionTimer, PythonHostTimer, TorchEventTimer

try:
    from tfz import _C
except ImportError:
    _C = None

N_RECORDS = 64
N_ACTIONS = 32
ROUNDS = int(os.environ.get("TFZ_BENCH_ROUNDS", "2000"))


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


needs_gpu = pytest.mark.skipif(not _cuda_available(), reason="needs a CUDA GPU (none visible)")


class PerfCounterList:
    """Baseline: the least a Python timer can do (append ``time.perf_counter()``, subtract at the end)."""

    def __init__(self):
        self.stamps = []

    def record(self, tag, stream=None):
        self.stamps.append((tag, time.perf_counter()))

    def resolve(self):
        stamps, self.stamps = self.stamps, []
        origin = stamps[0][1]
        return [(tag, (t - origin) * 1e3) for tag, t in stamps]

    def clear(self):
        self.stamps = []


def _host_timer(name):
    if name == "native-host":
        if _C is None:
            pytest.skip("tfz._C not built")
        return _C.StreamTimer(N_RECORDS, clock="host")
    if name == "python-perf_counter_ns":
        return PythonHostTimer(N_RECORDS)
    return PerfCounterList()


HOST_TIMERS = ["native-host", "python-perf_counter_ns", "perf_counter-list"]


def _records(timer, stream=None):
    record = timer.record
    for k in range(N_RECORDS):
        record(k, stream)


@pytest.mark.benchmark(group="cpu-record")
@pytest.mark.parametrize("name", HOST_TIMERS)
def test_cpu_record(benchmark, name):
    timer = _host_timer(name)
    benchmark.extra_info["records_per_round"] = N_RECORDS
    benchmark.pedantic(_records, args=(timer,), setup=timer.clear, rounds=ROUNDS, warmup_rounds=50)
    assert len(timer.resolve()) == N_RECORDS


@pytest.mark.benchmark(group="cpu-record+resolve")
@pytest.mark.parametrize("name", HOST_TIMERS)
def test_cpu_record_resolve(benchmark, name):
    timer = _host_timer(name)

    def step():
        _records(timer)
        return timer.resolve()

    benchmark.extra_info["records_per_round"] = N_RECORDS
    resolved = benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=50)
    assert [tag for tag, _ in resolved] == list(range(N_RECORDS))


def _actions(timer):
    for k in range(N_ACTIONS):
        with timer.action("0F0" if k % 2 else "0B0"):
            pass
    return timer.collect()


@pytest.mark.benchmark(group="cpu-action")
@pytest.mark.parametrize("backend", ["native-host", "python"])
def test_cpu_action(benchmark, monkeypatch, backend):
    if backend == "native-host" and _C is None:
        pytest.skip("tfz._C not built")
    monkeypatch.setenv("TFZ_FORCE_SKIP_CPP", "1" if backend == "python" else "0")
    timer = ActionTimer("cpu", capacity=2 * N_ACTIONS)
    assert timer.backend == backend
    benchmark.extra_info["actions_per_round"] = N_ACTIONS
    totals = benchmark.pedantic(_actions, args=(timer,), rounds=ROUNDS, warmup_rounds=50)
    assert set(totals) == {"0F0", "0B0"}


# --------------------------------------------------------------------------------------------------- GPU


class TorchEventPerRecord:
    """Baseline: a new ``torch.cuda.Event`` per record (the naive pattern), elapsed_time at the end."""

    def __init__(self):
        import torch

        self._torch = torch
        self.events = []

    def record(self, tag, stream=None):
        event = self._torch.cuda.Event(enable_timing=True)
        event.record()
        self.events.append((tag, event))

    def resolve(self):
        events, self.events = self.events, []
        events[-1][1].synchronize()
        first = events[0][1]
        return [(tag, first.elapsed_time(event)) for tag, event in events]

    def clear(self):
        self.events = []


GPU_TIMERS = ["native-cuda-events", "python-torch-event-pool", "torch-event-per-record"]


def _gpu_timer(name):
    import torch

    if name == "native-cuda-events":
        if _C is None:
            pytest.skip("tfz._C not built")
        return _C.StreamTimer(N_RECORDS, clock="cuda-events"), torch.cuda.current_stream().cuda_stream
    if name == "python-torch-event-pool":
        return TorchEventTimer(N_RECORDS, device=torch.cuda.current_device()), torch.cuda.current_stream()
    return TorchEventPerRecord(), None


@pytest.mark.gpu
@needs_gpu
@pytest.mark.benchmark(group="gpu-record+resolve")
@pytest.mark.parametrize("name", GPU_TIMERS)
def test_gpu_record_resolve(benchmark, name):
    timer, stream = _gpu_timer(name)

    def step():
        _records(timer, stream)
        return timer.resolve()

    benchmark.extra_info["records_per_round"] = N_RECORDS
    resolved = benchmark.pedantic(step, rounds=ROUNDS // 4, warmup_rounds=20)
    assert [tag for tag, _ in resolved] == list(range(N_RECORDS))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.benchmark(group="gpu-record")
@pytest.mark.parametrize("name", GPU_TIMERS)
def test_gpu_record(benchmark, name):
    timer, stream = _gpu_timer(name)
    benchmark.extra_info["records_per_round"] = N_RECORDS
    benchmark.pedantic(
        _records, args=(timer, stream), setup=timer.clear, rounds=ROUNDS // 4, warmup_rounds=20
    )


@pytest.mark.gpu
@needs_gpu
@pytest.mark.benchmark(group="gpu-action")
@pytest.mark.parametrize("backend", ["cuda-events", "python"])
def test_gpu_action(benchmark, monkeypatch, backend):
    if backend == "cuda-events" and _C is None:
        pytest.skip("tfz._C not built")
    monkeypatch.setenv("TFZ_FORCE_SKIP_CPP", "1" if backend == "python" else "0")
    timer = ActionTimer("cuda", capacity=2 * N_ACTIONS)
    assert timer.backend == backend
    benchmark.extra_info["actions_per_round"] = N_ACTIONS
    totals = benchmark.pedantic(_actions, args=(timer,), rounds=ROUNDS // 4, warmup_rounds=20)
    assert set(totals) == {"0F0", "0B0"}
