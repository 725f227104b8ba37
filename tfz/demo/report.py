"""Turn the ranks' records of ``tfz demo`` into report.json, report.md, plots and Chrome traces."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from tfz.dag import DAG, Simulation, build_dag, simulate
from tfz.demo.config import TIMELYFREEZE_METHODS, DemoConfig, freezes
from tfz.demo.equal_time import around, cumulative_ms
from tfz.schedule import build_schedule

__all__ = ["GOALS", "build_report", "write_outputs"]

GOALS = {
    "throughput_gain": 1.25,
    "val_loss_rel": 0.01,
    "prediction_rel": 0.10,
}
"""TimelyFreeze vs no freezing: throughput gain >= 1.25x, final validation loss within 1%, predicted
batch time within 10% of the measured one."""


def _merge(results: list[dict], method: str, cfg: DemoConfig, last_rank: int) -> dict[str, Any]:
    per_rank = [r[method] for r in results]
    steps = len(per_rank[0]["records"])
    step_ms = np.max([[rec["step_ms"] for rec in pr["records"]] for pr in per_rank], axis=0)
    pipeline_ms = np.max([[rec["pipeline_ms"] for rec in pr["records"]] for pr in per_rank], axis=0)
    frozen: dict[int, list[float]] = {}
    for pr in per_rank:
        for rec in pr["records"]:
            for s, f in rec["frozen_fraction"].items():
                frozen.setdefault(int(s), []).append(f)
    records0 = per_rank[0]["records"]
    return {
        "steps": steps,
        "step_ms": step_ms,
        "pipeline_ms": pipeline_ms,
        "loss": np.array([rec["loss"] for rec in per_rank[last_rank]["records"]], dtype=float),
        "phase": [rec["phase"] for rec in records0],
        "predicted_ms": [rec["predicted_ms"] for rec in records0],
        "frozen": {s: np.array(v) for s, v in sorted(frozen.items())},
        "evals": per_rank[last_rank]["evals"],
        "equal_time_evals": per_rank[last_rank].get("equal_time_evals", []),
        "history": per_rank[0]["history"],
        "plan": per_rank[0]["plan"],
        "timeline_durations": per_rank[0].get("timeline_durations"),
        "estimates": per_rank[0].get("estimates"),
        "gap_ms": per_rank[0].get("gap_ms"),
        "spans": [pr["spans"] for pr in per_rank],
        "span_ratios": per_rank[0]["span_ratios"],
        "linear_flops": [
            np.sum(pr["linear_flops"], axis=0).tolist() for pr in per_rank if "linear_flops" in pr
        ],
    }


def _flop_bound(per_rank: list, cap: float) -> float | None:
    """The busiest rank's linear-layer FLOPs unfrozen over the busiest one's with every stage frozen at
    ``cap`` (``per_rank``: each rank's [freezable, total] from :func:`tfz.nn.linear_flops`): the most
    a batch can gain at that cap in steady state, were the linear layers all the work."""
    if not per_rank or not all(total > 0 for _, total in per_rank):
        return None
    return max(total for _, total in per_rank) / max(total - cap * freezable for freezable, total in per_rank)


def _window_start(merged: dict[str, dict], cfg: DemoConfig) -> int:
    """First step of the measurement window shared by all methods: when every TimelyFreeze-based method
    is in its stable phase (freezing in force after warm-up, monitoring and ramp); without one, the
    first step any method freezes; without freezing at all, the end of the learning-rate warm-up."""
    starts = []
    for method in TIMELYFREEZE_METHODS:
        if method in merged:
            phases = merged[method]["phase"]
            starts.append(next((i for i, p in enumerate(phases) if p == "stable"), len(phases)))
    if starts:
        return max(starts)
    firsts = [
        next((i for i in range(m["steps"]) if any(f[i] > 0 for f in m["frozen"].values())), m["steps"])
        for m in merged.values()
        if m["frozen"]
    ]
    steps = next(iter(merged.values()))["steps"]
    freezing = [f for f in firsts if f < steps]
    return min(freezing) if freezing else min(cfg.warmup_steps, steps - 1)


def time_to_target(times: list[float], values: list[float], target: float) -> float | None:
    """First time the curve reaches ``target`` or below, linearly interpolated between the two points
    around the crossing; None if it never does."""
    for k, (t, v) in enumerate(zip(times, values)):
        if v <= target:
            if k == 0:
                return float(t)
            t0, v0 = times[k - 1], values[k - 1]
            return float(t0 + (v0 - target) / (v0 - v) * (t - t0))
    return None


def paired_difference(losses: list[float], reference: list[float]) -> dict[str, float]:
    """Mean per-sequence loss difference to ``reference`` (same sequences), its standard error, and both
    relative to the reference's mean loss."""
    a, b = np.asarray(losses, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape or a.size < 2:
        raise ValueError(f"paired losses need the same >= 2 sequences, got {a.size} and {b.size}")
    d = a - b
    mean, se, ref = float(d.mean()), float(d.std(ddof=1) / np.sqrt(d.size)), float(b.mean())
    return {"diff": mean, "se": se, "rel": mean / ref, "se_rel": se / ref, "sequences": int(d.size)}


def reference_at_equal_time(reference: dict, method: dict) -> dict[str, Any] | None:
    """The reference's (merged records) validation at ``method``'s total training time: its two
    evaluations nearest that time, regular or of its saved weights (:mod:`tfz.demo.equal_time`),
    interpolated, per sequence too; None past the reference's end."""
    by_step = {e["step"]: e for e in reference["evals"] + reference["equal_time_evals"]}
    ends = cumulative_ms(reference["step_ms"])
    near = around(ends, sorted(by_step), cumulative_ms(method["step_ms"])[-1])
    if near is None:
        return None
    j, k, w = near
    lo, hi = by_step[j], by_step[k]
    seq = None
    if lo.get("seq_loss") is not None and hi.get("seq_loss") is not None:
        seq = ((1 - w) * np.asarray(lo["seq_loss"]) + w * np.asarray(hi["seq_loss"])).tolist()
    value = (1 - w) * lo["val_loss"] + w * hi["val_loss"]
    return {"val_loss": value, "steps": [j, k], "weight": w, "seq_loss": seq}


def _method_report(m: dict, cfg: DemoConfig, w0: int) -> dict[str, Any]:
    tokens = cfg.tokens_per_step
    window = slice(w0, m["steps"])
    n = m["steps"] - w0
    in_window = float(m["step_ms"][window].sum()) / 1e3
    wall = np.cumsum(m["step_ms"]) / 1e3
    final = m["evals"][-1] if m["evals"] else {}
    predicted = [p for p in m["predicted_ms"][window] if p is not None]
    return {
        "tokens_per_s": tokens * n / in_window if n > 0 else None,
        "tokens_per_s_whole_run": tokens * m["steps"] / float(wall[-1]),
        "mean_freeze_ratio": [float(f[window].mean()) if n > 0 else 0.0 for f in m["frozen"].values()],
        "train_loss": float(np.nanmean(m["loss"][-10:])),
        "val_loss": final.get("val_loss"),
        "val_acc": final.get("val_acc"),
        "batch_time_measured_ms": float(np.median(m["pipeline_ms"][window])) if n > 0 else None,
        "batch_time_predicted_ms": float(np.median(predicted)) if predicted else None,
        "step_time_ms": float(np.median(m["step_ms"][window])) if n > 0 else None,
        "wall_time_s": float(wall[-1]),
        "evals": [
            {k: v for k, v in e.items() if k != "seq_loss"}
            | {"wall_time_s": float(wall[e["step"] - 1]) if e["step"] > 0 else 0.0}
            for e in m["evals"]
        ],
        "freeze_ratio_per_step": [
            [round(float(f[i]), 4) for f in m["frozen"].values()] for i in range(m["steps"])
        ],
        "phase_per_step": m["phase"],
        "batch_time_ms_per_step": [round(float(v), 2) for v in m["pipeline_ms"]],
        "predicted_ms_per_step": [None if p is None else round(float(p), 2) for p in m["predicted_ms"]],
        "phases": [list(h) for h in m["history"]],
        "plan": m["plan"],
        "estimates_ms": m["estimates"],
        "gap_ms": m["gap_ms"],
        **_planned(m["plan"]),
    }


def _paired(losses: list | None, reference: list | None) -> dict[str, float] | None:
    return paired_difference(losses, reference) if losses and reference else None


def _gain(rep: dict, reference: dict | None) -> float | None:
    """``rep``'s tokens/s over ``reference``'s (None when either is missing)."""
    if not reference or not rep["tokens_per_s"] or not reference["tokens_per_s"]:
        return None
    return rep["tokens_per_s"] / reference["tokens_per_s"]


def _planned(plan: dict | None) -> dict[str, float | None]:
    """The plan's own batch speedup, its ceiling (no freezing's planned makespan over the one with
    every row of every backward frozen) and that unfrozen makespan in ms, on the times the plan was
    solved on (None without a plan)."""
    if not plan or not plan.get("makespan_all_frozen"):
        return {"planned_speedup": None, "planned_ceiling": None, "planned_unfrozen_ms": None}
    return {
        "planned_speedup": plan["speedup"],
        "planned_ceiling": plan["makespan_unfrozen"] / plan["makespan_all_frozen"],
        "planned_unfrozen_ms": plan["makespan_unfrozen"],
    }


def _curve(rep: dict) -> tuple[list[float], list[float]]:
    return [e["wall_time_s"] for e in rep["evals"]], [e["val_loss"] for e in rep["evals"]]


def build_report(results: list[dict], cfg: DemoConfig, seed: int) -> tuple[dict[str, Any], dict[str, dict]]:
    """(report of one seed, merged per-method records). ``results[rank][method]`` as returned by the
    ranks."""
    schedule = build_schedule(cfg.schedule, cfg.ranks, cfg.microbatches)
    last_rank = schedule.stage_to_rank[-1]
    merged = {m: _merge(results, m, cfg, last_rank) for m in cfg.methods}
    w0 = _window_start(merged, cfg)
    methods = {name: _method_report(m, cfg, w0) for name, m in merged.items()}
    base = methods.get("none")
    target = base["val_loss"] if base else None
    finals = {name: m["evals"][-1].get("seq_loss") if m["evals"] else None for name, m in merged.items()}
    cap = min(cfg.max_freeze_ratio, cfg.freeze_action_cap)  # a stage's mean and each microbatch's
    for name, rep in methods.items():
        rep["throughput_gain"] = _gain(rep, base)
        rep["gain_over_tfz_none"] = _gain(rep, methods.get("tfz-none")) if freezes(name) else None
        capped = name in TIMELYFREEZE_METHODS
        rep["flop_bound"] = _flop_bound(merged[name]["linear_flops"], cap) if capped else None
        rep["time_to_target_s"] = None if target is None else time_to_target(*_curve(rep), target)
        at = None
        if base is not None and name != "none":
            at = reference_at_equal_time(merged["none"], merged[name])
        rep["none_val_loss_at_equal_time"] = None if at is None else at["val_loss"]
        rep["none_equal_time_steps"] = None if at is None else at["steps"]
        rep["val_loss_vs_none"] = _paired(finals.get(name), finals.get("none") if name != "none" else None)
        rep["val_loss_vs_none_at_equal_time"] = _paired(finals.get(name), at and at["seq_loss"])
        rep["time_to_target_speedup"] = (
            base["time_to_target_s"] / rep["time_to_target_s"]
            if base and rep["time_to_target_s"] and base.get("time_to_target_s")
            else None
        )
    if base is not None:
        base["time_to_target_speedup"] = 1.0
    steps = next(iter(merged.values()))["steps"]
    report = {"seed": seed, "window_steps": [w0, steps], "methods": methods, "goals": _goals(methods)}
    return report, merged


def _spread(values: list) -> Any:
    """Mean of per-seed values (element-wise for lists; None ignored) and their spread."""
    present = [v for v in values if v is not None]
    if not present:
        return None, None
    if isinstance(present[0], list):
        arr = np.asarray(present, dtype=np.float64)
        return arr.mean(0).tolist(), {"sd": arr.std(0, ddof=1).tolist() if len(arr) > 1 else None}
    arr = np.asarray(present, dtype=np.float64)
    return float(arr.mean()), {
        "sd": float(arr.std(ddof=1)) if len(arr) > 1 else None,
        "min": float(arr.min()),
        "max": float(arr.max()),
        "seeds": len(arr),
    }


_SUMMARY_KEYS = (
    "tokens_per_s",
    "throughput_gain",
    "gain_over_tfz_none",
    "mean_freeze_ratio",
    "train_loss",
    "val_loss",
    "val_acc",
    "none_val_loss_at_equal_time",
    "time_to_target_s",
    "time_to_target_speedup",
    "batch_time_measured_ms",
    "batch_time_predicted_ms",
    "step_time_ms",
    "wall_time_s",
    "tokens_per_s_whole_run",
    "planned_speedup",
    "planned_ceiling",
    "planned_unfrozen_ms",
    "gap_ms",
    "flop_bound",
)


def combine(per_seed: list[dict], cfg: DemoConfig, extra: dict | None = None) -> dict[str, Any]:
    """The report of every seed: ``methods`` holds the mean over seeds of each metric, ``spread`` its
    standard deviation, minimum and maximum, ``per_seed`` the per-seed reports."""
    methods, spread = {}, {}
    for name in cfg.methods:
        reps = [r["methods"][name] for r in per_seed]
        methods[name], spread[name] = {}, {}
        for key in _SUMMARY_KEYS:
            methods[name][key], spread[name][key] = _spread([r.get(key) for r in reps])
        for key in ("val_loss_vs_none", "val_loss_vs_none_at_equal_time"):
            paired = [r[key] for r in reps if r.get(key)]
            methods[name][key] = None  # none itself, no final evaluation, or past none's run
            if paired:
                rel = [p["rel"] for p in paired]
                methods[name][key] = float(np.mean(rel))
                spread[name][key] = {
                    "sd": float(np.std(rel, ddof=1)) if len(rel) > 1 else None,
                    "min": float(np.min(rel)),
                    "max": float(np.max(rel)),
                    "se_validation": float(np.sqrt(np.sum(np.square([p["se_rel"] for p in paired]))))
                    / len(paired),
                    "seeds": len(rel),
                }
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()}
    schedule = build_schedule(cfg.schedule, cfg.ranks, cfg.microbatches)
    config.update(
        tokens_per_step=cfg.tokens_per_step,
        num_stages=schedule.num_stages,
        peak_lr=cfg.peak_lr,
        freeze_action_cap=cfg.freeze_action_cap,
        warmup_steps=cfg.warmup_steps,
        window_steps=per_seed[0]["window_steps"],
        monitor_ratios=_monitor_levels(cfg),
    )
    report = {
        "config": config,
        **(extra or {}),
        "seeds": [r["seed"] for r in per_seed],
        "methods": methods,
        "spread": spread,
        "goals": _goals(methods),
        "per_seed": per_seed,
    }
    return report


def _goals(methods: dict[str, dict]) -> dict[str, Any]:
    base, tf = methods.get("none"), methods.get("timelyfreeze")
    if not base or not tf:
        return {}
    out: dict[str, Any] = {}
    gain = tf["throughput_gain"]
    out["throughput_gain"] = {
        "value": gain,
        "goal": f">= {GOALS['throughput_gain']}",
        "met": gain is not None and gain >= GOALS["throughput_gain"],
        "planned": tf.get("planned_speedup"),
        "ceiling": tf.get("planned_ceiling"),
        "planned_unfrozen_ms": tf.get("planned_unfrozen_ms"),
        "none_measured_ms": base.get("batch_time_measured_ms"),
        "over_tfz_none": tf.get("gain_over_tfz_none"),
        "flop_bound": tf.get("flop_bound"),
    }
    if tf["val_loss"] is not None and base["val_loss"] is not None:
        rel = tf["val_loss"] / base["val_loss"] - 1
        out["val_loss_vs_none"] = {
            "value": rel,
            "goal": f"<= {GOALS['val_loss_rel']:+.0%}",
            "met": rel <= GOALS["val_loss_rel"],
        }
    at = tf.get("none_val_loss_at_equal_time")
    if tf["val_loss"] is not None and at is not None:
        rel = tf["val_loss"] / at - 1
        out["val_loss_vs_none_at_equal_time"] = {"value": rel, "goal": "<= +0%", "met": rel <= 0}
    pred, meas = tf["batch_time_predicted_ms"], tf["batch_time_measured_ms"]
    if pred is not None and meas:
        rel = pred / meas - 1
        out["prediction_vs_measured"] = {
            "value": rel,
            "goal": f"within {GOALS['prediction_rel']:.0%}",
            "met": abs(rel) <= GOALS["prediction_rel"],
        }
        shift = _machine_shift(base, tf)
        if shift is not None:
            out["prediction_vs_measured"]["none_batch_time_shift"] = shift
        if tf.get("gap_ms") is not None:
            out["prediction_vs_measured"]["gap_ms"] = tf["gap_ms"]
    return out


def _machine_shift(base: dict, tf: dict) -> float | None:
    """Relative change of no freezing's own batch time (constant work) from the steps where TimelyFreeze
    measured the unfrozen bound to the measurement window: how far the machine's speed moved between
    the measurements a plan is built on and the steps it is judged on (None without per-step data)."""
    if "phase_per_step" not in tf or "batch_time_ms_per_step" not in base:
        return None
    phases = tf["phase_per_step"]
    monitored = [i for i, p in enumerate(phases) if p == "monitor_upper"]
    window = [i for i, p in enumerate(phases) if p == "stable"]
    times = base["batch_time_ms_per_step"]
    if not monitored or not window:
        return None
    before = float(np.median([times[i] for i in monitored]))
    return float(np.median([times[i] for i in window])) / before - 1 if before > 0 else None


# ---------------------------------------------------------------------- figures and traces


def causal_offsets(dag: DAG, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Per-rank shifts (ms, float64 [ranks]) that make the measured timeline causal: the smallest
    non-negative ones after which no action starts before an input from another rank has ended.

    Ranks leave the start barrier a few ms apart, so timelines aligned on it can show, e.g., a
    forward starting before the previous stage's forward it receives from has finished. Each
    cross-rank edge u -> v asks ``shift[rank v] - shift[rank u] >= end[u] - start[v]``; a
    longest-path relaxation (Bellman-Ford) finds the least shifts. Inconsistent spans (a cycle of
    ranks that keeps gaining) keep the barrier alignment (zeros).
    """
    cross = dag.rank[dag.src] != dag.rank[dag.dst]
    src, dst = dag.src[cross], dag.dst[cross]
    a, b = dag.rank[src], dag.rank[dst]
    need = end[src] - start[dst]
    shift = np.zeros(dag.num_ranks)
    for _ in range(dag.num_ranks):
        lifted = shift.copy()
        np.maximum.at(lifted, b, shift[a] + need)
        if np.array_equal(lifted, shift):
            return shift
        shift = lifted
    return np.zeros(dag.num_ranks)


def measured_simulation(dag: DAG, spans_by_rank: list[dict], step: int) -> Simulation | None:
    """The measured timeline of ``step`` as a Simulation: each rank's spans shifted so that its
    start-of-step mark (recorded right after a barrier) is time 0, then by :func:`causal_offsets`."""
    start = np.zeros(dag.num_actions)
    end = np.zeros(dag.num_actions)
    seen = np.zeros(dag.num_actions, dtype=bool)
    for spans in spans_by_rank:
        rows = spans.get(step)
        if not rows:
            return None
        origin = next((s for name, s, _ in rows if name == "step"), 0.0)
        for name, s, e in rows:
            i = dag.index.get(name)
            if i is not None:
                start[i], end[i], seen[i] = s - origin, e - origin, True
    if not seen.all():
        return None
    shift = causal_offsets(dag, start, end)[dag.rank]
    return Simulation(dag, end - start, start + shift, end + shift)


def write_outputs(report: dict, merged: dict[str, dict], cfg: DemoConfig, out: Path) -> list[Path]:
    """Write report.json, report.md, loss_vs_time.png, timelines and traces into ``out``, all of them
    or none (:func:`tfz._io.write_files`: a full disk keeps what an earlier run left there); ``merged``
    is the first seed's merged records (timelines, batch times and freeze ratios show that seed)."""
    from tfz._io import write_files
    from tfz.timeline import chrome_trace_bytes, gantt_png

    first = report["per_seed"][0]
    files: dict[Path, bytes] = {
        out / "report.json": json.dumps(report, indent=2).encode(),
        out / "loss_vs_time.png": _plot_losses(report, merged),
        out / "freeze_ratio.png": _plot_freezing(first),
        out / "batch_time.png": _plot_batch_times(first),
    }
    dag = build_dag(build_schedule(cfg.schedule, cfg.ranks, cfg.microbatches))
    figures = []
    method = next((m for m in TIMELYFREEZE_METHODS if m in merged), None)
    if method is not None:
        m = merged[method]
        steps = sorted(set().union(*(s.keys() for s in m["spans"])))
        before = [s for s in steps if m["phase"][s] == "monitor_upper"]
        picks = {"before": before[-1] if before else None, "after": steps[-1] if steps else None}
        timelines = {}
        for label, step in picks.items():
            sim = None if step is None else measured_simulation(dag, m["spans"], step)
            if sim is not None:
                asked = m["span_ratios"].get(step)
                r = None if asked is None or not any(asked) else np.asarray(asked)
                timelines[label] = (sim, r, f"{method}, measured step {step + 1} ({label} freezing)")
        if m["timeline_durations"] is not None and m["plan"] is not None:
            by_name = m["plan"]["ratios"]
            ratios = np.array([by_name.get(name, 0.0) for name in dag.names])
            sim = simulate(dag, np.asarray(m["timeline_durations"]))
            timelines["planned"] = (sim, ratios, f"{method}, planned (LP)")
        for label, (sim, r, title) in timelines.items():
            files[out / f"timeline_{label}.png"] = gantt_png(sim, r, title=title)
            trace = out / f"trace_{label}.json"
            files[trace] = chrome_trace_bytes(trace, sim, r)
            figures.append(f"timeline_{label}.png")
    files[out / "report.md"] = markdown(report, figures).encode()
    out.mkdir(parents=True, exist_ok=True)
    write_files(files)
    return list(files)


def _png(fig) -> bytes:
    """A matplotlib Figure (with an Agg canvas) as PNG bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _plot_losses(report: dict, merged: dict[str, dict]) -> bytes:
    """Validation loss against training wall time for every seed (left: the whole run, with the first
    seed's training loss; right: the end of the run, where no freezing's curve at each method's end
    time is marked)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.6), dpi=110)
    FigureCanvasAgg(fig)
    whole, end = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    styles = ("-", "--", ":", "-.")
    first_seed = report["per_seed"][0]["seed"]
    last_times, end_values = [], []
    for i, name in enumerate(report["methods"]):
        color = f"C{i}"
        m = merged[name]
        wall = np.cumsum(m["step_ms"]) / 1e3
        k = min(10, len(m["loss"]))
        smooth = np.convolve(m["loss"], np.ones(k) / k, mode="valid")
        whole.plot(
            wall[k - 1 :], smooth, color=color, lw=0.8, alpha=0.3, label=f"{name}, train (seed {first_seed})"
        )
        for j, seed_report in enumerate(report["per_seed"]):
            times, values = _curve(seed_report["methods"][name])
            style = dict(marker="o", ls=styles[j % len(styles)], color=color, ms=3, lw=1.2)
            label = f"{name}, validation (seed {seed_report['seed']})"
            whole.plot(times, values, label=label, **style)
            end.plot(times, values, **style)
            last_times.append(times[-1])
            end_values.append(values[-1])
            at = seed_report["methods"][name].get("none_val_loss_at_equal_time")
            if at is not None:
                end.plot([times[-1]], [at], marker="x", color="C0", ms=8, ls="none")
                end_values.append(at)
    if last_times:
        lo_t = 0.5 * min(last_times)
        end.set_xlim(lo_t, 1.02 * max(last_times))
        inside = [
            v
            for r in report["per_seed"]
            for m in r["methods"].values()
            for t, v in zip(*_curve(m))
            if t >= lo_t
        ]
        top, bottom = max(inside + end_values), min(inside + end_values)
        pad = 0.05 * (top - bottom + 1e-9)
        end.set_ylim(bottom - pad, top + pad)
    whole.set_title("validation loss vs training wall time")
    end.set_title("end of the run (x: no freezing measured at the same time)")
    for ax in (whole, end):
        ax.set_xlabel("training wall time of the method (s; evaluation excluded)")
        ax.grid(alpha=0.3)
    whole.set_ylabel("loss (nats per token)")
    whole.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def _plot_batch_times(report: dict) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    w0, w1 = report["window_steps"]
    ax.axvspan(w0 + 1, w1, color="0.92", label="measurement window")
    for i, (name, m) in enumerate(report["methods"].items()):
        steps = np.arange(1, len(m["batch_time_ms_per_step"]) + 1)
        ax.plot(steps, m["batch_time_ms_per_step"], color=f"C{i}", lw=0.9, label=f"{name}, measured")
        predicted = np.array([np.nan if p is None else p for p in m["predicted_ms_per_step"]])
        if np.isfinite(predicted).any():
            ax.plot(steps, predicted, color=f"C{i}", lw=1.4, ls="--", label=f"{name}, predicted (plan)")
    ax.set_xlabel("step")
    ax.set_ylabel("pipelined batch time (ms)")
    ax.set_title("batch time per step: measured vs the plan's prediction")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return _png(fig)


