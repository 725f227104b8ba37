"""tfz demo: the report's arithmetic on hand-made records, config checks, and shortened runs."""

import json

import numpy as np
import pytest
from _pipe_workers import skip_unrunnable

from tfz.demo import METHODS, DemoConfig, run_demo
from tfz.demo.report import (
    build_report,
    causal_offsets,
    combine,
    markdown,
    measured_simulation,
    paired_difference,
    time_to_target,
)

TINY = dict(
    vocab_size=512,
    dim=32,
    n_heads=2,
    ffn_dim=64,
    seq_len=16,
    microbatches=4,
    microbatch_size=2,
    phase_unit=2,
    check_every=1,
    block_rows=8,
    eval_every=4,
    val_sequences=8,
    lr_warmup=2,
    base_steps=4,
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


def _rank(method_records, evals, equal_time_evals=()):
    return {
        m: {
            "records": recs,
            "evals": evals.get(m, []),
            "equal_time_evals": list(equal_time_evals) if m == "none" else [],
            "spans": {},
            "span_ratios": {},
            "history": [],
            "plan": None,
            "timeline_durations": None,
            "estimates": None,
        }
        for m, recs in method_records.items()
    }


def _eval(step, loss, seq=None):
    return {"step": step, "val_loss": loss, "val_acc": 0.1, **({"seq_loss": seq} if seq else {})}


def _two_methods(tf_final=2.52, tf_seq=(2.50, 2.54)):
    phases = ["warmup", "ramp", "stable", "stable"]
    none0 = _records([100, 100, 100, 110], ["-"] * 4, [None] * 4, {0: [0, 0, 0, 0]})
    tf0 = _records([100, 90, 80, 80], phases, [None] * 4, {0: [0, 0.2, 0.8, 0.6]})
    none1 = _records([101, 99, 100, 108], ["-"] * 4, [3.0, 2.8, 2.6, 2.4], {1: [0, 0, 0, 0]})
    tf1 = _records([99, 91, 81, 79], phases, [3.0, 2.9, 2.7, 2.5], {1: [0, 0.1, 0.4, 0.2]})
    evals = {
        "none": [_eval(0, 3.0), _eval(2, 2.9), _eval(4, 2.5, [2.4, 2.6])],
        "timelyfreeze": [_eval(0, 3.0), _eval(2, 2.95), _eval(4, tf_final, list(tf_seq))],
    }
    return [
        _rank({"none": none0, "timelyfreeze": tf0}, {}),
        _rank({"none": none1, "timelyfreeze": tf1}, evals, [_eval(3, 2.7, [2.6, 2.8])]),
    ]


def test_report_arithmetic_against_hand_values():
    cfg = DemoConfig(steps=18, ranks=2, methods=("none", "timelyfreeze"), task="pretrain", **TINY)
    report, _ = build_report(_two_methods(), cfg, seed=0)
    assert report["window_steps"] == [2, 4]  # both stable steps
    none, tf = report["methods"]["none"], report["methods"]["timelyfreeze"]
    tokens = cfg.tokens_per_step
    assert none["tokens_per_s"] == pytest.approx(2 * tokens / ((100 + 110) / 1e3))  # max over ranks per step
    assert tf["tokens_per_s"] == pytest.approx(2 * tokens / ((81 + 80) / 1e3))
    assert tf["throughput_gain"] == pytest.approx((100 + 110) / (81 + 80))
    assert tf["mean_freeze_ratio"] == pytest.approx([0.7, 0.3])
    assert tf["val_loss"] == 2.52 and tf["batch_time_predicted_ms"] == 40.0
    assert tf["batch_time_measured_ms"] == pytest.approx(np.median([81 * 0.9, 80 * 0.9]))
    assert tf["train_loss"] == pytest.approx(np.mean([3.0, 2.9, 2.7, 2.5]))
    # wall time of a step is the slowest rank's; evaluation at step 0 is at 0 s
    assert [e["wall_time_s"] for e in none["evals"]] == pytest.approx([0.0, 0.201, 0.411])
    assert [e["wall_time_s"] for e in tf["evals"]] == pytest.approx([0.0, 0.191, 0.352])
    # TimelyFreeze ends at 352 ms, between no freezing's steps 3 (301 ms; its saved weights gave 2.7)
    # and 4 (411 ms, 2.5), not on the line through its curve's points at steps 2 and 4
    w = (352 - 301) / (411 - 301)
    assert tf["none_val_loss_at_equal_time"] == pytest.approx(2.7 - w * 0.2)
    assert tf["none_equal_time_steps"] == [3, 4] and none["none_val_loss_at_equal_time"] is None
    at_seq = [(1 - w) * 2.6 + w * 2.4, (1 - w) * 2.8 + w * 2.6]  # per sequence, paired with 2.50, 2.54
    eq = tf["val_loss_vs_none_at_equal_time"]
    diffs = [2.50 - at_seq[0], 2.54 - at_seq[1]]
    assert eq["diff"] == pytest.approx(np.mean(diffs)) and eq["rel"] == pytest.approx(
        2.52 / (2.7 - w * 0.2) - 1
    )
    assert eq["se"] == pytest.approx(np.std(diffs, ddof=1) / np.sqrt(2))
    # none reaches its own final loss at its last eval; timelyfreeze never goes below 2.5
    assert none["time_to_target_s"] == pytest.approx(0.411)
    assert tf["time_to_target_s"] is None
    # paired over the two validation sequences: differences 0.10 and -0.06
    paired = tf["val_loss_vs_none"]
    assert paired["diff"] == pytest.approx(0.02) and paired["rel"] == pytest.approx(0.02 / 2.5)
    assert paired["se"] == pytest.approx(np.sqrt(2 * 0.08**2) / np.sqrt(2))
    goals = report["goals"]
    assert goals["val_loss_vs_none"]["value"] == pytest.approx(2.52 / 2.5 - 1)
    assert goals["val_loss_vs_none"]["met"] is True
    equal = goals["val_loss_vs_none_at_equal_time"]
    assert equal["value"] == pytest.approx(2.52 / tf["none_val_loss_at_equal_time"] - 1) and equal["met"]
    assert goals["throughput_gain"]["met"] is ((100 + 110) / (81 + 80) >= 1.25)
    assert none["batch_time_ms_per_step"] == pytest.approx([0.9 * v for v in (101, 100, 100, 110)])
    assert tf["predicted_ms_per_step"] == [None, None, 40.0, 40.0]
    assert "none_batch_time_shift" not in goals["prediction_vs_measured"]  # no unfrozen monitoring here


def test_report_shows_the_plans_speedup_and_its_all_frozen_ceiling():
    cfg = DemoConfig(steps=18, ranks=2, methods=("none", "timelyfreeze"), task="pretrain", **TINY)
    ranks = _two_methods()
    plan = {"speedup": 600 / 500, "makespan_unfrozen": 600.0, "makespan_all_frozen": 480.0}
    ranks[0]["timelyfreeze"]["plan"] = plan
    ranks[0]["timelyfreeze"]["gap_ms"] = 2.5
    # two stages on rank 0, one on rank 1: per rank [2 + 1, 12 + 6] and [1, 15]
    ranks[0]["timelyfreeze"]["linear_flops"] = [[2, 12], [1, 6]]
    ranks[1]["timelyfreeze"]["linear_flops"] = [[1, 15]]
    task = {"task": "pretrain", "corpus": "c", "validation": {"sequences": 8, "tokens": 128}}
    report = combine([build_report(ranks, cfg, seed=s)[0] for s in (0, 1)], cfg, {"task": task})
    # the busiest rank unfrozen (18) over the busiest frozen at 0.8: max(18 - 2.4, 15 - 0.8)
    assert report["methods"]["timelyfreeze"]["flop_bound"] == pytest.approx(18 / 15.6)
    assert report["methods"]["none"]["flop_bound"] is None
    assert f"(by the linear layers' FLOPs at most {18 / 15.6:.3f}x: the busiest rank" in markdown(report, [])
    tighter = cfg.replace(action_cap=0.5)  # each microbatch's cap below the stages': 18 / (18 - 1.5)
    assert build_report(ranks, tighter, seed=0)[0]["methods"]["timelyfreeze"]["flop_bound"] == pytest.approx(
        18 / 16.5
    )
    tf = report["methods"]["timelyfreeze"]
    assert tf["gap_ms"] == 2.5 and report["methods"]["none"]["gap_ms"] is None
    assert report["goals"]["prediction_vs_measured"]["gap_ms"] == 2.5
    assert "the plan adds 2.50 ms between actions" in markdown(report, [])
    assert tf["planned_speedup"] == pytest.approx(1.2) and tf["planned_ceiling"] == pytest.approx(1.25)
    assert report["methods"]["none"]["planned_ceiling"] is None
    goal = report["goals"]["throughput_gain"]
    assert (goal["planned"], goal["ceiling"]) == (tf["planned_speedup"], tf["planned_ceiling"])
    assert "plan's own batch speedup 1.200x; with every row of every backward frozen at most 1.250x" in (
        markdown(report, [])
    )
    # the plan's unfrozen batch beside no freezing's measured one (median of 0.9 x 100 and 0.9 x 110)
    assert tf["planned_unfrozen_ms"] == 600.0 and report["methods"]["none"]["planned_unfrozen_ms"] is None
    assert goal["none_measured_ms"] == pytest.approx(94.5) and goal["planned_unfrozen_ms"] == 600.0
    assert "whose unfrozen batch is 600 ms against no freezing's measured 94 ms)" in markdown(report, [])
    # the controller's levels, resolved: a half of TINY's phases records one step, so no 0 level
    assert report["config"]["monitor_ratios"] == [0.4, 0.8]
    assert "microbatches at freeze ratios 0.4, 0.8 in turn, after a window of unfrozen steps" in (
        markdown(report, [])
    )
    paired = cfg.replace(phase_unit=3, steps=24)
    assert paired.timelyfreeze_config(0).monitor_levels == (0.0, 0.8)
    report = combine([build_report(ranks, paired, seed=s)[0] for s in (0, 1)], paired, {"task": task})
    assert "freeze ratios 0, 0.8 in turn in the same steps, both bounds fitted" in markdown(report, [])


def test_report_shows_freezings_own_gain_over_tfz_none():
    """With tfz-none in the run, each freezing method's tokens/s over tfz-none's (the stage without
    freezing), by hand: window steps 2-3, the slowest rank's step time."""
    cfg = DemoConfig(steps=18, ranks=2, methods=("none", "tfz-none", "timelyfreeze"), task="pretrain", **TINY)
    ranks = _two_methods()
    ranks[0]["tfz-none"] = ranks[0]["none"] | {
        "records": _records([100, 96, 95, 97], ["-"] * 4, [None] * 4, {0: [0] * 4})
    }
    ranks[1]["tfz-none"] = ranks[1]["none"] | {
        "records": _records([99, 97, 94, 98], ["-"] * 4, [3.0, 2.8, 2.6, 2.4], {1: [0] * 4})
    }
    per_seed = [build_report(ranks, cfg, seed=s)[0] for s in (0, 1)]
    task = {"task": {"task": "pretrain", "corpus": "c", "validation": {"sequences": 8, "tokens": 128}}}
    m = per_seed[0]["methods"]
    assert m["timelyfreeze"]["gain_over_tfz_none"] == pytest.approx((95 + 98) / (81 + 80))
    assert m["tfz-none"]["throughput_gain"] == pytest.approx((100 + 110) / (95 + 98))
    assert m["tfz-none"]["gain_over_tfz_none"] is None and m["none"]["gain_over_tfz_none"] is None
    report = combine(per_seed, cfg, task)
    goal = report["goals"]["throughput_gain"]
    assert goal["over_tfz_none"] == pytest.approx((95 + 98) / (81 + 80))
    assert "over tfz-none, no freezing through the same stage: 1.199x" in markdown(report, [])
    # without tfz-none in the run, nothing is claimed
    two = DemoConfig(steps=18, ranks=2, methods=("none", "timelyfreeze"), task="pretrain", **TINY)
    alone = combine([build_report(_two_methods(), two, seed=0)[0]], two, task)
    assert alone["goals"]["throughput_gain"]["over_tfz_none"] is None
    assert "over tfz-none" not in markdown(alone, [])


def test_progress_lines_say_the_time_left_from_the_pace_so_far(capsys):
    from types import SimpleNamespace

    from tfz.demo.worker import _progress

    cfg = DemoConfig(steps=40, microbatches=2, microbatch_size=5, seq_len=10)  # 100 tokens a step
    record = SimpleNamespace(step_ms=50.0, loss=2.0, phase="stable")
    runs = {"none": SimpleNamespace(records=[record] * 4)}
    _progress(cfg, runs, 9, 30.0)  # not a progress step (every 2nd of 40)
    _progress(cfg, runs, 10, 33.0)  # 11 steps in 33 s: 29 left at 3 s each
    _progress(cfg, runs, 39, 120.0)
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "[  33.0s] step 11/40 (about 87 s left) | none stable: loss 2.000, 2,000 tok/s",
        "[ 120.0s] step 40/40 | none stable: loss 2.000, 2,000 tok/s",
    ]


