"""tfz._C stream timer and tfz.timing against independent references.

Host clocks are bracketed by ``time.perf_counter`` (same CLOCK_MONOTONIC on Linux); the CUDA-event branch
runs against a fake libcudart (csrc/testing/fake_cudart.c) whose timestamps are a closed form of the
record count; the real-GPU test compares with ``torch.cuda.Event`` pairs around the same kernels.
"""

from __future__ import annotations

import ctypes.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from tfz.timing import ActionTimer, PythonHostTimer, _backend, backend
from tfz.timing._pytimers import TorchEventTimer

try:
    from tfz import _C
except ImportError:
    _C = None

needs_native = pytest.mark.skipif(
    _C is None, reason="tfz._C not built (pip install -e . --no-build-isolation needs g++ and pybind11)"
)
REPO = Path(__file__).resolve().parents[1]
FAKE_SOURCE = REPO / "csrc" / "testing" / "fake_cudart.c"
TOL_MS = 1e-3  # rounding slack between two readings of the same monotonic clock


def _cuda_visible() -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and torch.cuda.is_available()


# ---------------------------------------------------------------------------------------------------
# host stream timers: native steady clock and the Python perf_counter_ns fallback


@pytest.fixture(params=["native", "python"])
def host_timer(request):
    def make(capacity=64):
        if request.param == "python":
            return PythonHostTimer(capacity)
        if _C is None:
            pytest.skip("tfz._C not built")
        return _C.StreamTimer(capacity, clock="host")

    return make


def test_host_durations_bracketed_by_perf_counter(host_timer):
    timer = host_timer()
    sleeps = [0.004, 0.012, 0.0, 0.008]
    before, after = [], []
    for k, pause in enumerate(sleeps + [0.0]):
        before.append(time.perf_counter())
        timer.record(k)
        after.append(time.perf_counter())
        time.sleep(pause)
    resolved = timer.resolve()
    assert [tag for tag, _ in resolved] == list(range(len(sleeps) + 1))
    assert resolved[0][1] == 0.0
    for k in range(1, len(resolved)):
        lower = (before[k] - after[0]) * 1e3
        upper = (after[k] - before[0]) * 1e3
        assert lower - TOL_MS <= resolved[k][1] <= upper + TOL_MS
    # the sleeps themselves are lower bounds of consecutive differences
    for k in range(1, len(resolved)):
        assert resolved[k][1] - resolved[k - 1][1] >= sleeps[k - 1] * 1e3 - TOL_MS


def test_host_order_tags_and_reset(host_timer):
    timer = host_timer(8)
    tags = ["3W5", 7, "", -(2**63), 2**63 - 1, "0F0"]
    assert [timer.record(tag) for tag in tags] == list(range(len(tags)))
    assert timer.pending == len(tags)
    resolved = timer.resolve()
    assert [tag for tag, _ in resolved] == tags
    times = [ms for _, ms in resolved]
    assert times == sorted(times)
    assert timer.pending == 0 and timer.resolve() == []
    timer.record("a")
    timer.clear()
    assert timer.pending == 0 and timer.resolve() == []
    assert timer.clock == "host" and timer.capacity == 8


def test_host_overflow_raises_and_keeps_records(host_timer):
    timer = host_timer(3)
    for k in range(3):
        timer.record(k)
    with pytest.raises(OverflowError, match="3 slots"):
        timer.record(99)
    assert [tag for tag, _ in timer.resolve()] == [0, 1, 2]
    timer.record("again")
    assert [tag for tag, _ in timer.resolve()] == ["again"]


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"capacity": 0}, ValueError, "capacity"),
        ({"capacity": 2**24 + 1}, ValueError, "capacity"),
        ({"capacity": 1.5}, TypeError, "capacity"),
        ({"capacity": True}, TypeError, "capacity"),
    ],
)
def test_bad_capacity(kwargs, error, match):
    with pytest.raises(error, match=match):
        PythonHostTimer(**kwargs)
    if _C is not None:
        with pytest.raises(error, match=match):
            _C.StreamTimer(**kwargs)


@needs_native
@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"clock": "gpu"}, ValueError, "clock"),
        ({"device": -2}, ValueError, "device"),
        ({"device": "0"}, TypeError, "device"),
    ],
)
def test_native_bad_constructor_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        _C.StreamTimer(4, **kwargs)