def _plot_freezing(report: dict) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for i, (name, m) in enumerate(report["methods"].items()):
        per_step = np.asarray(m["freeze_ratio_per_step"])
        if not per_step.size or not per_step.any():
            continue
        for s in range(per_step.shape[1]):
            ax.plot(
                np.arange(1, len(per_step) + 1),
                per_step[:, s],
                color=f"C{i}",
                lw=1.0,
                ls=("-", "--", ":", "-.")[s % 4],
                label=f"{name}, stage {s}",
            )
    ax.set_xlabel("step")
    ax.set_ylabel("frozen fraction of W FLOPs")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, ncol=2)
    else:
        ax.text(0.5, 0.5, "no method froze anything", transform=ax.transAxes, ha="center")
    fig.tight_layout()
    return _png(fig)


def _fmt(value, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def _cell(report: dict, name: str, key: str, spec: str, none: str = "-") -> str:
    """``mean`` or ``mean ± sd`` (over seeds) of one metric of one method."""
    value = report["methods"][name].get(key)
    if value is None:
        return none
    if isinstance(value, list):
        return " ".join(format(v, spec) for v in value)
    sd = (report["spread"][name].get(key) or {}).get("sd")
    return format(value, spec) + ("" if sd is None else f" ± {format(sd, spec.lstrip('+'))}")


_LAYOUT_TEXT = {
    "arcs": "; its masks train one run of rows of every layer per microbatch, the runs taking turns (arcs)",
    "cover": "; its masks train scattered row blocks per microbatch, the blocks taking turns (cover)",
}


def _token_unit(task: dict) -> str:
    """What a token is: ``bytes``, or the byte-pair vocabulary's size."""
    vocab = task.get("vocab_size", 256)
    return "bytes" if vocab == 256 else f"tokens of a {vocab:,}-token vocabulary"


def _monitor_levels(cfg: DemoConfig) -> list[float] | None:
    """TimelyFreeze's monitoring levels in this run (None without a TimelyFreeze method)."""
    if not any(m in TIMELYFREEZE_METHODS for m in cfg.methods):
        return None
    return list(cfg.timelyfreeze_config(seed=0).monitor_levels)


def _monitoring_text(cfg: dict) -> str:
    if cfg.get("monitoring") == "frozen":
        return " It measures the frozen bound with every unit frozen for one window (no learning)."
    levels = cfg.get("monitor_ratios")
    if not levels:
        return ""
    ratios = ", ".join(f"{r:g}" for r in levels)
    text = f" It measures the frozen bound with microbatches at freeze ratios {ratios}"
    if 0 in levels:
        return text + " in turn in the same steps, both bounds fitted from those steps."
    return text + " in turn, after a window of unfrozen steps."


def _intro(report: dict) -> list[str]:
    cfg, task = report["config"], report.get("task", {})
    seeds = report["seeds"]
    unit = _token_unit(task)
    run = (
        f"{cfg['schedule']} over {cfg['ranks']} ranks ({cfg['num_stages']} stages), {cfg['microbatches']} "
        f"microbatches of {cfg['microbatch_size']} x {cfg['seq_len']} {unit}, {cfg['steps']} steps per "
        f"method, AdamW at peak lr {cfg['peak_lr']:g} (warm-up {cfg['warmup_steps']} steps, no freezing "
        f"before it), {'seed' if len(seeds) == 1 else 'mean ± sd over seeds'} {', '.join(map(str, seeds))}."
    )
    if any(m in TIMELYFREEZE_METHODS for m in cfg["methods"]):
        run += (
            f" TimelyFreeze caps each stage's mean freeze ratio at {cfg['max_freeze_ratio']:g} and each "
            f"microbatch's at {cfg['freeze_action_cap']:g}{_LAYOUT_TEXT.get(cfg.get('mask_layout'), '')}."
            f"{_monitoring_text(cfg)}"
        )
    if any(freezes(m) for m in cfg["methods"]):
        rescaled = (
            "rescaled to the mean over the microbatches that trained it" if cfg["rescale_grads"] else "summed"
        )
        run += (
            f" A partly frozen row's gradient is {rescaled}, and its AdamW step is scaled by "
            f"(microbatches / active microbatches) ^ {cfg.get('step_scale', 0):g}."
        )
        if cfg.get("output_layer") == "trained":
            run += " The output layer trains on every microbatch; the methods freeze decoder layers' rows."
    if cfg["task"] == "finetune":
        what = (
            f"Fine-tuning on {task.get('corpus')} from the base model {task.get('base')} (pretrained "
            "without freezing; its validation loss here before fine-tuning: "
            f"{_fmt(task.get('base_val_loss'), '.4f')})."
        )
    else:
        what = f"Training from scratch on {task.get('corpus')}."
    val = task.get("validation", {})
    w0, w1 = report["per_seed"][0]["window_steps"]
    return [
        "# tfz demo",
        "",
        what,
        run,
        f"Validation: the same {val.get('sequences')} sequences ({val.get('tokens'):,} {unit}) of held-out "
        "files for every method and seed; evaluation time is not training time. Over steps "
        f"{w0 + 1}-{w1} (every method's freezing in force): tokens/s is the window's tokens over its "
        "total step time (the gain is its ratio); batch times are the steps' medians.",
    ]


def markdown(report: dict, figures: list[str]) -> str:
    lines = _intro(report) + [
        "",
        "| method | tokens/s | gain | mean freeze ratio per stage | val loss | vs none | "
        "none's val loss at equal time | time to target (s) | batch ms measured | batch ms predicted |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in report["methods"]:
        lines.append(
            f"| {name} | {_cell(report, name, 'tokens_per_s', ',.0f')} | "
            f"{_cell(report, name, 'throughput_gain', '.3f')}x | "
            f"{_cell(report, name, 'mean_freeze_ratio', '.2f')} | {_cell(report, name, 'val_loss', '.4f')} | "
            f"{_cell(report, name, 'val_loss_vs_none', '+.2%')} | "
            f"{_cell(report, name, 'none_val_loss_at_equal_time', '.4f')} | "
            f"{_cell(report, name, 'time_to_target_s', '.1f', 'never')} | "
            f"{_cell(report, name, 'batch_time_measured_ms', '.1f')} | "
            f"{_cell(report, name, 'batch_time_predicted_ms', '.1f')} |"
        )
    ses = [
        sp["val_loss_vs_none"]["se_validation"]
        for sp in report["spread"].values()
        if sp.get("val_loss_vs_none") is not None
    ]
    if ses:
        lines += [
            "",
            f'"vs none": final validation loss relative to no freezing\'s, paired over the same sequences; '
            f"the validation set's own standard error of that difference is {max(ses):.2%} or less "
            f"({'per seed' if len(report['seeds']) == 1 else 'of the mean over seeds'}). \"None's val loss "
            "at equal time\": no freezing's validation loss at the method's total training time, measured on "
            "no freezing's weights saved after the steps on either side of that time (one step apart, "
            "further only if a long run outgrew the room for them) and interpolated between them, "
            'not read off its curve. "Time to target": training time to reach no freezing\'s final '
            "validation loss (interpolated between evaluations).",
        ]
    if report.get("goals"):
        lines += ["", "Goals (TimelyFreeze vs no freezing):", ""]
        for key, g in report["goals"].items():
            value = g["value"]
            shown = (
                "-" if value is None else (f"{value:.3f}x" if key == "throughput_gain" else f"{value:+.2%}")
            )
            line = f"- {key}: {shown} (goal {g['goal']}): {'met' if g['met'] else 'NOT met'}"
            if g.get("planned") is not None:
                line += (
                    f" (the plan's own batch speedup {g['planned']:.3f}x; with every row of every "
                    f"backward frozen at most {g['ceiling']:.3f}x, on the times it measured"
                )
                if g.get("planned_unfrozen_ms") and g.get("none_measured_ms"):
                    line += (
                        f", whose unfrozen batch is {g['planned_unfrozen_ms']:.0f} ms against no "
                        f"freezing's measured {g['none_measured_ms']:.0f} ms"
                    )
                line += ")"
            if g.get("flop_bound") is not None:
                line += (
                    f" (by the linear layers' FLOPs at most {g['flop_bound']:.3f}x: the busiest rank with "
                    "every stage frozen at the cap, were they all its work)"
                )
            if g.get("over_tfz_none") is not None:
                line += (
                    f" (over tfz-none, no freezing through the same stage: {g['over_tfz_none']:.3f}x, "
                    "the gain of freezing itself)"
                )
            if g.get("gap_ms") is not None:
                line += (
                    f" (the plan adds {g['gap_ms']:.2f} ms between actions, fitted to the measured batches)"
                )
            if g.get("none_batch_time_shift") is not None:
                line += (
                    f" (no freezing's own batch time moved {g['none_batch_time_shift']:+.1%} between "
                    "TimelyFreeze's unfrozen monitoring and the window: the machine's speed drift)"
                )
            lines.append(line)
    if len(report["per_seed"]) > 1:
        lines += [
            "",
            "Per seed:",
            "",
            "| seed | method | gain | val loss | vs none (± SE) | at equal time vs none (± SE) "
            "| prediction vs measured |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in report["per_seed"]:
            for name, m in r["methods"].items():
                paired = m.get("val_loss_vs_none")
                vs = "-" if not paired else f"{paired['rel']:+.2%} ± {paired['se_rel']:.2%}"
                eq_paired = m.get("val_loss_vs_none_at_equal_time")
                eq = "-" if not eq_paired else f"{eq_paired['rel']:+.2%} ± {eq_paired['se_rel']:.2%}"
                pred = m.get("batch_time_predicted_ms")
                meas = m.get("batch_time_measured_ms")
                pm = "-" if pred is None or not meas else f"{pred / meas - 1:+.1%}"
                lines.append(
                    f"| {r['seed']} | {name} | {_fmt(m['throughput_gain'], '.3f')}x | "
                    f"{_fmt(m['val_loss'], '.4f')} | {vs} | {eq} | {pm} |"
                )
    if figures:
        lines += ["", *[f"![{f}]({f})" for f in figures]]
    lines += [
        "",
        "![loss vs wall time](loss_vs_time.png)",
        "",
        "![freeze ratio](freeze_ratio.png)",
        "",
        "![batch time](batch_time.png)",
        "",
    ]
    return "\n".join(lines)