def test_time_to_target_interpolates_the_crossing():
    cfg = DemoConfig(steps=18, ranks=2, methods=("none", "timelyfreeze"), task="pretrain", **TINY)
    report, _ = build_report(_two_methods(tf_final=2.45, tf_seq=(2.40, 2.50)), cfg, seed=0)
    tf = report["methods"]["timelyfreeze"]
    # crosses 2.5 between (0.191 s, 2.95) and (0.352 s, 2.45): 0.9 of the way
    assert tf["time_to_target_s"] == pytest.approx(0.191 + (2.95 - 2.5) / (2.95 - 2.45) * (0.352 - 0.191))
    assert tf["time_to_target_speedup"] == pytest.approx(0.411 / tf["time_to_target_s"])


def test_curve_helpers_by_hand():
    times, values = [0.0, 10.0, 30.0], [4.0, 3.0, 2.0]
    assert time_to_target(times, values, 3.5) == pytest.approx(5.0)
    assert time_to_target(times, values, 2.25) == pytest.approx(25.0)
    assert time_to_target(times, values, 4.5) == 0.0 and time_to_target(times, values, 1.9) is None
    p = paired_difference([1.0, 2.0, 3.0, 5.0], [1.0, 1.0, 2.0, 4.0])  # differences 0, 1, 1, 1
    assert p["diff"] == pytest.approx(0.75) and p["rel"] == pytest.approx(0.75 / 2.0)
    assert p["se"] == pytest.approx(0.5 / 2.0)  # sd 0.5 over 4 sequences
    with pytest.raises(ValueError, match="same >= 2 sequences"):
        paired_difference([1.0, 2.0], [1.0])


