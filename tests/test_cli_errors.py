"""Every ``tfz`` error is exit status 2 and one line: user errors, planner failures, failed ranks and
unexpected exceptions alike; ``TFZ_DEBUG=1`` raises with the traceback; output paths are checked
before any work; plans are computed at one scale whatever the unit."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _cli import run_cli

import tfz.cli.simulate
from tfz.cli import main

BASE = ["--schedule", "1f1b", "--ranks", "4", "--microbatches", "8"]


_run = run_cli


def _one_line_error(capsys, *argv) -> str:
    code, out, err = _run(capsys, *argv)
    assert code == 2 and out == "", (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# -- the catch-all in main ---------------------------------------------------------------------------


def _raising(exc):
    def run(args):
        raise exc

    return run


@pytest.mark.parametrize(
    "exc,line",
    [
        (RuntimeError("boom\nsecond line"), "tfz simulate: error: RuntimeError: boom"),
        (KeyError("key"), "tfz simulate: error: KeyError: 'key'"),
        (MemoryError(), "tfz simulate: error: out of memory (MemoryError)"),
        (RecursionError("maximum recursion depth exceeded"), "tfz simulate: error: input nested too deeply"),
        (ValueError("\n\nbad value 3\nmore"), "tfz simulate: error: bad value 3"),
        (
            OSError(28, "No space left on device", "/dev/full"),
            "[Errno 28] No space left on device: '/dev/full'",
        ),
    ],
)
def test_unexpected_exceptions_are_one_line(capsys, monkeypatch, exc, line):
    monkeypatch.setattr(tfz.cli.simulate, "run", _raising(exc))
    monkeypatch.delenv("TFZ_DEBUG", raising=False)
    assert line in _one_line_error(capsys, "simulate", *BASE)


@pytest.mark.parametrize("flag", ["1", "true", "YES", "on"])
def test_tfz_debug_keeps_the_traceback(capsys, monkeypatch, flag):
    monkeypatch.setattr(tfz.cli.simulate, "run", _raising(ValueError("boom")))
    monkeypatch.setenv("TFZ_DEBUG", flag)
    with pytest.raises(ValueError, match="boom"):
        main(["simulate", *BASE])


@pytest.mark.parametrize("flag", ["0", "false", "off", ""])
def test_tfz_debug_off(capsys, monkeypatch, flag):
    monkeypatch.setattr(tfz.cli.simulate, "run", _raising(RuntimeError("boom")))
    monkeypatch.setenv("TFZ_DEBUG", flag)
    assert "RuntimeError: boom" in _one_line_error(capsys, "simulate", *BASE)


def test_bad_tfz_debug_value_is_named(capsys, monkeypatch):
    monkeypatch.setenv("TFZ_DEBUG", "maybe")
    line = _one_line_error(capsys, "simulate", *BASE)
    assert "TFZ_DEBUG must be 1/true/yes/on or 0/false/no/off, got 'maybe'" in line


def test_failed_rank_is_one_line(capsys, monkeypatch):
    from tfz.pipeline import RankError

    err = RankError(1, "ValueError", "bad value on rank 1", "Traceback (most recent call last):\n  ...")
    assert "\n" in str(err)
    monkeypatch.setattr(tfz.cli.simulate, "run", _raising(err))
    monkeypatch.delenv("TFZ_DEBUG", raising=False)
    assert _one_line_error(capsys, "simulate", *BASE) == (
        "tfz simulate: error: rank 1 raised ValueError: bad value on rank 1"
    )


def test_planner_failure_is_one_line(capsys, monkeypatch):
    import tfz.plan
    from tfz.plan import PlanSolveError

    def fail(*args, **kwargs):
        raise PlanSolveError("structured: planned makespan 3.02e-11 exceeds the LP optimum 2.2e-11", "failed")

    monkeypatch.setattr(tfz.plan, "solve", fail)
    line = _one_line_error(capsys, "plan", *BASE, "--f", "2e-12")
    assert "the structured planner failed for action times 2e-12 to 2 ms" in line
    assert "exceeds the LP optimum" in line


def test_a_plan_that_is_not_finite_is_refused(capsys, monkeypatch):
    import dataclasses

    import tfz.plan

    real = tfz.plan.solve

    def nan_plan(*args, **kwargs):
        return dataclasses.replace(real(*args, **kwargs), total_ratio=float("nan"))

    monkeypatch.setattr(tfz.plan, "solve", nan_plan)
    line = _one_line_error(capsys, "plan", *BASE)
    assert "the structured planner returned a plan that is not finite" in line and "nan" not in line


# -- extreme scales ----------------------------------------------------------------------------------


def _plan_json(capsys, *times):
    code, out, err = _run(capsys, "plan", *BASE, *times, "--json")
    assert code == 0, err
    return json.loads(out)


@pytest.mark.parametrize("scale", [1e-320, 1e-12, 1e-9, 1e15, 1e300])
def test_plan_is_the_same_at_any_unit(capsys, scale):
    """The issue's cases: at 1e-9 ms the planner gave 1.000x (1.295x at 1 ms), at 1e-12 and 1e15 it
    raised. The planner normalises the scale: the speedup and freezing are those of the 1 ms problem."""
    ref = _plan_json(capsys, "--f", "1", "--i", "1", "--w", "1", "--w-frozen", "0.2")
    times = [f"{v * scale:.17g}" for v in (1, 1, 1, 0.2)]
    got = _plan_json(capsys, "--f", times[0], "--i", times[1], "--w", times[2], "--w-frozen", times[3])
    rel = 1e-3 if scale < 1e-300 else 1e-9  # subnormal times carry a few significant digits
    assert got["speedup"] == pytest.approx(ref["speedup"], rel=rel)
    assert got["total_ratio"] == pytest.approx(ref["total_ratio"], rel=rel)
    for key in ("makespan_unfrozen", "makespan_planned", "makespan_all_frozen"):
        assert got[key] == pytest.approx(ref[key] * scale, rel=rel)
    assert ref["speedup"] > 1.2


def test_plan_that_overflows_is_refused(capsys):
    """Refusals name the times as given (once they named times rescaled into [1, 2) ms: 1e308 ms
    was reported as 1.11)."""
    line = _one_line_error(capsys, "plan", *BASE, "--f", "1e307", "--i", "1e307", "--w", "1e307")
    assert "makespan overflows float64 (largest duration 2e+307, of 0B3)" in line
    line = _one_line_error(capsys, "plan", *BASE, "--f", "1e308")
    assert "largest duration (1e+308, 0F0)" in line


@pytest.mark.parametrize("solver", ["structured", "generic"])
def test_plan_ratios_are_the_same_at_1e_9_ms(capsys, solver):
    """Every action's ratio at 1e-9 ms is its ratio at 1 ms, on a schedule with unequal F, I, W."""
    args = ("--schedule", "zbv", "--ranks", "4", "--microbatches", "8", "--solver", solver, "--json")
    ref = _run(capsys, "plan", *args, "--f", "1", "--i", "0.7", "--w", "1.3", "--w-frozen", "0.2")
    got = _run(capsys, "plan", *args, "--f", "1e-9", "--i", "7e-10", "--w", "1.3e-9", "--w-frozen", "2e-10")
    assert ref[0] == got[0] == 0, (ref[2], got[2])
    ref, got = json.loads(ref[1]), json.loads(got[1])
    assert got["ratios"].keys() == ref["ratios"].keys()
    for name, r in ref["ratios"].items():
        assert got["ratios"][name] == pytest.approx(r, abs=1e-9), name
    assert got["speedup"] == pytest.approx(ref["speedup"], rel=1e-12) and ref["speedup"] > 1.2


