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
from _pipe_launch_fns import (
    _Sentinel,
    destroy_group_then_return,
    leave_a_cycle,
    pause_between_heartbeats,
    raise_on,
    rank_info,
    run_hanging,
    sleep_forever,
    unpicklable_result,
    write_pid_then_sleep,
)

pytest.importorskip("torch")

import numpy as np  # noqa: E402

from tfz.pipeline import RankError, heartbeat, launch, run_from_env  # noqa: E402
from tfz.pipeline.launch import RankHangError  # noqa: E402

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
    assert "exit code 7" in str(info.value) and "before fn ran" not in str(info.value)


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
        ({"world_size": 2, "timeout": -1}, "timeout must be a finite number of seconds > 0, got -1"),
        ({"world_size": 2, "init_timeout": 0}, "init_timeout must be a finite number of seconds > 0, got 0"),
        ({"world_size": 2, "backend": ""}, "backend must be a process-group backend name"),
        (
            {"world_size": 2, "progress_timeout": 0},
            "progress_timeout must be None or a finite number of seconds > 0, got 0",
        ),
        ({"world_size": True}, "world_size must be an integer >= 1, got True"),
        ({"world_size": 2, "backend": "mpi2"}, "backend 'mpi2' is not available"),
        ({"world_size": 10**6}, r"world_size 1000000 starts 1000000 processes .* GB of memory"),
    ],
)
def test_bad_arguments(kwargs, match):
    world_size = kwargs.pop("world_size")
    with pytest.raises(ValueError, match=match):
        launch(rank_info, world_size, "x", **kwargs)
    with pytest.raises(TypeError, match="fn must be callable"):
        launch("rank_info", 2)
    with pytest.raises(TypeError, match="fn must be a function defined at module level"):
        launch(lambda rank, world: rank, 2)


def test_heartbeat_arguments_are_checked():
    heartbeat("eval", step=np.int64(3))  # outside launch: checked, then nothing happens
    with pytest.raises(TypeError, match="label must be a str or None, got 5"):
        heartbeat(5)
    with pytest.raises(ValueError, match="step must be None or an integer, got 1.5"):
        heartbeat("eval", step=1.5)


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


def test_run_from_env_frees_cycles_before_the_group_goes(monkeypatch):
    """What fn leaves in reference cycles is freed while the process group exists: gloo objects
    collected at interpreter exit abort the process."""
    import gc

    import torch.distributed as dist

    from tfz.pipeline.launch import _free_port

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    _Sentinel.freed_with_group.clear()
    gc.disable()  # only an explicit collection frees the cycle
    try:
        run_from_env(leave_a_cycle, backend="gloo")
    finally:
        gc.enable()
    assert not dist.is_initialized()
    assert _Sentinel.freed_with_group == [True]


def test_fn_may_destroy_the_process_group_itself(monkeypatch):
    import torch.distributed as dist

    from tfz.pipeline.launch import _free_port

    assert launch(destroy_group_then_return, 2, timeout=120) == [0, 10]
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    assert run_from_env(destroy_group_then_return, backend="gloo") == 0
    assert not dist.is_initialized()


def _script(folder: Path, body: str) -> Path:
    """``folder/main.py``: ``body`` after a line that lets it import this folder's rank functions."""
    script = folder / "main.py"
    script.write_text(
        f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n" + textwrap.dedent(body)
    )
    return script


def test_a_rank_dying_before_fn_ran_names_the_main_guard(tmp_path):
    body = """
        from tfz.pipeline import launch

        def fn(rank, world):
            return rank

        print(launch(fn, 2, timeout=60))  # no main guard: each spawned rank runs this line again
        """
    script = _script(tmp_path, body)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and "died without an exception (exit code 1): before fn ran" in last, last
    assert """'if __name__ == "__main__":'""" in last
    proc = subprocess.run(
        [sys.executable, "-"],
        input=textwrap.dedent(body),
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    last = proc.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        r"TypeError: fn <function fn .*> is defined in a main module read from <stdin>, .*", last
    )


