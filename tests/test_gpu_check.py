"""bench/gpu_check.sh rehearsed on the CPU (GPU_CHECK_FAKE_DEVICE=1): stage order, the report written
after every stage and when the run is killed, per-stage time limits, the budget, no-GPU skipping."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh"
STAGES = ["gpu-env", "install", "gpu-smoke", "gpu-bench", "gpu-tests"]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPU_CHECK_", "TFZ_BENCH", "TFZ_FAKE"))}
    env.pop("TRITON_INTERPRET", None)
    env["PYTHON"] = sys.executable
    env.update(extra)
    return env


def _run(out: Path, timeout=600, **extra) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), str(out)], env=_env(**extra), capture_output=True, text=True, timeout=timeout
    )


def _status(results: str) -> dict[str, str]:
    """stage -> status, in the order of the report's rows."""
    rows = {}
    for line in results.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 4 and cells[0] in STAGES:
            rows[cells[0]] = cells[1]
    return rows


def _sections(log: str) -> list[str]:
    return [line.split()[1] for line in log.splitlines() if line.startswith("===== ")]


def test_rehearsal_runs_every_stage_benchmarks_first(tmp_path):
    """Every stage in order, the benchmarks before the test tail; a stage over its time limit is a
    timeout and the next stage still runs."""
    proc = _run(tmp_path, GPU_CHECK_FAKE_DEVICE="1", GPU_CHECK_LIMITS="gpu-smoke=1")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-2000:]
    results = (tmp_path / "results.md").read_text()
    want = [(s, "FAILED (timeout)" if s == "gpu-smoke" else "ok") for s in STAGES]
    assert list(_status(results).items()) == want
    assert _sections((tmp_path / "gpu_check.log").read_text()) == STAGES  # the bench before the test tail
    assert "rehearsal on the CPU" in results
    assert "time(r) / time(0)" in results and "Per-call cost" in results
    assert (tmp_path / "bench-gpu.json").exists() and (tmp_path / "bench-gpu.jsonl").read_text().count(
        "\n"
    ) >= 10


def test_killed_run_still_reports(tmp_path):
    """SIGTERM while the benchmarks run: the report marks the stage killed and keeps what it measured."""
    proc = subprocess.Popen(
        ["bash", str(SCRIPT), str(tmp_path)],
        env=_env(GPU_CHECK_FAKE_DEVICE="1", GPU_CHECK_STAGES="gpu-bench"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    record = tmp_path / "bench-gpu.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (record.exists() and record.read_text().count("\n") >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    results = (tmp_path / "results.md").read_text()
    assert "| gpu-bench | NOT FINISHED" in results
    assert _status(results)["gpu-env"] == "skipped (not selected)"
    assert "time(r) / time(0)" in results  # the measurements made before the kill


def test_spent_budget_skips_the_rest(tmp_path):
    proc = _run(tmp_path, GPU_CHECK_FAKE_DEVICE="1", GPU_CHECK_BUDGET_S="14")
    assert proc.returncode == 0
    status = _status((tmp_path / "results.md").read_text())
    assert all(status[s] == "skipped (budget)" for s in STAGES)


@pytest.mark.skipif(
    subprocess.run([sys.executable, "-c", "import torch; assert not torch.cuda.is_available()"]).returncode
    != 0,
    reason="a GPU is visible",
)
def test_without_a_gpu_only_the_environment_is_reported(tmp_path):
    proc = _run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:]
    status = _status((tmp_path / "results.md").read_text())
    assert status["gpu-env"] == "ok"
    assert all(status[s] == "skipped (no GPU)" for s in STAGES[1:])


def test_the_bench_stage_lists_every_gpu_benchmark_file():
    listed = re.search(r'^GPU_BENCH="([^"]+)"', SCRIPT.read_text(), re.MULTILINE).group(1).split()
    with_gpu = sorted(
        f"bench/{p.name}" for p in (SCRIPT.parent).glob("bench_*.py") if "mark.gpu" in p.read_text()
    )
    assert sorted(listed) == with_gpu