def test_simulate_extremes(capsys):
    line = _one_line_error(capsys, "simulate", *BASE, "--f", "1e308")
    assert "makespan overflows float64 (largest duration 1e+308, of 0F0)" in line
    code, out, _ = _run(
        capsys, "simulate", *BASE, "--f", "1e-320", "--i", "1e-320", "--w", "1e-320", "--json"
    )
    s = json.loads(out)
    assert code == 0 and len(s["critical_path"]) == 22 and np.all(np.isfinite(s["bubble_ratio"]))


# -- output paths, before the work -------------------------------------------------------------------


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a DAG is built or a model measured: outputs are checked before that."""
    import tfz.dag
    import tfz.measure

    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the output path was checked")

    monkeypatch.setattr(tfz.dag, "build_dag", forbidden)
    monkeypatch.setattr(tfz.measure, "profile_model", forbidden)


@pytest.mark.parametrize("command", ["simulate", "plan"])
@pytest.mark.parametrize(
    "flag,name,message",
    [
        ("--png", "out.xyz", "--png '{p}': the file name must end in .png"),
        ("--png", "out.svg", "--png '{p}': the file name must end in .png"),
        ("--trace", "out.txt", "--trace '{p}': the file name must end in .json or .json.gz"),
        ("--trace", "missing/t.json", "--trace '{p}': directory '{d}/missing' does not exist"),
        ("--png", "dir.png", "--png '{p}' is a directory"),
        ("--trace", "file.txt/t.json", "--trace '{p}': '{d}/file.txt' is not a directory"),
    ],
)
def test_timeline_paths_are_checked_first(capsys, tmp_path, no_work, command, flag, name, message):
    (tmp_path / "dir.png").mkdir()
    (tmp_path / "file.txt").write_text("")
    path = tmp_path / name
    line = _one_line_error(capsys, command, *BASE, flag, str(path))
    assert message.format(p=path, d=tmp_path) in line


def test_trace_to_dev_full_names_the_path(capsys):
    line = _one_line_error(capsys, "simulate", *BASE, "--trace", "/dev/full")
    assert "/dev/full" in line


@pytest.mark.parametrize(
    "name,message",
    [
        ("p.txt", "--out '{p}': the file name must end in .json"),
        ("missing/p.json", "--out '{p}': directory '{d}/missing' does not exist"),
        ("dir.json", "--out '{p}' is a directory"),
    ],
)
def test_profile_out_is_checked_before_measuring(capsys, tmp_path, no_work, name, message):
    (tmp_path / "dir.json").mkdir()
    path = tmp_path / name
    line = _one_line_error(capsys, "profile", "--stages", "2", "--out", str(path))
    assert message.format(p=path, d=tmp_path) in line


def test_profile_memory_estimate_refuses_what_cannot_fit(capsys, tmp_path, no_work):
    import re

    out = str(tmp_path / "p.json")
    line = _one_line_error(capsys, "profile", "--stages", "2", "--vocab-size", "1000000000", "--out", out)
    assert "vocab 1,000,000,000" in line and "GB of host memory, which has" in line
    need = float(re.search(r"needs at least ([0-9.e+]+) GB", line).group(1))
    assert need >= 256 * 10**9 * 4 / 1e9  # the output layer's float32 weights alone: 1,024 GB
    line = _one_line_error(
        capsys, "profile", "--stages", "2", "--microbatch-size", "1000000000", "--out", out
    )
    assert "microbatch 1000000000 x 128 tokens" in line and "GB of host memory" in line


def test_profile_estimate_is_below_what_a_run_holds():
    """The estimate is a lower bound: tiny's largest stage holds at least its float32 parameters."""
    from tfz.measure import ProfileConfig, estimate_bytes
    from tfz.models import PRESETS, build_stages

    config = ProfileConfig(stages=2, seq_len=16)
    host, device, params = estimate_bytes(config)
    stages = build_stages(PRESETS["tiny"], 2)
    counted = max(sum(p.numel() for p in m.parameters()) for m in stages.values())
    assert params <= counted and host == 4 * params