def _spans(sim, skews: list[float], latency: float = 0.0) -> list[dict]:
    """Per-rank span records of step 0 as the demo keeps them, from a simulated timeline whose rank r
    left the start barrier ``skews[r]`` ms late (its recorded times read early by that much)."""
    out = []
    for r, skew in enumerate(skews):
        rows = [("step", skew, skew)]
        for i in np.flatnonzero(sim.dag.rank == r):
            rows.append((sim.dag.names[i], sim.start[i] + latency * i, sim.end[i] + latency * i))
        out.append({0: rows})
    return out


@pytest.mark.parametrize("schedule, ranks", [("1f1b", 2), ("1f1b", 4), ("zbv", 2), ("interleaved1f1b", 2)])
@pytest.mark.parametrize("skew", [3.0, -2.0])
def test_measured_timelines_are_aligned_by_causality(schedule, ranks, skew):
    """simulate() gives a timeline whose cross-rank edges are tight: a barrier skew on the last rank
    is undone exactly (up to one shift of the whole timeline), and no action starts before an input
    from another rank has ended."""
    from tfz.dag import build_dag, simulate
    from tfz.schedule import build_schedule

    dag = build_dag(build_schedule(schedule, ranks, 4))
    rng = np.random.default_rng(ranks)
    sim = simulate(dag, rng.uniform(5.0, 20.0, dag.num_actions))
    skews = [0.0] * (ranks - 1) + [skew]
    barrier_only = _spans(sim, skews)
    measured = measured_simulation(dag, barrier_only, 0)
    moved = measured.start - sim.start
    assert np.allclose(moved, moved[0]) and np.allclose(measured.end - sim.end, moved[0])
    assert moved[0] == pytest.approx(max(0.0, -skew))
    assert (measured.start[dag.dst] >= measured.end[dag.src] - 1e-9).all()


