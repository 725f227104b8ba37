"""tfz demo: the report's arithmetic on hand-made records, and a shortened run of every method."""

import json

import numpy as np
import pytest
from _pipe_workers import skip_unrunnable

from tfz.demo import METHODS, DemoConfig, run_demo
from tfz.demo.report import build_report

TINY = dict(
    dim=32,
    layers_per_stage=1,
    n_heads=2,
    ffn_dim=64,
    seq_len=16,
    microbatches=4,
    microbatch_size=2,
    phase_unit=2,
    check_every=1,
    block_rows=8,
    eval_every=4,
    eval_batches=1,
    lr_warmup=2,
)


def _records(step_ms, phases, losses, frozen_by_stage):
    return [
        {
            "step": i,
            "step_ms": step_ms[i],
            "pipeline_ms": step_ms[i] * 0.9,
            "loss": losses[i],
            "phase": phases[i],
            "frozen_fraction": {s: f[i] for s, f in frozen_by_stage.items()},
            "w_skipped": {},
            "predicted_ms": 40.0 if phases[i] == "stable" else None,
        }
        for i in range(len(step_ms))
    ]


def _rank(method_records, evals):
    return {
        m: {
            "records": recs,
            "evals": evals.get(m, []),
            "spans": {},
            "span_ratios": {},
            "history": [],
            "plan": None,
            "timeline_durations": None,
        }
        for m, recs in method_records.items()
    }


def test_report_arithmetic_against_hand_values():
    cfg = DemoConfig(steps=4, ranks=2, methods=("none", "timelyfreeze"), **TINY)
    phases = ["warmup", "ramp", "stable", "stable"]
    none0 = _records([100, 100, 100, 110], ["-"] * 4, [None] * 4, {0: [0, 0, 0, 0]})
    tf0 = _records([100, 90, 80, 80], phases, [None] * 4, {0: [0, 0.2, 0.8, 0.6]})
    none1 = _records([101, 99, 100, 108], ["-"] * 4, [3.0, 2.8, 2.6, 2.4], {1: [0, 0, 0, 0]})
    tf1 = _records([99, 91, 81, 79], phases, [3.0, 2.9, 2.7, 2.5], {1: [0, 0.1, 0.4, 0.2]})
    evals = {
        "none": [{"step": 2, "val_loss": 2.9, "val_acc": 0.1}, {"step": 4, "val_loss": 2.5, "val_acc": 0.2}],
        "timelyfreeze": [
            {"step": 2, "val_loss": 2.95, "val_acc": 0.1},
            {"step": 4, "val_loss": 2.52, "val_acc": 0.2},
        ],
    }
    results = [
        _rank({"none": none0, "timelyfreeze": tf0}, {}),
        _rank({"none": none1, "timelyfreeze": tf1}, evals),
    ]
    report, _ = build_report(results, cfg)
    assert report["config"]["window_steps"] == [2, 4]  # both stable steps
    none, tf = report["methods"]["none"], report["methods"]["timelyfreeze"]
    tokens = cfg.tokens_per_step
    assert none["tokens_per_s"] == pytest.approx(2 * tokens / ((100 + 110) / 1e3))  # max over ranks per step
    assert tf["tokens_per_s"] == pytest.approx(2 * tokens / ((81 + 80) / 1e3))
    assert tf["throughput_gain"] == pytest.approx((100 + 110) / (81 + 80))
    assert tf["mean_freeze_ratio"] == pytest.approx([0.7, 0.3])
    assert tf["val_loss"] == 2.52 and tf["batch_time_predicted_ms"] == 40.0
    assert tf["batch_time_measured_ms"] == pytest.approx(np.median([81 * 0.9, 80 * 0.9]))
    assert tf["train_loss"] == pytest.approx(np.mean([3.0, 2.9, 2.7, 2.5]))
    # none reaches its own final loss at its last eval; timelyfreeze never goes below 2.5
    assert none["time_to_target_s"] == pytest.approx((101 + 100 + 100 + 110) / 1e3)
    assert tf["time_to_target_s"] is None
    goals = report["goals"]
    assert goals["val_loss_vs_none"]["value"] == pytest.approx(2.52 / 2.5 - 1)
    assert goals["val_loss_vs_none"]["met"] is True
    assert goals["throughput_gain"]["met"] is ((100 + 110) / (81 + 80) >= 1.25)
    assert none["batch_time_ms_per_step"] == pytest.approx([0.9 * v for v in (101, 100, 100, 110)])
    assert tf["predicted_ms_per_step"] == [None, None, 40.0, 40.0]
    assert "none_batch_time_shift" not in goals["prediction_vs_measured"]  # no unfrozen monitoring here
    # with a monitored step: no freezing's own batch time over the window vs during the monitoring
    tf0[0]["phase"] = "monitor_upper"
    report, _ = build_report(results, cfg)
    shift = report["goals"]["prediction_vs_measured"]["none_batch_time_shift"]
    assert shift == pytest.approx(np.median([0.9 * 100, 0.9 * 110]) / (0.9 * 101) - 1)


