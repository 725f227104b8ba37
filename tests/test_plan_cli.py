"""``tfz plan``: JSON output against the library and the DAG simulation, files, errors."""

import json

import numpy as np
import pytest

from tfz.cli import main
from tfz.dag import build_dag, simulate
from tfz.schedule import build_schedule


def _run(capsys, *argv):
    rc = main(["plan", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_json_output(capsys):
    rc, out, _ = _run(
        capsys, "--schedule", "1f1b", "--ranks", "3", "--microbatches", "6",
        "--f", "1", "--i", "1.5", "--w", "2", "--w-frozen", "0.5", "--json",
    )  # fmt: skip
    assert rc == 0
    d = json.loads(out)
    for key in (
        "makespan_unfrozen",
        "makespan_all_frozen",
        "makespan_planned",
        "ratios",
        "stage_mean_ratio",
        "solve_seconds",
    ):
        assert key in d
    dag = build_dag(build_schedule("1f1b", 3, 6))
    kinds = np.array([a.kind for a in dag.actions])
    up = np.where(kinds == "B", 3.5, 1.0)
    low = np.where(kinds == "B", 2.0, 1.0)
    assert d["makespan_unfrozen"] == pytest.approx((6 + 3 - 1) * 4.5)
    assert d["makespan_all_frozen"] == pytest.approx((6 + 3 - 1) * 3.0)
    r = np.array([d["ratios"][name] for name in dag.names])
    assert d["makespan_planned"] == pytest.approx(simulate(dag, up - r * (up - low)).makespan, rel=1e-12)
    assert len(d["stage_mean_ratio"]) == 3
    assert max(d["stage_mean_ratio"]) <= 0.8 + 1e-9
    assert d["makespan_all_frozen"] <= d["makespan_planned"] < d["makespan_unfrozen"]


def test_gap_is_added_to_every_action(capsys):
    """1F1B with uniform times and a gap g: every one of the M + P - 1 slots of F and B gains 2g, and the
    plan is the LP's on the times plus g."""
    from tfz.plan import PlanConfig, solve

    argv = ["--schedule", "1f1b", "--ranks", "3", "--microbatches", "6", "--w", "2", "--w-frozen", "0.5"]
    rc, out, _ = _run(capsys, *argv, "--gap", "0.25", "--json")
    d = json.loads(out)
    assert rc == 0 and d["gap_ms"] == 0.25
    assert d["makespan_unfrozen"] == pytest.approx(8 * (1 + 3 + 0.5))
    assert d["makespan_all_frozen"] == pytest.approx(8 * (1 + 1.5 + 0.5))
    dag = build_dag(build_schedule("1f1b", 3, 6))
    up = np.where(dag.kind_mask("B"), 3.0, 1.0) + 0.25
    low = np.where(dag.kind_mask("B"), 1.5, 1.0) + 0.25
    ref = solve(dag, up, low, PlanConfig())
    assert d["makespan_planned"] == pytest.approx(ref.makespan_planned, rel=1e-9)
    assert json.loads(_run(capsys, *argv, "--json")[1])["gap_ms"] == 0.0
    text = _run(capsys, *argv, "--gap", "0.25")[1]
    assert "every time above includes 0.25 ms between actions (--gap)" in text


def test_cap_zero_and_generic_solver(capsys):
    base = ["--schedule", "gpipe", "--ranks", "2", "--microbatches", "3", "--json"]
    rc, out, _ = _run(capsys, *base, "--max-freeze-ratio", "0")
    d = json.loads(out)
    assert rc == 0 and d["makespan_planned"] == d["makespan_unfrozen"]
    assert set(d["ratios"].values()) == {0.0}
    rc, out_s, _ = _run(capsys, *base, "--max-freeze-ratio", "0.5")
    rc2, out_g, _ = _run(capsys, *base, "--max-freeze-ratio", "0.5", "--solver", "generic")
    s, g = json.loads(out_s), json.loads(out_g)
    assert s["makespan_planned"] == pytest.approx(g["makespan_planned"], rel=1e-9)
    assert s["total_ratio"] == pytest.approx(g["total_ratio"], rel=1e-9)


def test_profile_and_files(capsys, tmp_path):
    from tfz.profile import Profile

    prof = tmp_path / "p.json"
    Profile.uniform(1.0, 1.0, 2.0, 0.25).save(prof)
    trace, png = tmp_path / "t.json", tmp_path / "t.png"
    rc, out, _ = _run(
        capsys, "--schedule", "zbh1", "--ranks", "3", "--microbatches", "4", "--profile", str(prof),
        "--trace", str(trace), "--png", str(png),
    )  # fmt: skip
    assert rc == 0
    assert "makespan planned" in out
    events = json.loads(trace.read_text())["traceEvents"]
    ratios = [
        e["args"].get("freeze_ratio") for e in events if e.get("ph") == "X" and "W" in e.get("name", "")
    ]
    assert ratios and all(r is not None and 0 <= r <= 1 for r in ratios)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_actions_that_cannot_gain_are_named(capsys, tmp_path):
    """A stage whose W takes as long frozen as unfrozen: its W actions are listed and its mean is 0."""
    from tfz.profile import Profile, StageTimes

    prof = tmp_path / "p.json"
    stages = {s: StageTimes(f=1.0, i=1.0, w=1.0, w_frozen=1.0 if s == 1 else 0.2) for s in range(3)}
    Profile(stages=stages).save(prof)
    base = ["--schedule", "zbh1", "--ranks", "3", "--microbatches", "4", "--profile", str(prof)]
    rc, out, _ = _run(capsys, *base)
    assert rc == 0
    dag = build_dag(build_schedule("zbh1", 3, 4))
    stuck = [str(a) for a in dag.actions if a.kind == "W" and a.stage == 1]
    line = next(x for x in out.splitlines() if x.startswith("cannot gain from freezing"))
    assert f"{len(stuck)} actions: " in line
    rc, out, _ = _run(capsys, *base, "--json")
    d = json.loads(out)
    assert sorted(d["cannot_gain"]) == sorted(stuck)
    assert d["stage_mean_ratio"][1] == 0.0 and all(d["ratios"][n] == 0.0 for n in stuck)


def test_makespan_slack(capsys):
    """The budget (1 + X) T* is used in full, with less freezing; the text says so."""
    base = ["--schedule", "1f1b", "--ranks", "3", "--microbatches", "6", "--w", "2", "--w-frozen", "0.5"]
    exact = json.loads(_run(capsys, *base, "--json")[1])
    rc, out, _ = _run(capsys, *base, "--makespan-slack", "0.1", "--json")
    slack = json.loads(out)
    assert rc == 0 and slack["makespan_slack"] == 0.1 and exact["makespan_slack"] == 0.0
    assert slack["makespan_planned"] == pytest.approx(1.1 * exact["makespan_planned"], rel=1e-9)
    assert slack["total_ratio"] < exact["total_ratio"]
    text = _run(capsys, *base, "--makespan-slack", "0.1")[1]
    assert "makespan budget:     (1 + 0.1) x the shortest" in text


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--makespan-slack", "2"], "--makespan-slack"),
        (["--max-freeze-ratio", "1.5"], "--max-freeze-ratio"),
        (["--max-freeze-ratio", "nan"], "--max-freeze-ratio"),
        (["--w", "1", "--w-frozen", "2"], "--w-frozen"),
        (["--f", "-1"], "--f"),
        (["--gap", "-0.5"], "--gap"),
        (["--gap", "inf"], "--gap"),
        (["--profile", "/nonexistent/p.json"], "cannot read profile"),
    ],
)
def test_errors_exit_2_one_line(capsys, argv, needle):
    with pytest.raises(SystemExit) as info:
        rc = main(["plan", "--schedule", "1f1b", "--ranks", "2", "--microbatches", "2", *argv])
        raise SystemExit(rc)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert needle in err
    assert len(err.strip().splitlines()) == 1


def test_a_large_plan_says_so_on_stderr_first(capsys, monkeypatch):
    import tfz.cli.plan

    argv = ("--schedule", "1f1b", "--ranks", "2", "--microbatches", "4", "--json")
    rc, out, err = _run(capsys, *argv)
    assert rc == 0 and err == ""
    monkeypatch.setattr(tfz.cli.plan, "LARGE_PLAN", 16)  # 2 ranks x 4 microbatches x (F, B)
    rc, again, err = _run(capsys, *argv)
    assert rc == 0 and err == "tfz plan: solving for 16 actions (seconds to a minute at this size)\n"
    assert json.loads(again)["ratios"] == json.loads(out)["ratios"]