def test_causal_alignment_leaves_causal_timelines_alone_and_refuses_inconsistent_ones():
    from tfz.dag import build_dag, simulate
    from tfz.schedule import build_schedule

    dag = build_dag(build_schedule("1f1b", 2, 4))
    sim = simulate(dag, np.full(dag.num_actions, 10.0))
    late = measured_simulation(dag, _spans(sim, [0.0, 0.0], latency=0.01), 0)  # every hop has slack
    assert np.array_equal(late.start, sim.start + 0.01 * np.arange(dag.num_actions))
    start, end = sim.start.copy(), sim.end.copy()
    f, b = dag.index["1F0"], dag.index["0B0"]
    start[f] -= 5.0  # rank 1 must move 5 ms later, and rank 0 too: no shift satisfies both
    start[b] -= 5.0 + (start[b] - sim.end[dag.index["1B0"]])
    assert causal_offsets(dag, sim.start, sim.end).tolist() == [0.0, 0.0]
    assert causal_offsets(dag, start, end).tolist() == [0.0, 0.0]


def test_seeds_combine_into_mean_and_spread():
    cfg = DemoConfig(
        steps=18, ranks=2, methods=("none", "timelyfreeze"), task="pretrain", seeds=(0, 1), **TINY
    )
    a, _ = build_report(_two_methods(), cfg, seed=0)
    b, _ = build_report(_two_methods(tf_final=2.45, tf_seq=(2.40, 2.50)), cfg, seed=1)
    report = combine([a, b], cfg)
    assert [r["seed"] for r in report["per_seed"]] == report["seeds"] == [0, 1]
    tf, spread = report["methods"]["timelyfreeze"], report["spread"]["timelyfreeze"]
    assert tf["val_loss"] == pytest.approx((2.52 + 2.45) / 2)
    assert spread["val_loss"]["sd"] == pytest.approx(np.std([2.52, 2.45], ddof=1))
    assert spread["val_loss"]["min"] == 2.45 and spread["val_loss"]["max"] == 2.52
    rel = [0.02 / 2.5, -0.05 / 2.5]
    assert tf["val_loss_vs_none"] == pytest.approx(np.mean(rel))
    se = [0.08 / 2.5, 0.05 / 2.5]  # differences (0.10, -0.06) and (0.0, -0.10): standard errors 0.08, 0.05
    assert spread["val_loss_vs_none"]["se_validation"] == pytest.approx(np.sqrt(se[0] ** 2 + se[1] ** 2) / 2)
    # time to target: reached in one seed only, the mean is over the seeds that reached it
    assert tf["time_to_target_s"] == pytest.approx(b["methods"]["timelyfreeze"]["time_to_target_s"])
    assert spread["time_to_target_s"]["seeds"] == 1


def test_default_cap_is_the_planners():
    """The demo's cap is written out (its config module stays free of numpy); it must not drift from
    the planner's default."""
    from tfz.plan import PlanConfig

    assert DemoConfig().max_freeze_ratio == PlanConfig().max_freeze_ratio


def test_each_microbatch_is_capped_at_the_stage_cap_unless_told():
    plan = lambda **kw: DemoConfig(**kw).timelyfreeze_config(seed=0).plan  # noqa: E731
    assert plan().action_cap == 0.8 and plan(max_freeze_ratio=0.6).action_cap == 0.6
    assert plan(action_cap=1.0).action_cap == 1.0 and plan(action_cap=0.9).max_freeze_ratio == 0.8
    assert plan().makespan_slack == 0.0 and plan(makespan_slack=0.03).makespan_slack == 0.03


