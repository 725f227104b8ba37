"""tfz.pipeline.launch: results come back by rank; a failing rank ends the run with its error, promptly;
a run over its time limit is killed; argument errors; the same function under torchrun."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from _pipe_launch_fns import raise_on, rank_info, sleep_forever, unpicklable_result

pytest.importorskip("torch")

from tfz.pipeline import RankError, launch, run_from_env  # noqa: E402

pytestmark = pytest.mark.distributed


def test_results_by_rank():
    out = launch(rank_info, 3, "x", timeout=120)
    assert [r["rank"] for r in out] == [0, 1, 2]
    for r, info in enumerate(out):
        assert info["world"] == 3 and info["tag"] == "x"
        assert info["env"] == (str(r), "3", str(r))
        assert info["dist"] == (r, 3)
        assert info["sum"] == 1 + 2 + 3  # the process group works
        assert info["tensor"].tolist() == [0, r, 2 * r]


@pytest.mark.parametrize(
    ("kind", "exc_type", "message"),
    [
        ("value", "ValueError", "bad value on rank 1"),
        ("custom", "_pipe_launch_fns.CustomError", "custom failure"),
    ],
)
def test_raising_rank_ends_the_run_with_its_error(kind, exc_type, message):
    start = time.monotonic()
    with pytest.raises(RankError) as info:
        launch(raise_on, 3, 1, kind, timeout=120)
    assert time.monotonic() - start < 40  # the blocked ranks were stopped, not waited for
    err = info.value
    assert (err.rank, err.exc_type, err.exc_message) == (1, exc_type, message)
    assert "raise_on" in err.remote_traceback and "Traceback" in err.remote_traceback
    assert f"rank 1 raised {exc_type}: {message}" in str(err)
    assert type(err.__cause__).__name__ == exc_type.rpartition(".")[2]


def test_rank_dying_without_exception():
    with pytest.raises(RankError) as info:
        launch(raise_on, 2, 0, "exit", timeout=120)
    assert info.value.rank == 0 and info.value.exitcode == 7 and info.value.exc_type is None
    assert "exit code 7" in str(info.value)


def test_timeout_kills_every_rank():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ranks \[0, 1\] still running after 4 s"):
        launch(sleep_forever, 2, timeout=4)
    assert time.monotonic() - start < 20


def test_unpicklable_result_is_reported():
    with pytest.raises(RankError) as info:
        launch(unpicklable_result, 1, timeout=120)
    assert info.value.rank == 0 and "pickle" in (info.value.exc_type + info.value.exc_message).lower()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"world_size": 0}, "world_size must be an integer >= 1, got 0"),
        ({"world_size": 2.0}, "world_size must be an integer >= 1, got 2.0"),
        ({"world_size": 2, "timeout": -1}, "timeout must be a number of seconds > 0, got -1"),
        ({"world_size": 2, "init_timeout": 0}, "init_timeout must be a number of seconds > 0, got 0"),
        ({"world_size": 2, "backend": ""}, "backend must be a process-group backend name"),
    ],
)
def test_bad_arguments(kwargs, match):
    world_size = kwargs.pop("world_size")
    with pytest.raises(ValueError, match=match):
        launch(rank_info, world_size, "x", **kwargs)
    with pytest.raises(TypeError, match="fn must be callable"):
        launch("rank_info", 2)


def test_run_from_env_needs_the_environment(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="environment variable RANK is not set"):
        run_from_env(rank_info, "x")
    monkeypatch.setenv("RANK", "two")
    with pytest.raises(ValueError, match="RANK must be an integer, got 'two'"):
        run_from_env(rank_info, "x")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match=r"RANK=2 is not in \[0, WORLD_SIZE=2\)"):
        run_from_env(rank_info, "x")


def test_run_from_env_under_torchrun(tmp_path):
    script = tmp_path / "main.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys
            sys.path.insert(0, {str(Path(__file__).parent)!r})
            from _pipe_launch_fns import torchrun_main
            torchrun_main()
            """
        )
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(script),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(re.findall(r"RESULT \d \d [\d.]+", proc.stdout)) == ["RESULT 0 2 3.0", "RESULT 1 2 3.0"]


def test_a_failed_start_raises_its_own_error(monkeypatch):
    """When starting a rank fails (e.g. spawn from an unguarded ``__main__``), that error surfaces,
    not one from stopping the ranks that never started."""
    import multiprocessing.context as mpc

    started = []
    real_start = mpc.SpawnProcess.start

    def start(self):
        if started:
            raise RuntimeError("start failed on purpose")
        started.append(self)
        real_start(self)

    monkeypatch.setattr(mpc.SpawnProcess, "start", start)
    with pytest.raises(RuntimeError, match="start failed on purpose"):
        launch(sleep_forever, 3, timeout=60)
    assert not started[0].is_alive()
