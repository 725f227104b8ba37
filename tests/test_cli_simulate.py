"""``tfz simulate`` through tfz.cli.main and once through the installed command."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tfz.cli import main
from tfz.dag import build_dag, simulate
from tfz.schedule import SCHEDULES, Action, build_schedule


def _run(capsys, *argv):
    rc = main(["simulate", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _json(capsys, *argv):
    rc, out, err = _run(capsys, *argv, "--json")
    assert rc == 0, err
    return json.loads(out)


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("P,M", [(1, 1), (2, 3), (4, 8), (5, 7)])
@pytest.mark.parametrize("times", [(), ("--f", "2", "--i", "0.5", "--w", "1.25"), ("--w", "3")])
def test_makespan_and_bubbles_closed_form(capsys, name, P, M, times):
    s = _json(capsys, "--schedule", name, "--ranks", str(P), "--microbatches", str(M), *times)
    t = {"f": 1.0, "i": 1.0, "w": 1.0}  # documented defaults
    t.update({k.lstrip("-"): float(v) for k, v in zip(times[::2], times[1::2])})
    step = t["f"] + t["i"] + t["w"]
    assert s["makespan"] == pytest.approx((M + P - 1) * step, rel=1e-12)
    assert s["num_actions"] == 2 * P * M
    assert len(s["bubble_ratio"]) == P
    if name == "1f1b":
        np.testing.assert_allclose(s["bubble_ratio"], (P - 1) / (M + P - 1), rtol=1e-12, atol=1e-15)
    # the critical path is a chain of back-to-back actions summing to the makespan
    cp = [Action.parse(a) for a in s["critical_path"]]
    dur = {"F": t["f"], "B": t["i"] + t["w"]}
    assert sum(dur[a.kind] for a in cp) == pytest.approx(s["makespan"], rel=1e-12)
    assert cp[0] == Action(0, "F", 0)


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
def test_gap_adds_two_per_slot(capsys, name):
    """Each of the M + P - 1 slots holds one F and one B: a gap g on every action adds 2g per slot."""
    base = ["--schedule", name, "--ranks", "3", "--microbatches", "5", "--f", "2"]
    s = _json(capsys, *base, "--gap", "0.4")
    assert s["gap_ms"] == 0.4 and _json(capsys, *base)["gap_ms"] == 0.0
    assert s["makespan"] == pytest.approx(7 * (2 + 1 + 1 + 2 * 0.4), rel=1e-12)


def test_profile_file(capsys, tmp_path):
    profile = {
        "format": "tfz-profile",
        "version": 1,
        "stages": {"0": {"F": 1.0, "I": 1.0, "W": 1.0}, "2": {"F": 3.0, "B": 4.0, "B_frozen": 1.0}},
        "default": {"F": 0.5, "I": 0.5, "W": 0.25},
        "actions": {"1F2": {"unfrozen": 2.0}},
    }
    path = tmp_path / "p.json"
    path.write_text(json.dumps(profile))
    s = _json(capsys, "--schedule", "1f1b", "--ranks", "3", "--microbatches", "4", "--profile", str(path))
    # reference: durations written out by hand, simulated by tfz.dag
    dag = build_dag(build_schedule("1f1b", 3, 4))
    table = {0: {"F": 1.0, "B": 2.0}, 1: {"F": 0.5, "B": 0.75}, 2: {"F": 3.0, "B": 4.0}}
    d = {str(a): table[a.stage][a.kind] for a in dag.actions}
    d["1F2"] = 2.0
    ref = simulate(dag, d)
    assert s["makespan"] == pytest.approx(ref.makespan, rel=1e-12)
    np.testing.assert_allclose(s["bubble_ratio"], ref.bubble_ratio, rtol=1e-12)
    assert s["critical_path"] == [str(a) for a in ref.critical_path]


def test_summary_trace_and_png(capsys, tmp_path):
    trace, png = tmp_path / "t.json", tmp_path / "t.png"
    rc, out, err = _run(
        capsys,
        "--schedule",
        "1f1b",
        "--ranks",
        "4",
        "--microbatches",
        "8",
        "--trace",
        str(trace),
        "--png",
        str(png),
    )
    assert rc == 0 and err == ""
    assert "makespan: 33 ms" in out  # (8 + 4 - 1) * (1 + 1 + 1)
    assert out.count("27.3%") == 5  # 3/11 on each of the 4 ranks, and the mean
    assert "64 actions" in out and "0F0" in out and "0B7" in out
    events = json.loads(trace.read_text())["traceEvents"]
    assert sum(e["ph"] == "X" for e in events) == 64
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("name", SCHEDULES)
def test_every_schedule(capsys, name):
    """Every listed schedule simulates like tfz.dag with uniform times (skipped until it has a builder)."""
    P, M = 4, 8
    try:
        sched = build_schedule(name, P, M)
    except ValueError as exc:
        if "unknown schedule" in str(exc):
            pytest.skip(f"{name} has no builder yet")
        raise
    s = _json(
        capsys,
        "--schedule",
        name,
        "--ranks",
        str(P),
        "--microbatches",
        str(M),
        "--f",
        "1",
        "--i",
        "2",
        "--w",
        "0.5",
    )
    dag = build_dag(sched)
    ref = simulate(dag, {str(a): {"F": 1.0, "I": 2.0, "W": 0.5, "B": 2.5}[a.kind] for a in dag.actions})
    assert s["num_actions"] == sched.num_actions
    assert s["makespan"] == pytest.approx(ref.makespan, rel=1e-12)
    assert s["stages_per_rank"] == sched.stages_per_rank
    # each rank does 3.5 ms of work per (stage, microbatch) it holds
    assert s["makespan"] >= 3.5 * M * sched.stages_per_rank - 1e-9


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--schedule", "pipedream", "--ranks", "2", "--microbatches", "4"], "invalid choice: 'pipedream'"),
        (["--schedule", "1f1b", "--ranks", "0", "--microbatches", "4"], "--ranks"),
        (["--schedule", "1f1b", "--ranks", "two", "--microbatches", "4"], "--ranks"),
        (["--schedule", "1f1b", "--ranks", "4", "--microbatches", "3"], "needs at least 4 microbatches"),
        (["--schedule", "1f1b", "--ranks", "4", "--microbatches", "0"], "--microbatches"),
        (["--schedule", "1f1b", "--ranks", "4", "--microbatches", "4", "--f", "0"], "--f"),
        (["--schedule", "1f1b", "--ranks", "4", "--microbatches", "4", "--i", "-1"], "--i"),
        (["--schedule", "1f1b", "--ranks", "4", "--microbatches", "4", "--w", "nan"], "--w"),
        (["--schedule", "1f1b", "--ranks", "4", "--microbatches", "4", "--w", "inf"], "--w"),
        (
            ["--schedule", "gpipe", "--ranks", "4", "--microbatches", "4", "--stages-per-rank", "2"],
            "stages per rank",
        ),
        (
            ["--schedule", "1f1b", "--ranks", "2", "--microbatches", "4", "--profile", "MISSING"],
            "cannot read profile",
        ),
        (
            ["--schedule", "1f1b", "--ranks", "2", "--microbatches", "4", "--profile", "BAD", "--f", "2"],
            "--f",
        ),
        (
            ["--schedule", "1f1b", "--ranks", "2", "--microbatches", "4", "--profile", "BAD"],
            "stages.0.W_frozen",
        ),
        (["--schedule", "1f1b", "--ranks", "2", "--microbatches", "4", "--profile", "SHORT"], "stage 1"),
        (["--ranks", "2", "--microbatches", "4"], "--schedule"),
        (["--schedule", "1f1b", "--ranks", "2", "--microbatches", "4", "--gap", "nan"], "--gap"),
    ],
)
def test_bad_input_exit_2_one_line(capsys, tmp_path, argv, message):
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(
            {"format": "tfz-profile", "version": 1, "stages": {"0": {"F": 1, "I": 1, "W": 1, "W_frozen": 2}}}
        )
    )
    short = tmp_path / "short.json"
    short.write_text(
        json.dumps({"format": "tfz-profile", "version": 1, "stages": {"0": {"F": 1, "I": 1, "W": 1}}})
    )
    files = {"MISSING": str(tmp_path / "missing.json"), "BAD": str(bad), "SHORT": str(short)}
    argv = [files.get(a, a) for a in argv]
    try:
        rc, out, err = _run(capsys, *argv)
    except SystemExit as exc:  # argparse errors exit through the parser
        rc = exc.code
        out, err = capsys.readouterr()
    assert rc == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("tfz simulate: error:"), err
    assert message in err and "Traceback" not in err


def _tfz_command() -> str:
    exe = Path(sys.executable).with_name("tfz")
    if not exe.exists():
        pytest.skip("the tfz command is not installed next to this Python")
    return str(exe)


def test_installed_command(tmp_path):
    tfz = _tfz_command()
    ok = subprocess.run(
        [tfz, "simulate", "--schedule", "gpipe", "--ranks", "3", "--microbatches", "5", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["makespan"] == pytest.approx(7 * 3.0)
    bad = subprocess.run(
        [tfz, "simulate", "--schedule", "1f1b", "--ranks", "4", "--microbatches", "2", "--f", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2
    assert bad.stdout == ""
    assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    assert "needs at least 4 microbatches" in bad.stderr