def test_config_errors():
    with pytest.raises(ValueError, match="unknown method"):
        DemoConfig(methods=("none", "magic"))
    with pytest.raises(ValueError, match="unknown schedule 'x'"):
        DemoConfig(schedule="x")
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        DemoConfig(steps=0)
    with pytest.raises(ValueError, match="unknown task 'finetuning'"):
        DemoConfig(task="finetuning")
    with pytest.raises(ValueError, match=r"seeds must be integers in \[0, 4294967295\], got \(-1,\)"):
        DemoConfig(seeds=(-1,))
    with pytest.raises(ValueError, match=r"got \(18446744073709551616,\)"):  # torch's seeds end below
        DemoConfig(seeds=(2**64,))
    with pytest.raises(ValueError, match="seeds repeat"):
        DemoConfig(seeds=(1, 1))
    with pytest.raises(ValueError, match=r"step_scale must be a finite number in \[-4, 4\], got nan"):
        DemoConfig(step_scale=float("nan"))
    with pytest.raises(ValueError, match=r"makespan_slack must be .*got 2"):
        DemoConfig(makespan_slack=2)
    with pytest.raises(ValueError, match="rescale_grads must be a bool, got 'no'"):
        DemoConfig(rescale_grads="no")
    with pytest.raises(ValueError, match="--base b.pt applies to --task finetune"):
        DemoConfig(task="pretrain", base="b.pt")
    with pytest.raises(ValueError, match="--ranks 1000000000: .* 292,968,750 GB .* limit is 64 ranks"):
        DemoConfig(ranks=1_000_000_000, steps=1)
    with pytest.raises(
        ValueError, match="--microbatches 100000000 has 800,000,000 actions .* limit is 100,000 actions"
    ):
        DemoConfig(microbatches=100_000_000)
    with pytest.raises(ValueError, match=r"action_cap must be None or a finite number in \[0, 1\], got 1.5"):
        DemoConfig(action_cap=1.5)
    with pytest.raises(ValueError, match="monitoring must be 'partial' or 'frozen', got 'none'"):
        DemoConfig(monitoring="none")
    with pytest.raises(ValueError, match="mask_layout must be one of .*, got 'rows'"):
        DemoConfig(mask_layout="rows")
    with pytest.raises(ValueError, match="unknown corpus 'x'"):
        DemoConfig(corpus="x")
    with pytest.raises(ValueError, match="n_layers 2 is fewer than the 4 pipeline stages"):
        DemoConfig(schedule="zbv", n_layers=2)


def test_timelyfreeze_takes_the_mask_layout_and_the_hybrids_keep_their_policy_s():
    from tfz.demo.worker import build_model, make_provider

    for layout in ("arcs", "cover"):
        cfg = DemoConfig(task="pretrain", methods=METHODS, mask_layout=layout, **TINY)
        sched = cfg.build_schedule()
        modules = build_model(cfg, sched.num_stages, range(sched.num_stages), 0)
        got = {
            m: make_provider(m, cfg, sched, modules, 0).config.mask_layout for m in METHODS if "timely" in m
        }
        assert got == {"timelyfreeze": layout, "timelyfreeze+apf": "auto", "timelyfreeze+autofreeze": "auto"}


def test_the_output_layer_trains_on_every_microbatch_unless_made_freezable():
    from torch import nn

    from tfz.demo.worker import build_model
    from tfz.nn import FreezableLinear

    for output_layer, head in (("trained", nn.Linear), ("freezable", FreezableLinear)):
        cfg = DemoConfig(task="pretrain", output_layer=output_layer, **TINY)
        last = build_model(cfg, 2, [1], 0)[1]
        assert type(last.output) is head, output_layer
        decoder = [m for name, m in last.named_modules() if isinstance(m, nn.Linear) and name != "output"]
        assert decoder and all(isinstance(m, FreezableLinear) for m in decoder)
    with pytest.raises(ValueError, match="unknown output_layer 'head'"):
        DemoConfig(output_layer="head")


def test_pretrain_learns_its_vocabulary_from_its_own_data(tmp_path):
    """``--task pretrain --data`` reads tokens learned from that data, not from the default base's
    corpus; a second launch reads the cached tokenizer."""
    from tfz.data import load_corpus
    from tfz.demo import prepare
    from tfz.tokenizer import BytePairTokenizer

    data = tmp_path / "data"
    data.mkdir()
    for i in range(12):
        (data / f"{i}.txt").write_text(f"zqxj vwuk kjqz {i} xqzv wukv\n" * 40)
    out, cache = str(tmp_path / "out"), str(tmp_path)
    cfg = DemoConfig(task="pretrain", data=str(data), out=out, cache_dir=cache, **TINY)
    lines = []
    _, info = prepare(cfg, progress=lines.append)
    learned = [line for line in lines if "vocabulary" in line]
    assert len(learned) == 1 and str(data) in learned[0]
    expected = BytePairTokenizer.train(load_corpus(data, seed=0).train.tobytes(), cfg.vocab_size)
    [path] = tmp_path.glob("tokenizer-*.json")
    assert BytePairTokenizer(json.loads(path.read_text())["merges"]) == expected
    assert info["vocab_size"] == expected.vocab_size
    lines.clear()
    prepare(cfg, progress=lines.append)
    assert not [line for line in lines if "vocabulary" in line]