# -- plan size limits --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "solver,M,shown", [("structured", 40_000, "320,000 actions"), ("generic", 5_000, "40,000 actions")]
)
def test_plan_limits(capsys, solver, M, shown):
    line = _one_line_error(
        capsys, "plan", "--schedule", "1f1b", "--ranks", "4", "--microbatches", str(M), "--solver", solver
    )
    limit = {"structured": "262,144", "generic": "32,768"}[solver]
    assert f"1f1b with 4 ranks x {M} microbatches has {shown}" in line and f"the limit is {limit}" in line


@pytest.mark.parametrize(
    "argv,line",
    [
        (["demo", "--block-rows", "0"], "tfz demo: error: unrecognized arguments: --block-rows 0"),
        (["simulate", *BASE, "--fast"], "tfz simulate: error: unrecognized arguments: --fast"),
        (["--fast"], "tfz: error: unrecognized arguments: --fast"),
    ],
)
def test_unknown_arguments_are_named_by_the_command_given_them(capsys, argv, line):
    assert _one_line_error(capsys, *argv) == line


# -- inputs and outputs ------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["simulate", "plan"])
@pytest.mark.parametrize("flag", ["--trace", "--png"])
def test_an_output_naming_the_profile_is_refused(capsys, tmp_path, monkeypatch, command, flag):
    """The same file by another name too (a relative path, a hard link): the profile is never overwritten."""
    from tfz.profile import Profile

    name = "in.json" if flag == "--trace" else "in.png"
    profile = tmp_path / name
    Profile.uniform(1.0, 1.0, 1.0).save(profile)
    before = profile.read_bytes()
    (tmp_path / "sub").mkdir()
    link = tmp_path / "sub" / ("link" + profile.suffix)
    link.hardlink_to(profile)
    monkeypatch.chdir(tmp_path / "sub")
    args = ("--schedule", "1f1b", "--ranks", "2", "--microbatches", "4", "--profile", str(profile))
    for out in (str(profile), f"../{name}", link.name):
        line = _one_line_error(capsys, command, *args, flag, out)
        assert f"{flag} {out!r} is the --profile file" in line
    assert profile.read_bytes() == before