def test_config_errors():
    with pytest.raises(ValueError, match="unknown method"):
        DemoConfig(methods=("none", "magic"))
    with pytest.raises(ValueError, match="unknown schedule 'x'"):
        DemoConfig(schedule="x")
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        DemoConfig(steps=0)


@pytest.mark.distributed
def test_shortened_demo_runs_every_method(tmp_path):
    cfg = DemoConfig(steps=18, methods=METHODS, out=str(tmp_path), timeout=300, **TINY)
    report = run_demo(cfg)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["methods"].keys() == set(METHODS) and report["config"]["steps"] == 18
    for name, m in saved["methods"].items():
        for key in (
            "tokens_per_s",
            "throughput_gain",
            "mean_freeze_ratio",
            "train_loss",
            "val_loss",
            "val_acc",
            "time_to_target_s",
            "batch_time_measured_ms",
            "batch_time_predicted_ms",
        ):
            assert key in m, (name, key)
        assert len(m["mean_freeze_ratio"]) == 2 and all(0 <= r <= 1 for r in m["mean_freeze_ratio"])
        assert 0 < m["val_loss"] < np.log(256) + 0.5 and 0 <= m["val_acc"] <= 1
        assert m["train_loss"] < np.log(256) + 0.5
    assert saved["methods"]["none"]["mean_freeze_ratio"] == [0.0, 0.0]
    assert saved["methods"]["none"]["throughput_gain"] == pytest.approx(1.0)
    assert saved["methods"]["none"]["batch_time_predicted_ms"] is None
    tf = saved["methods"]["timelyfreeze"]
    assert tf["batch_time_predicted_ms"] > 0
    # the lower-bound window freezes part of every stage: microbatches take turns over the monitoring
    # ratios (0.4, 0.8), so each stage's mean is about 0.6 and every step still trains
    lower = [i for i, p in enumerate(tf["phase_per_step"]) if p == "monitor_lower"]
    assert lower and all(abs(r - 0.6) < 0.1 for i in lower for r in tf["freeze_ratio_per_step"][i])
    for name in METHODS:
        assert len(saved["methods"][name]["freeze_ratio_per_step"]) == 18
    assert [p[1] for p in tf["phases"]][:3] == ["monitor_upper", "monitor_lower", "solving"]
    for f in (
        "report.md",
        "loss_vs_time.png",
        "batch_time.png",
        "timeline_before.png",
        "timeline_after.png",
        "trace_after.json",
    ):
        assert (tmp_path / f).stat().st_size > 0, f
    trace = json.loads((tmp_path / "trace_after.json").read_text())
    assert sum(e.get("ph") == "X" for e in trace["traceEvents"]) == 2 * 4 * 2
    assert "| timelyfreeze+autofreeze |" in (tmp_path / "report.md").read_text()


@pytest.mark.distributed
@skip_unrunnable("zbv")
def test_validation_agrees_across_stage_placements(tmp_path):
    """Loop (interleaved1f1b) and V (zbv) placements of the same 4 stages train the same model on the same
    batches; their validation, run stage after stage across the ranks, must agree."""
    evals = {}
    for name in ("interleaved1f1b", "zbv"):
        cfg = DemoConfig(
            schedule=name, steps=2, methods=("none",), out=str(tmp_path / name), timeout=300, **TINY
        )
        evals[name] = run_demo(cfg)["methods"]["none"]["evals"]
    a, b = evals["interleaved1f1b"], evals["zbv"]
    assert [e["step"] for e in a] == [e["step"] for e in b] == [2]
    assert a[0]["val_loss"] == pytest.approx(b[0]["val_loss"], rel=1e-5)
    assert a[0]["val_acc"] == pytest.approx(b[0]["val_acc"], abs=1e-3)


def test_phase_unit_too_short_for_timelyfreeze():
    with pytest.raises(ValueError, match=r"TimelyFreeze settings \(phase_unit 1\): discard_steps \(1\)"):
        DemoConfig(phase_unit=1)
    assert DemoConfig(phase_unit=1, methods=("none", "apf")).phase_unit == 1