def test_only_freezing_methods_freeze_and_tfz_none_runs_tfz_s_stage():
    """``tfz-none`` gives the stages a provider that freezes nothing (so they run tfz's backward, not
    torch's, as ``none`` does); neither steps with the row-freezing optimizer."""
    from tfz.demo.config import freezes
    from tfz.demo.worker import attach_optimizer, build_model, make_provider

    cfg = DemoConfig(task="pretrain", methods=METHODS, **TINY)
    sched = cfg.build_schedule()
    modules = build_model(cfg, sched.num_stages, range(sched.num_stages), 0)
    assert [m for m in METHODS if not freezes(m)] == ["none", "tfz-none"]
    assert make_provider("none", cfg, sched, modules, 0) is None
    staged = make_provider("tfz-none", cfg, sched, modules, 0)
    assert all(
        staged.masks_for(s, m) is None for s in range(sched.num_stages) for m in range(sched.num_microbatches)
    )
    for method in ("none", "tfz-none", "timelyfreeze"):
        hooks = attach_optimizer(cfg, modules, freezing=freezes(method))[1]
        assert (hooks is None) == (method != "timelyfreeze"), method
    # the one table of kinds agrees with the providers the methods get
    from tfz.controller import TimelyFreeze
    from tfz.demo.config import METHOD_KINDS, TIMELYFREEZE_METHODS

    for method, kind in METHOD_KINDS.items():
        provider = make_provider(method, cfg, sched, modules, 0)
        plans = isinstance(provider, TimelyFreeze)
        assert plans == (kind == "timelyfreeze") == (method in TIMELYFREEZE_METHODS), method
        idle = provider is None or type(provider) is type(staged)
        assert idle == (kind == "baseline") == (not freezes(method)), method


def test_short_runs_scale_their_phases_or_are_refused_with_the_minimum():
    cfg = DemoConfig(steps=40, methods=METHODS)
    tf = cfg.timelyfreeze_config(seed=0)
    # learning-rate warm-up 4 (a tenth), then monitoring 2 x 4, the plan fully applied by step 20
    assert cfg.warmup_steps == tf.warmup == 4 and tf.phase_unit == 4
    assert 2 * tf.full_plan_step <= 40 and cfg.decision_interval == tf.check_every
    refusal = r"TimelyFreeze settings: a run of 12 steps is too short .* the demo needs --steps >= \d+"
    with pytest.raises(ValueError, match=refusal) as refused:
        DemoConfig(steps=12, methods=METHODS)
    # the named minimum runs, one step fewer is refused (the demo's warm-up grows with the run, so the
    # controller's own minimum at a fixed warm-up, 22 here, was refused again)
    need = int(str(refused.value).rsplit(">= ", 1)[1])
    DemoConfig(steps=need, methods=METHODS)
    with pytest.raises(ValueError, match=f"needs --steps >= {need}"):
        DemoConfig(steps=need - 1, methods=METHODS)
    DemoConfig(steps=12, methods=("none", "apf", "autofreeze"))  # no TimelyFreeze: nothing to wait for


def test_phase_unit_too_short_for_timelyfreeze():
    with pytest.raises(ValueError, match=r"TimelyFreeze settings: discard_steps \(1\)"):
        DemoConfig(phase_unit=1)
    assert DemoConfig(phase_unit=1, methods=("none", "apf")).phase_unit == 1


@pytest.mark.distributed
def test_finetune_builds_the_base_once_then_hits_the_cache(tmp_path):
    """The fine-tune path end to end at tiny size: base built on the first run (progress shown), taken
    from the cache on the second, every method starting from it."""
    seen = []
    cfg = DemoConfig(
        steps=18, out=str(tmp_path / "a"), cache_dir=str(tmp_path / "cache"), timeout=300, **TINY
    )
    report = run_demo(cfg, progress=seen.append)
    assert any("building the base model" in line for line in seen)
    assert len(list((tmp_path / "cache").glob("base-*.pt"))) == 1
    saved = json.loads((tmp_path / "a" / "report.json").read_text())
    assert saved["config"]["task"] == "finetune" and saved["task"]["corpus"] == "torch-python"
    assert saved["task"]["validation"]["sequences"] == 8
    for name in ("none", "timelyfreeze"):
        m = saved["methods"][name]
        for key in ("val_loss", "none_val_loss_at_equal_time", "time_to_target_s", "val_loss_vs_none"):
            assert key in m, (name, key)
        evals = saved["per_seed"][0]["methods"][name]["evals"]
        assert evals[0]["step"] == 0 and evals[0]["wall_time_s"] == 0.0
    first = [
        r["methods"][n]["evals"][0]["val_loss"] for r in saved["per_seed"] for n in ("none", "timelyfreeze")
    ]
    assert first[0] == pytest.approx(first[1], rel=1e-6)  # both start from the same base
    assert saved["task"]["base_val_loss"] == pytest.approx(first[0])
    seen.clear()
    again = cfg.replace(steps=2, methods=("none",), seeds=(0, 1), out=str(tmp_path / "b"))
    report = run_demo(again, progress=seen.append)
    assert not any("building the base model" in line for line in seen)
    assert len(report["per_seed"]) == 2 and report["task"]["base"] == saved["task"]["base"]
    assert report["spread"]["none"]["val_loss"]["seeds"] == 2
    assert "± " in (tmp_path / "b" / "report.md").read_text()