@pytest.mark.parametrize(
    "argv,flag",
    [
        (["simulate", *BASE, "--trace", ""], "--trace"),
        (["simulate", *BASE, "--png", ""], "--png"),
        (["simulate", *BASE, "--profile", ""], "--profile"),
        (["plan", *BASE, "--trace", ""], "--trace"),
        (["plan", *BASE, "--png", ""], "--png"),
        (["plan", *BASE, "--profile", ""], "--profile"),
        (["profile", "--stages", "2", "--out", ""], "--out"),
        (["demo", "--data", ""], "--data"),
        (["demo", "--base", ""], "--base"),
        (["demo", "--out", ""], "--out"),
    ],
)
def test_empty_paths_are_refused(capsys, tmp_path, monkeypatch, no_work, argv, flag):
    """An empty path is not the current folder: refused, naming the flag, and nothing is written."""
    import tfz.demo

    monkeypatch.setattr(tfz.demo, "run_demo", _raising(AssertionError("the demo started")))
    monkeypatch.chdir(tmp_path)
    line = _one_line_error(capsys, *argv)
    assert f"argument {flag}: expected a file or folder name, got ''" in line
    assert list(tmp_path.iterdir()) == []


def test_a_path_with_a_newline_is_shown_whole_in_the_one_line(capsys, tmp_path):
    path = str(tmp_path / "a\nb.txt")
    line = _one_line_error(capsys, "simulate", *BASE, "--trace", path)
    assert f"--trace {path!r}: the file name must end in .json or .json.gz" in line


@pytest.mark.parametrize("command", ["simulate", "plan"])
def test_closed_stdout_is_refused_before_the_work(capsys, tmp_path, monkeypatch, command):
    """Python sets sys.stdout to None when the command starts with it closed (``>&-``)."""
    import sys

    trace = tmp_path / "t.json"
    monkeypatch.setattr(sys, "stdout", None)
    code = main([command, *BASE, "--trace", str(trace)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"tfz {command}: error: standard output is closed" in err
    assert not trace.exists()


@pytest.mark.parametrize("command", ["simulate", "plan"])
def test_a_failed_output_leaves_every_output_as_it_was(capsys, tmp_path, command):
    """The trace fits under the file size limit, the PNG does not: neither file changes, and no
    temporary file is left."""
    from _cli import file_size_limit

    trace, png = tmp_path / "t.json", tmp_path / "g.png"
    trace.write_text("old trace")
    png.write_text("old png")
    argv = [command, "--schedule", "1f1b", "--ranks", "2", "--microbatches", "2"]
    with file_size_limit(8192):
        line = _one_line_error(capsys, *argv, "--trace", str(trace), "--png", str(png))
    assert f"File too large: {str(png)!r}" in line
    assert trace.read_text() == "old trace" and png.read_text() == "old png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.png", "t.json"]
    code, out, err = _run(capsys, *argv, "--trace", str(trace), "--png", str(png))
    assert code == 0 and f"wrote {trace}\nwrote {png}" in out, err
    assert json.loads(trace.read_text())["traceEvents"] and png.read_bytes()[:4] == b"\x89PNG"