@pytest.mark.parametrize(
    "tag,stream,error,match",
    [
        (1.5, None, TypeError, "tag"),
        (None, None, TypeError, "tag"),
        (True, None, TypeError, "tag"),
        (np.int64(3), None, TypeError, "tag"),  # as the native timer's PyLong_Check
        (2**63, None, ValueError, "tag"),
        ("a", -1, ValueError, "stream"),
        ("a", "s", TypeError, "stream"),
        ("a", 2**64, ValueError, "stream"),
    ],
)
def test_bad_record_arguments(host_timer, tag, stream, error, match):
    timer = host_timer(4)
    if isinstance(timer, PythonHostTimer) and match == "stream":
        pytest.skip("the Python host timer ignores stream")
    with pytest.raises(error, match=match):
        timer.record(tag, stream)
    assert timer.pending == 0


def _record_from_threads(timer, threads=2, per_thread=2000):
    barrier = threading.Barrier(threads)

    def work(t):
        barrier.wait()
        for i in range(per_thread):
            timer.record(t * 1_000_000 + i)

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return timer.resolve()


def test_two_threads_no_lost_or_duplicated_records(host_timer):
    timer = host_timer(4000)
    resolved = _record_from_threads(timer)
    tags = [tag for tag, _ in resolved]
    assert sorted(tags) == sorted(t * 1_000_000 + i for t in range(2) for i in range(2000))
    for t in range(2):  # each thread's records keep their order
        mine = [tag for tag in tags if tag // 1_000_000 == t]
        assert mine == sorted(mine)
    times = [ms for _, ms in resolved]
    assert times == sorted(times)


# ---------------------------------------------------------------------------------------------------
# CUDA-event branch through a fake libcudart, in subprocesses (the runtime is loaded once per process)


def _compiler():
    return shutil.which("gcc") or shutil.which("cc")


@pytest.fixture(scope="module")
def fake_cudart(tmp_path_factory):
    """Paths of the fake runtime: full, without cudaEventSynchronize, and one with soname libcudart.so.12."""
    cc = _compiler()
    if cc is None or not FAKE_SOURCE.exists():
        pytest.skip("no C compiler or no csrc/testing/fake_cudart.c to build the fake libcudart")
    out = tmp_path_factory.mktemp("fake_cudart")
    libs = {
        "full": (out / "libfakecudart.so", []),
        "no_sync": (out / "libfakecudart_nosync.so", ["-DFAKE_OMIT_SYNC"]),
        "soname12": (out / "libcudart.so.12", ["-Wl,-soname,libcudart.so.12"]),
    }
    for path, flags in libs.values():
        subprocess.run([cc, "-O2", "-shared", "-fPIC", *flags, str(FAKE_SOURCE), "-o", str(path)], check=True)
    return {name: str(path) for name, (path, _) in libs.items()}


_PRELUDE = """
import ctypes, json, os, sys, threading
from tfz import _C
def fake(path):
    lib = ctypes.CDLL(path)
    lib.fake_cudart_counter.restype = ctypes.c_int64
    lib.fake_cudart_record_stream.restype = ctypes.c_uint64
    lib.fake_cudart_record_stream.argtypes = [ctypes.c_int64]
    return lib
def counter(lib, name):
    return lib.fake_cudart_counter(name.encode())
out = {}
"""


def _run(body: str, **env) -> dict:
    full_env = {k: v for k, v in os.environ.items() if k not in ("TFZ_CUDART_PATH", "TFZ_TIMER_FORCE_CPU")}
    full_env.update(env)
    script = _PRELUDE + body + "\nprint(json.dumps(out))\n"
    proc = subprocess.run(
        [sys.executable, "-c", script], env=full_env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_native
def test_fake_cudart_wiring_streams_and_batch_resolve(fake_cudart):
    path = fake_cudart["full"]
    out = _run(
        """
lib = fake(os.environ["TFZ_CUDART_PATH"])
out["info"] = _C.runtime_info()
timer = _C.StreamTimer(16)
out["clock"], out["device"], out["reason"] = timer.clock, timer.device, timer.reason
out["created"], out["flags"] = counter(lib, "created"), counter(lib, "last_flags")
class Stream:
    cuda_stream = 0x1234
k0 = counter(lib, "records")
timer.record("a", 0xDEADBEEF); timer.record(1, Stream()); timer.record("c"); timer.record("d", 0xDEADBEEF)
out["streams"] = [lib.fake_cudart_record_stream(k0 + i) for i in range(4)]
out["k0_two"] = k0
s0 = counter(lib, "syncs")
out["two"] = timer.resolve()
out["syncs_three_streams"] = counter(lib, "syncs") - s0
k0 = counter(lib, "records"); s0 = counter(lib, "syncs")
for i in range(5):
    timer.record(i, 7)
out["k0_one"] = k0
out["one"] = timer.resolve()
out["syncs_one_stream"] = counter(lib, "syncs") - s0
out["empty"] = timer.resolve()
del timer
out["destroyed"] = counter(lib, "destroyed")
""",
        TFZ_CUDART_PATH=path,
    )
    assert out["info"]["clock"] == "cuda-events" and out["info"]["cudart"] == path
    assert out["info"]["device_count"] == 1 and out["info"]["reason"] == ""
    assert (out["clock"], out["device"], out["reason"]) == ("cuda-events", 0, "")
    assert out["created"] == 16 and out["flags"] == 0  # pre-created, timing enabled
    assert out["streams"] == [0xDEADBEEF, 0x1234, 0, 0xDEADBEEF]
    assert out["syncs_three_streams"] == 3 and out["syncs_one_stream"] == 1

    def expected(k0, tags):  # fake stamp of the k-th record: 0.5 k^2 ms
        return [[tag, 0.5 * (k0 + i) ** 2 - 0.5 * k0**2] for i, tag in enumerate(tags)]

    assert out["two"] == expected(out["k0_two"], ["a", 1, "c", "d"])
    assert out["one"] == expected(out["k0_one"], list(range(5)))
    assert out["empty"] == [] and out["destroyed"] == 16


@needs_native
def test_fake_cudart_overflow_and_threads(fake_cudart):
    out = _run(
        """
lib = fake(os.environ["TFZ_CUDART_PATH"])
timer = _C.StreamTimer(2)
timer.record("a", 5); timer.record("b", 5)
try:
    timer.record("c", 5)
except OverflowError as exc:
    out["overflow"] = str(exc)
out["kept"] = [tag for tag, _ in timer.resolve()]
timer = _C.StreamTimer(1000)
k0 = counter(lib, "records")
barrier = threading.Barrier(2)
def work(t):
    barrier.wait()
    for i in range(500):
        timer.record(t * 10000 + i, 100 + t)
threads = [threading.Thread(target=work, args=(t,)) for t in range(2)]
[th.start() for th in threads]; [th.join() for th in threads]
out["k0"] = k0
out["resolved"] = timer.resolve()
out["streams"] = [lib.fake_cudart_record_stream(k0 + i) for i in range(1000)]
""",
        TFZ_CUDART_PATH=fake_cudart["full"],
    )
    assert "2 slots" in out["overflow"] and out["kept"] == ["a", "b"]
    tags = [tag for tag, _ in out["resolved"]]
    assert sorted(tags) == sorted(t * 10000 + i for t in range(2) for i in range(500))
    k0 = out["k0"]
    # record i of the batch is the (k0 + i)-th cudaEventRecord, on its thread's stream
    assert [ms for _, ms in out["resolved"]] == [0.5 * (k0 + i) ** 2 - 0.5 * k0**2 for i in range(1000)]
    assert out["streams"] == [100 + tag // 10000 for tag in tags]


@needs_native
def test_fake_cudart_device_selection(fake_cudart):
    out = _run(
        """
lib = fake(os.environ["TFZ_CUDART_PATH"])
timer = _C.StreamTimer(4, device=1)
out["device"] = timer.device
out["event_device"], out["current"] = counter(lib, "last_event_device"), counter(lib, "device")
try:
    _C.StreamTimer(4, device=2)
except ValueError as exc:
    out["error"] = str(exc)
""",
        TFZ_CUDART_PATH=fake_cudart["full"],
        FAKE_CUDART_DEVICES="2",
    )
    assert (out["device"], out["event_device"], out["current"]) == (1, 1, 0)
    assert "device=2" in out["error"] and "2 CUDA device" in out["error"]


@needs_native
def test_fake_cudart_records_with_the_events_device_current(fake_cudart):
    """A timer on device 1 records while device 0 is current: it makes device 1 current for the record
    (the fake refuses a record on another device, as the runtime does) and restores device 0."""
    out = _run(
        """
lib = fake(os.environ["TFZ_CUDART_PATH"])
timer = _C.StreamTimer(4, device=1)
s0 = counter(lib, "set_device")
timer.record("a", 7)
timer.record("b", 7)
out["switches"] = counter(lib, "set_device") - s0
out["current"], out["wrong"] = counter(lib, "device"), counter(lib, "wrong_device")
out["resolved"] = [tag for tag, _ in timer.resolve()]
same = _C.StreamTimer(4, device=0)
s0 = counter(lib, "set_device")
same.record("c", 7)
out["switches_same"] = counter(lib, "set_device") - s0
""",
        TFZ_CUDART_PATH=fake_cudart["full"],
        FAKE_CUDART_DEVICES="2",
    )
    assert out["wrong"] == 0 and out["current"] == 0 and out["resolved"] == ["a", "b"]
    assert out["switches"] == 4 and out["switches_same"] == 0  # switch and restore per record


@needs_native
def test_fake_cudart_times_are_relative_to_the_batch(fake_cudart):
    """After 20,000 records the fake clock reads 2e8 ms, where float32 steps by 16 ms; the batch's
    times stay exact because they are measured from the batch's first record."""
    out = _run(
        """
timer = _C.StreamTimer(4096)
for _ in range(5):
    for i in range(4000):
        timer.record(i, 3)
    timer.resolve()
lib = fake(os.environ["TFZ_CUDART_PATH"])
out["k0"] = counter(lib, "records")
for i in range(3):
    timer.record(i, 3)
out["resolved"] = timer.resolve()
""",
        TFZ_CUDART_PATH=fake_cudart["full"],
    )
    k0 = out["k0"]
    assert k0 == 20000
    assert out["resolved"] == [[i, 0.5 * (k0 + i) ** 2 - 0.5 * k0**2] for i in range(3)]


@needs_native
def test_fake_cudart_missing_symbol_falls_back(fake_cudart):
    out = _run(
        """
out["info"] = _C.runtime_info()
out["clock"] = _C.StreamTimer(4).clock
try:
    _C.StreamTimer(4, clock="cuda-events")
except RuntimeError as exc:
    out["error"] = str(exc)
""",
        TFZ_CUDART_PATH=fake_cudart["no_sync"],
    )
    assert out["info"]["clock"] == "host" and "cudaEventSynchronize" in out["info"]["reason"]
    assert out["clock"] == "host" and "cudaEventSynchronize" in out["error"]


@needs_native
def test_force_cpu_never_touches_cudart(fake_cudart):
    out = _run(
        """
timer = _C.StreamTimer(4)
timer.record("a", 3)
out["clock"], out["info"] = timer.clock, _C.runtime_info()
out["records"] = counter(fake(os.environ["TFZ_CUDART_PATH"]), "records")
""",
        TFZ_CUDART_PATH=fake_cudart["full"],
        TFZ_TIMER_FORCE_CPU="1",
    )
    assert out["clock"] == "host" and out["records"] == 0
    assert out["info"]["forced_host"] and "TFZ_TIMER_FORCE_CPU" in out["info"]["reason"]


@needs_native
def test_already_mapped_cudart_is_reused(fake_cudart):
    """No TFZ_CUDART_PATH: a libcudart.so.12 already in the process (as torch's would be) is picked."""
    path = fake_cudart["soname12"]
    out = _run(
        f"""
lib = fake({path!r})
out["info"] = _C.runtime_info()
_C.StreamTimer(3)
out["created"] = counter(lib, "created")
"""
    )
    assert out["info"]["cudart"] == path and out["info"]["clock"] == "cuda-events"
    assert out["created"] == 3


@needs_native
def test_bad_cudart_path_falls_back(tmp_path):
    missing = str(tmp_path / "nope.so")
    out = _run('out["info"] = _C.runtime_info()', TFZ_CUDART_PATH=missing)
    assert out["info"]["clock"] == "host" and missing in out["info"]["reason"]


@needs_native
def test_real_cudart_without_device_falls_back():
    if ctypes.util.find_library("cudart") is None:
        pytest.skip("no libcudart on this machine")
    if shutil.which("nvidia-smi") is not None:
        pytest.skip("a GPU driver is present; this test covers machines without a device")
    out = _run(
        """
out["info"] = _C.runtime_info()
timer = _C.StreamTimer(4)
timer.record("a", 0x1234); timer.record("b", 0x1234)
out["clock"], out["resolved"] = timer.clock, timer.resolve()
"""
    )
    info = out["info"]
    assert info["clock"] == "host" and info["cudart"] and "libcudart" in info["cudart"]
    assert info["device_count"] == 0
    assert "cudaGetDeviceCount" in info["reason"] or "no CUDA device" in info["reason"]
    assert out["clock"] == "host" and [tag for tag, _ in out["resolved"]] == ["a", "b"]


# ---------------------------------------------------------------------------------------------------
# backend selection and the Python fallback


@pytest.fixture(params=["native-host", "python"])
def host_backend(request, monkeypatch):
    if request.param == "native-host" and _C is None:
        pytest.skip("tfz._C not built")
    monkeypatch.setenv("TFZ_FORCE_SKIP_CPP", "1" if request.param == "python" else "0")
    monkeypatch.delenv("TFZ_TIMER_FORCE_CPU", raising=False)
    return request.param


def test_backend_reports_active_timer(host_backend):
    assert backend("cpu") == host_backend
    timer = ActionTimer(device="cpu", capacity=8)
    assert timer.backend == host_backend and timer.device is None and timer.capacity == 8
    if not _cuda_visible():
        assert backend() == host_backend


def test_forced_python_path_does_not_warn(monkeypatch):
    monkeypatch.setenv("TFZ_FORCE_SKIP_CPP", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backend("cpu") == "python"
        assert isinstance(ActionTimer("cpu")._timer, PythonHostTimer)


def test_missing_extension_warns_once_and_falls_back(monkeypatch):
    monkeypatch.delenv("TFZ_FORCE_SKIP_CPP", raising=False)
    monkeypatch.setitem(sys.modules, "tfz._C", None)  # makes `from tfz import _C` raise ImportError
    if _C is not None:
        monkeypatch.delattr(sys.modules["tfz"], "_C", raising=False)
    monkeypatch.setattr(_backend, "_state", {"module": None, "error": None, "warned": set()})
    with pytest.warns(RuntimeWarning, match="tfz._C"):
        assert backend("cpu") == "python"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        timer = ActionTimer("cpu")
    assert timer.backend == "python"


def test_import_does_not_load_torch():
    code = (
        "import sys, time, tfz.timing as t\n"
        "timer = t.ActionTimer()\n"
        "with timer.action('0F0'): time.sleep(0.001)\n"
        "assert timer.collect()['0F0'] > 0\n"
        "print('torch' in sys.modules, timer.backend)\n"
    )
    for skip in ("0", "1"):
        env = dict(os.environ, TFZ_FORCE_SKIP_CPP=skip)
        proc = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr
        loaded, name = proc.stdout.split()
        assert loaded == "False" and name in ("native-host", "python")


@pytest.mark.parametrize(
    "device,error,match",
    [
        ("gpu", ValueError, "device"),
        ("cuda:x", ValueError, "device"),
        (-1, ValueError, "device"),
        (True, TypeError, "device"),
        (1.0, TypeError, "device"),
    ],
)
def test_bad_device(device, error, match):
    with pytest.raises(error, match=match):
        ActionTimer(device)


def test_numpy_integers_are_integers():
    timer = ActionTimer("cpu", capacity=np.int64(16))
    assert timer.capacity == 16 and type(timer.capacity) is int
    assert PythonHostTimer(np.int32(8)).capacity == 8
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda"):
            ActionTimer(np.int64(0))


@pytest.mark.parametrize(
    "word, python",
    [("1", True), ("TRUE", True), ("on", True), ("0", False), ("false", False), ("off", False), ("", False)],
)
def test_force_skip_cpp_reads_words_one_way(monkeypatch, word, python):
    """TFZ_FORCE_SKIP_CPP=false means off (it once meant on: any non-empty value but "0" did)."""
    monkeypatch.setenv("TFZ_FORCE_SKIP_CPP", word)
    if not python and _C is None:
        pytest.skip("tfz._C not built")
    assert backend("cpu") == ("python" if python else "native-host")


@pytest.mark.parametrize("name", ["TFZ_FORCE_SKIP_CPP", "TFZ_TIMER_FORCE_CPU"])
def test_bad_switch_word_names_the_variable(monkeypatch, name):
    monkeypatch.delenv("TFZ_FORCE_SKIP_CPP", raising=False)
    monkeypatch.setenv(name, "maybe")
    with pytest.raises(
        ValueError, match=f"environment variable {name} must be 1/true/yes/on or 0/false/no/off, got 'maybe'"
    ):
        ActionTimer("cpu")


def test_torch_event_timer_without_cuda_says_so():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    with pytest.raises(ValueError, match=r"torch.cuda.is_available\(\) is False"):
        TorchEventTimer(16)


def test_cuda_requested_without_cuda_is_an_error():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    with pytest.raises(ValueError, match="cuda"):
        ActionTimer("cuda")


# ---------------------------------------------------------------------------------------------------
# ActionTimer on host backends


def _timed_action(timer, name, pause):
    """Run one action; returns perf_counter brackets (inner, outer) of its duration in ms."""
    outer0 = time.perf_counter()
    with timer.action(name):
        inner0 = time.perf_counter()
        time.sleep(pause)
        inner1 = time.perf_counter()
    outer1 = time.perf_counter()
    return (inner1 - inner0) * 1e3, (outer1 - outer0) * 1e3


def test_action_durations_bracketed_and_summed(host_backend):
    timer = ActionTimer("cpu")
    a1 = _timed_action(timer, "0F0", 0.006)
    b = _timed_action(timer, "0B0", 0.003)
    a2 = _timed_action(timer, "0F0", 0.002)
    totals = timer.collect()
    assert set(totals) == {"0F0", "0B0"}
    assert a1[0] + a2[0] - TOL_MS <= totals["0F0"] <= a1[1] + a2[1] + TOL_MS
    assert b[0] - TOL_MS <= totals["0B0"] <= b[1] + TOL_MS
    assert timer.collect() == {}


def test_nested_actions_are_inclusive(host_backend):
    timer = ActionTimer("cpu")
    with timer.action("outer"):
        time.sleep(0.002)
        inner = _timed_action(timer, "inner", 0.004)
        time.sleep(0.002)
    spans = timer.collect_spans()
    assert [s.name for s in spans] == ["outer", "inner"]
    outer, nested = spans
    assert outer.start_ms <= nested.start_ms <= nested.end_ms <= outer.end_ms
    assert inner[0] - TOL_MS <= nested.duration_ms <= inner[1] + TOL_MS
    assert outer.duration_ms >= nested.duration_ms + 4.0 - TOL_MS
    assert {s.thread for s in spans} == {threading.get_ident()}


def test_action_timer_two_threads(host_backend):
    timer = ActionTimer("cpu", capacity=2000)
    barrier = threading.Barrier(2)
    idents = {}

    def work(t):
        idents[t] = threading.get_ident()
        barrier.wait()
        for i in range(150):
            with timer.action(f"{t}W{i}"):
                if i % 10 == 0:
                    with timer.action(f"{t}I{i}"):
                        pass

    workers = [threading.Thread(target=work, args=(t,)) for t in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    spans = timer.collect_spans()
    expected = {f"{t}{k}{i}" for t in range(2) for i in range(150) for k in "WI" if k == "W" or i % 10 == 0}
    assert sorted(s.name for s in spans) == sorted(expected)
    for t in range(2):
        outer = [s for s in spans if s.name.startswith(f"{t}W")]
        assert {s.thread for s in outer} == {idents[t]}
        assert [s.name for s in outer] == [f"{t}W{i}" for i in range(150)]
        assert all(a.end_ms <= b.start_ms for a, b in zip(outer, outer[1:]))


def test_collect_with_open_action_raises(host_backend):
    timer = ActionTimer("cpu")
    with timer.action("0F0"):
        with pytest.raises(RuntimeError, match="0F0"):
            timer.collect()
    assert set(timer.collect()) == {"0F0"}


def test_full_pool_drops_counts_and_warns_once(host_backend):
    timer = ActionTimer("cpu", capacity=3)
    with timer.action("ok"):
        pass
    with pytest.warns(RuntimeWarning, match="dropped") as caught:
        with timer.action("broken"):  # start takes the last slot, the end finds the pool full
            pass
        with timer.action("no-slot"):  # no slot for the start
            pass
    assert len(caught) == 1 and timer.dropped == 2
    assert set(timer.collect()) == {"ok"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with timer.action("after"):
            pass
        assert set(timer.collect()) == {"after"}
        for _ in range(3):  # the second finds no slot for its end, the third none for its start
            with timer.action("x"):
                pass
    assert timer.dropped == 4 and set(timer.collect()) == {"x"}


def test_times_restart_at_every_batch(host_backend):
    """Span times are relative to the batch (step), not to the first record ever."""
    timer = ActionTimer("cpu")
    with timer.action("first"):
        pass
    timer.collect()
    time.sleep(0.05)
    with timer.action("second"):
        time.sleep(0.002)
    (span,) = timer.collect_spans()
    assert span.start_ms == 0.0 and 2.0 - TOL_MS <= span.end_ms < 50.0


def test_exception_in_action_is_timed_and_propagates(host_backend):
    timer = ActionTimer("cpu")
    with pytest.raises(KeyError):
        with timer.action("0W1"):
            raise KeyError("x")
    assert set(timer.collect()) == {"0W1"}


def test_reset_drops_records_and_running_actions(host_backend):
    timer = ActionTimer("cpu")
    with timer.action("gone"):
        pass
    with timer.action("running"):
        timer.reset()
    assert timer.collect() == {}
    with timer.action("kept"):
        pass
    assert set(timer.collect()) == {"kept"}


@pytest.mark.parametrize("name,error", [(3, TypeError), ("", ValueError), (None, TypeError)])
def test_bad_action_name(name, error):
    with pytest.raises(error, match="action name"):
        ActionTimer("cpu").action(name)


# ---------------------------------------------------------------------------------------------------
# real GPU


@pytest.mark.gpu
@pytest.mark.parametrize("skip_cpp", ["0", "1"])
def test_gpu_action_timer_matches_torch_events(monkeypatch, skip_cpp):
    import torch

    monkeypatch.setenv("TFZ_FORCE_SKIP_CPP", skip_cpp)
    monkeypatch.delenv("TFZ_TIMER_FORCE_CPU", raising=False)
    if skip_cpp == "0" and _C is None:
        pytest.skip("tfz._C not built")
    timer = ActionTimer("cuda")
    assert timer.backend == ("python" if skip_cpp == "1" else "cuda-events")
    x = torch.randn(2048, 2048, device="cuda")
    reference = {}
    for size in (1, 4, 16):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with timer.action(f"mm{size}"):
            start.record()
            for _ in range(size):
                x = torch.tanh(x @ x * 1e-3)
            end.record()
        end.synchronize()
        reference[f"mm{size}"] = start.elapsed_time(end)
    measured = timer.collect()
    for name, ms in reference.items():
        assert measured[name] == pytest.approx(ms, rel=0.1, abs=0.05), name
    assert measured["mm16"] > measured["mm1"]


@pytest.mark.gpu
@pytest.mark.skipif(
    not _cuda_visible() or sys.modules["torch"].cuda.device_count() < 2, reason="needs two GPUs"
)
def test_gpu_timer_on_another_device_than_the_current_one():
    """A timer on cuda:1 records and resolves while cuda:0 is current, and leaves cuda:0 current."""
    import torch

    if _C is None:
        pytest.skip("tfz._C not built")
    timer = ActionTimer("cuda:1")
    x = torch.randn(1024, 1024, device="cuda:1")
    with torch.cuda.device(0):
        with timer.action("mm"):
            with torch.cuda.device(1):
                for _ in range(8):
                    x = torch.tanh(x @ x * 1e-3)
        assert torch.cuda.current_device() == 0
    assert timer.collect()["mm"] > 0