@pytest.mark.distributed
def test_shortened_demo_runs_every_method(tmp_path, monkeypatch):
    import tfz._io

    writes = []
    write_files = tfz._io.write_files
    monkeypatch.setattr(tfz._io, "write_files", lambda files: (writes.append(set(files)), write_files(files)))
    cfg = DemoConfig(steps=18, methods=METHODS, task="pretrain", out=str(tmp_path), timeout=300, **TINY)
    report = run_demo(cfg)
    # every output in one write: all of them or none (a full disk keeps an earlier run's)
    assert writes == [set(tmp_path.iterdir())]
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
            "none_val_loss_at_equal_time",
            "batch_time_measured_ms",
            "batch_time_predicted_ms",
        ):
            assert key in m, (name, key)
        assert len(m["mean_freeze_ratio"]) == 2 and all(0 <= r <= 1 for r in m["mean_freeze_ratio"])
        assert 0 < m["val_loss"] < np.log(cfg.vocab_size) + 0.5 and 0 <= m["val_acc"] <= 1
        assert m["train_loss"] < np.log(cfg.vocab_size) + 0.5
    assert saved["methods"]["none"]["mean_freeze_ratio"] == [0.0, 0.0]
    assert saved["methods"]["none"]["throughput_gain"] == pytest.approx(1.0)
    assert saved["methods"]["none"]["batch_time_predicted_ms"] is None
    # no freezing through tfz's stage: nothing frozen, no plan, and the training of no freezing (the
    # in-place dW sums can differ from autograd's in the last bits only)
    plain, staged = saved["methods"]["none"], saved["methods"]["tfz-none"]
    assert staged["mean_freeze_ratio"] == [0.0, 0.0] and staged["batch_time_predicted_ms"] is None
    assert staged["val_loss"] == pytest.approx(plain["val_loss"], rel=1e-4)
    assert staged["train_loss"] == pytest.approx(plain["train_loss"], rel=1e-4)
    tf = saved["per_seed"][0]["methods"]["timelyfreeze"]
    assert tf["batch_time_predicted_ms"] > 0 and tf["plan"] is not None
    # the FLOP bound, in closed form: two decoder layers of 4 d^2 + 3 d f weights per stage, the
    # output layer's d V (trained) on the last; 2 FLOPs per weight and token, three times
    d, layers = cfg.dim, cfg.model_layers(2) // 2
    decoder = layers * (4 * d * d + 3 * d * cfg.ffn_dim)
    totals = [6 * decoder, 6 * (decoder + d * cfg.vocab_size)]
    frozen = [total - cfg.max_freeze_ratio * 2 * decoder for total in totals]
    assert tf["flop_bound"] == pytest.approx(max(totals) / max(frozen))
    assert saved["per_seed"][0]["methods"]["apf"]["flop_bound"] is None  # no cap to bound it
    assert max(tf["plan"]["ratios"].values()) <= cfg.max_freeze_ratio + 1e-9  # each microbatch capped
    assert (
        "each microbatch's at 0.8; its masks train one run of rows of every layer"
        in (tmp_path / "report.md").read_text()
    )
    # the lower-bound window freezes part of every stage: microbatches take turns over the monitoring
    # levels, so each stage's mean is about theirs and every step still trains
    mean = np.mean(cfg.timelyfreeze_config(0).monitor_levels)
    lower = [i for i, p in enumerate(tf["phase_per_step"]) if p == "monitor_lower"]
    assert lower and all(abs(r - mean) < 0.1 for i in lower for r in tf["freeze_ratio_per_step"][i])
    # nothing freezes before the end of the learning-rate warm-up (2 steps here)
    for name in METHODS:
        per_step = saved["per_seed"][0]["methods"][name]["freeze_ratio_per_step"]
        assert len(per_step) == 18 and all(r == 0 for step in per_step[:2] for r in step)
    assert [p[1] for p in tf["phases"]][:3] == ["monitor_upper", "monitor_lower", "solving"]
    # the workers hand their batch times to the controller: the plan carries the gap fitted on them
    # (the last fit: the unfrozen monitoring's, or a re-plan's after the batch drifted)
    fits = [text for _, _, text in tf["phases"] if "ms between actions" in text]
    assert "ms between actions" in tf["phases"][2][2] and f"{tf['gap_ms']:.3g} ms between actions" in fits[-1]
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
            schedule=name,
            task="pretrain",
            steps=2,
            methods=("none",),
            out=str(tmp_path / name),
            timeout=300,
            **TINY,
        )
        evals[name] = run_demo(cfg)["per_seed"][0]["methods"]["none"]["evals"]
    a, b = evals["interleaved1f1b"], evals["zbv"]
    assert [e["step"] for e in a] == [e["step"] for e in b] == [0, 2]
    for ea, eb in zip(a, b):
        assert ea["val_loss"] == pytest.approx(eb["val_loss"], rel=1e-5)
        assert ea["val_acc"] == pytest.approx(eb["val_acc"], abs=1e-3)