def test_run_from_env_under_torchrun(tmp_path):
    script = _script(
        tmp_path,
        """
        from _pipe_launch_fns import torchrun_main
        torchrun_main()
        """,
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


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie, dead but not reaped, is not)."""
    stat = Path(f"/proc/{pid}/stat")
    if Path("/proc").is_dir():
        try:
            return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (FileNotFoundError, ProcessLookupError):
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_ranks_end_when_the_launching_process_is_killed(tmp_path):
    """SIGKILL leaves the launching process no way to stop its ranks: they end themselves."""
    script = _script(
        tmp_path,
        f"""
        from _pipe_launch_fns import {write_pid_then_sleep.__name__}
        from tfz.pipeline import launch
        if __name__ == "__main__":
            launch({write_pid_then_sleep.__name__}, 2, {str(tmp_path)!r}, timeout=600)
        """,
    )
    proc = subprocess.Popen([sys.executable, str(script)], stderr=(tmp_path / "stderr").open("w"))
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("rank*.pid"))) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "stderr").read_text()
        time.sleep(0.1)
    pids = [int(p.read_text()) for p in sorted(tmp_path.glob("rank*.pid"))]
    assert all(_running(pid) for pid in pids)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while any(_running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [pid for pid in pids if _running(pid)]
    for pid in left:
        os.kill(pid, 9)
    assert not left, f"ranks {left} outlived the process that launched them"


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


# -- hangs -------------------------------------------------------------------------------------------


def test_a_rank_hanging_in_an_action_is_named_within_the_timeout():
    """Rank 1 sleeps inside its backward of microbatch 2 in step 1; rank 0 then waits for its
    gradient. The watchdog (5 s without progress) names rank 1 and that action, long before gloo's
    60 s timeout would have blamed rank 0."""
    start = time.monotonic()
    with pytest.raises(RankHangError) as info:
        launch(run_hanging, 2, 1, "action", timeout=240, progress_timeout=5)
    elapsed = time.monotonic() - start
    err = info.value
    assert (err.rank, err.action, err.step, err.inside) == (1, "1B2", 1, True)
    assert 5 <= err.idle_s < 8
    first = str(err).splitlines()[0]
    assert first.startswith("rank 1 stopped making progress in action 1B2 of step 1;"), first
    assert "rank 0 was after action" in first
    assert elapsed < 60  # start-up of two spawned ranks, 2 steps, 5 s


def test_a_rank_hanging_between_steps_is_named():
    """Rank 1 sleeps after step 1, outside any action: its last report is the oldest (rank 0 goes on
    with step 2's forwards before it waits)."""
    with pytest.raises(RankHangError) as info:
        launch(run_hanging, 2, 1, "between", timeout=240, progress_timeout=5)
    err = info.value
    assert (err.rank, err.action, err.step, err.inside) == (1, "1B3", 1, False)
    assert "rank 1 stopped making progress after action 1B3 of step 1" in str(err)


def test_the_hang_wins_over_the_timeout_it_causes():
    """No watchdog: gloo times out rank 0's wait after init_timeout (8 s). That error is a
    consequence of rank 1's hang, which is reported, with rank 0's error after it."""
    with pytest.raises(RankHangError) as info:
        launch(run_hanging, 2, 1, "action", timeout=240, init_timeout=8, progress_timeout=None)
    err = info.value
    assert (err.rank, err.action, err.inside) == (1, "1B2", True)
    assert "then rank 0 raised" in str(err) and err.idle_s >= 4


def test_a_rank_busy_on_the_cpu_between_heartbeats_is_not_a_hang():
    """4 s without a heartbeat, with progress_timeout 1.5: computing counts as progress (gloo),
    sleeping does not (the control)."""
    assert launch(pause_between_heartbeats, 2, 4.0, True, timeout=120, progress_timeout=1.5) == [0, 1]
    with pytest.raises(RankHangError) as info:
        launch(pause_between_heartbeats, 2, 4.0, False, timeout=120, progress_timeout=1.5)
    assert info.value.idle_s >= 1.5


def test_cpu_seconds_reads_this_process_and_none_for_a_missing_one():
    import os

    from tfz.pipeline.launch import _cpu_seconds

    before = _cpu_seconds(os.getpid())
    if before is None:
        pytest.skip("no /proc here")
    end = time.process_time() + 0.3
    while time.process_time() < end:
        pass
    assert _cpu_seconds(os.getpid()) - before >= 0.2
    assert _cpu_seconds(2**22 + 12345) is None


def test_without_progress_reports_only_the_run_timeout_applies():
    """Functions that report no progress are never stopped by the watchdog."""
    with pytest.raises(TimeoutError, match=r"ranks \[0, 1\] still running after 4 s; all ranks"):
        launch(sleep_forever, 2, timeout=4, progress_timeout=1)


def test_heartbeat_is_a_no_op_outside_launch():
    from contextlib import nullcontext

    from tfz.pipeline.launch import heartbeat, in_action

    inner = nullcontext()
    assert in_action("0F0", 0, inner) is inner
    heartbeat("anything", step=3)  # nothing to report to


def test_blame_rules():
    """The watchdog's choice from the shared arrays: a rank inside an action (the earliest entered),
    else the oldest last report; a rank that never reported counts from the start."""
    import importlib
    from multiprocessing.sharedctypes import RawArray

    lm = importlib.import_module("tfz.pipeline.launch")  # the module, not the function of that name

    values, names = RawArray("d", 3 * lm._FIELDS), RawArray("c", 3 * lm._NAME_BYTES)
    watch = lm._Watch(values, names, 3, 5.0, started=100.0)
    hearts = [lm._Heart(values, names, r) for r in range(3)]
    assert not watch.armed() and watch.last_progress([0, 1, 2]) == 100.0

    def at(t, rank, name, step, inside):
        real = lm.time.monotonic
        lm.time.monotonic = lambda: t
        try:
            hearts[rank].report(name, step, inside)
        finally:
            lm.time.monotonic = real

    at(101.0, 0, "0F0", 0, 1.0)
    at(101.5, 0, None, None, 0.0)
    assert watch.armed() and watch.stalled([0, 1, 2]) == 1  # never reported: stopped first
    at(102.0, 1, "1F0", 0, 1.0)
    at(102.5, 1, None, None, 0.0)
    at(103.0, 2, "2F0", 0, 1.0)
    assert watch.stalled([0, 1, 2]) == 2 and watch.where(2) == "in action 2F0 of step 0"
    at(104.0, 0, "0F1", 0, 1.0)  # entered later than rank 2
    assert watch.stalled([0, 1, 2]) == 2
    at(105.0, 2, None, None, 0.0)
    at(105.5, 0, None, None, 0.0)
    assert watch.stalled([0, 1, 2]) == 1 and watch.where(1) == "after action 1F0 of step 0"
    assert watch.last_progress([0, 1, 2]) == 105.5
    err = watch.error(1, 6.0, watch.others([0, 1, 2], 1))
    assert str(err) == (
        "rank 1 stopped making progress after action 1F0 of step 0; no rank progressed for 6.0 s; "
        "rank 0 was after action 0F1 of step 0, rank 2 was after action 2F0 of step 0"
    )
    import pickle

    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err) and (again.rank, again.action, again.step) == (1, "1F0", 0)