def test_a_diverging_run_stops_naming_the_learning_rate(tmp_path):
    """A learning rate that turns the loss into nan stops the demo at that step instead of training on
    nan and failing in the plots (seen with --lr 1e10); nothing is written."""
    from tfz.pipeline.launch import RankError

    cfg = DemoConfig(
        steps=6, methods=("none",), task="pretrain", out=str(tmp_path), timeout=300, **{**TINY, "lr": 1e10}
    )
    with pytest.raises(RankError, match=r"none's training loss is nan at step \d: .*learning rate 1e\+10"):
        run_demo(cfg)
    assert not (tmp_path / "report.json").exists()


def test_demo_optimizer_is_fused_adamw_with_hooks_only_where_rows_freeze():
    """No freezing steps plain torch (fused AdamW, no hooks); the freezing methods add the row
    hooks, which step the FreezableLinears natively where tfz._row_adamw is built."""
    import torch

    import tfz.optim
    from tfz.demo.worker import attach_optimizer
    from tfz.nn import FreezableLinear

    cfg = DemoConfig()
    for freezing in (False, True):
        modules = {0: torch.nn.Sequential(FreezableLinear(4, 3), torch.nn.LayerNorm(3))}
        optimizer, hooks, _ = attach_optimizer(cfg, modules, freezing=freezing)
        assert all(group["fused"] for group in optimizer.param_groups)
        assert (hooks is not None) == freezing
        modules[0](torch.randn(2, 4)).sum().backward()
        optimizer.step()
        if hooks is not None:
            assert hooks.fused_tensors == (2 if tfz.optim.NATIVE else 0)
            assert (hooks.rescale, hooks.step_scale) == (cfg.rescale_grads, cfg.step_scale)


def test_the_shared_start_is_evaluated_once_unless_weights_differ(one_rank_group, monkeypatch):
    """Methods starting from the same weights take the first method's step-0 evaluation; one whose
    weights differ is evaluated on its own. The copy equals a fresh evaluation."""
    import torch

    from tfz.demo import worker
    from tfz.schedule import build_schedule

    cfg = DemoConfig(task="pretrain", **TINY)
    sched = build_schedule("1f1b", 1, cfg.microbatches)
    runs = [worker.MethodRun(m, cfg, sched, 0, 0) for m in ("none", "timelyfreeze", "tfz-none")]
    with torch.no_grad():
        next(runs[2].modules[0].parameters()).add_(0.25)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (cfg.val_sequences, cfg.seq_len), generator=gen)
    y = torch.randint(0, cfg.vocab_size, (cfg.val_sequences, cfg.seq_len), generator=gen)
    evaluated = []
    real = worker.MethodRun.evaluate
    monkeypatch.setattr(
        worker.MethodRun, "evaluate", lambda self, *a: (evaluated.append(self.method), real(self, *a))
    )
    worker._evaluate_start(runs, x, y, chunk=4)
    assert evaluated == ["none", "tfz-none"]
    shared, own = runs[1].evals[0], runs[2].evals[0]
    assert shared == runs[0].evals[0] and own["val_loss"] != shared["val_loss"]
    real(runs[1], 1, x, y, 4)
    assert runs[1].evals[1]["seq_loss"] == shared["seq_loss"]


def test_no_freezing_at_equal_time_is_its_own_evaluation_at_those_steps(one_rank_group, monkeypatch):
    """With TimelyFreeze's steps made 0.8x no freezing's, its end falls between no freezing's steps 14
    and 15 of 18. The workers keep no freezing's weights of the last stretch and evaluate them after
    training; the values must equal the evaluations a run that evaluates every step made during
    training, and the report interpolates them in time."""
    from tfz.demo import worker

    real = worker.MethodRun.train_step

    def fixed_times(self, *args, **kwargs):
        record = real(self, *args, **kwargs)
        record.step_ms = 100.0 if self.method == "none" else 80.0
        return record

    monkeypatch.setattr(worker.MethodRun, "train_step", fixed_times)
    cfg = DemoConfig(steps=18, ranks=1, methods=("none", "timelyfreeze"), task="pretrain", **TINY)
    sparse = worker.run_rank(0, 1, cfg.replace(eval_every=100), seed=0)
    every = worker.run_rank(0, 1, cfg.replace(eval_every=1), seed=0)
    assert [e["step"] for e in sparse["none"]["evals"]] == [0, 18]
    measured = sparse["none"]["equal_time_evals"]
    assert [e["step"] for e in measured] == [14, 15] and every["none"]["equal_time_evals"] == []
    during = {e["step"]: e for e in every["none"]["evals"]}
    for e in measured:
        assert e["seq_loss"] == pytest.approx(during[e["step"]]["seq_loss"], rel=1e-6)
    report, _ = build_report([sparse], cfg.replace(eval_every=100), seed=0)
    w = (18 * 80 - 14 * 100) / 100
    want = (1 - w) * during[14]["val_loss"] + w * during[15]["val_loss"]
    assert report["methods"]["timelyfreeze"]["none_val_loss_at_equal_time"] == pytest.approx(want, rel=1e-6)
