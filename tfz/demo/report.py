"""Turn the ranks' records of ``tfz demo`` into report.json, report.md, plots and Chrome traces."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from tfz.dag import DAG, Simulation, build_dag, simulate
from tfz.demo.config import DemoConfig
from tfz.schedule import build_schedule

__all__ = ["GOALS", "build_report", "write_outputs"]

GOALS = {
    "throughput_gain": 1.25,
    "val_loss_rel": 0.01,
    "prediction_rel": 0.10,
}
"""TimelyFreeze vs no freezing: throughput gain >= 1.25x, final validation loss within 1%, predicted
batch time within 10% of the measured one."""

_TF_METHODS = ("timelyfreeze", "timelyfreeze+apf", "timelyfreeze+autofreeze")


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
        "history": per_rank[0]["history"],
        "plan": per_rank[0]["plan"],
        "timeline_durations": per_rank[0].get("timeline_durations"),
        "spans": [pr["spans"] for pr in per_rank],
        "span_ratios": per_rank[0]["span_ratios"],
    }


def _window_start(merged: dict[str, dict], cfg: DemoConfig) -> int:
    """First step of the measurement window shared by all methods: when every TimelyFreeze-based method
    is in its stable phase (freezing in force after warm-up, monitoring and ramp); without one, the
    first step any method freezes; without freezing at all, the end of the learning-rate warm-up."""
    starts = []
    for method in _TF_METHODS:
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
    freezing = [f for f in firsts if f < cfg.steps]
    return min(freezing) if freezing else min(cfg.lr_warmup, cfg.steps - 1)


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
        "evals": [{**e, "wall_time_s": float(wall[e["step"] - 1])} for e in m["evals"]],
        "freeze_ratio_per_step": [
            [round(float(f[i]), 4) for f in m["frozen"].values()] for i in range(m["steps"])
        ],
        "phase_per_step": m["phase"],
        "batch_time_ms_per_step": [round(float(v), 2) for v in m["pipeline_ms"]],
        "predicted_ms_per_step": [None if p is None else round(float(p), 2) for p in m["predicted_ms"]],
        "phases": [list(h) for h in m["history"]],
    }


def build_report(results: list[dict], cfg: DemoConfig) -> tuple[dict[str, Any], dict[str, dict]]:
    """(report, merged per-method records). ``results[rank][method]`` as returned by the ranks."""
    schedule = build_schedule(cfg.schedule, cfg.ranks, cfg.microbatches)
    last_rank = schedule.stage_to_rank[-1]
    merged = {m: _merge(results, m, cfg, last_rank) for m in cfg.methods}
    w0 = _window_start(merged, cfg)
    methods = {name: _method_report(m, cfg, w0) for name, m in merged.items()}
    base = methods.get("none")
    target = base["val_loss"] if base else None
    for rep in methods.values():
        rep["throughput_gain"] = (
            rep["tokens_per_s"] / base["tokens_per_s"]
            if base and rep["tokens_per_s"] and base["tokens_per_s"]
            else None
        )
        rep["time_to_target_s"] = (
            next((e["wall_time_s"] for e in rep["evals"] if e["val_loss"] <= target * (1 + 1e-12)), None)
            if target is not None
            else None
        )
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()}
    config.update(
        tokens_per_step=cfg.tokens_per_step,
        num_stages=schedule.num_stages,
        window_steps=[w0, cfg.steps],
    )
    report = {"config": config, "methods": methods, "goals": _goals(methods)}
    return report, merged


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
    }
    if tf["val_loss"] is not None and base["val_loss"] is not None:
        rel = tf["val_loss"] / base["val_loss"] - 1
        out["val_loss_vs_none"] = {
            "value": rel,
            "goal": f"<= {GOALS['val_loss_rel']:+.0%}",
            "met": rel <= GOALS["val_loss_rel"],
        }
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
    return out


def _machine_shift(base: dict, tf: dict) -> float | None:
    """Relative change of no freezing's own batch time (constant work) from the steps where TimelyFreeze
    measured the unfrozen bound to the measurement window: how far the machine's speed moved between
    the measurements a plan is built on and the steps it is judged on."""
    phases = tf["phase_per_step"]
    monitored = [i for i, p in enumerate(phases) if p == "monitor_upper"]
    window = [i for i, p in enumerate(phases) if p == "stable"]
    times = base["batch_time_ms_per_step"]
    if not monitored or not window:
        return None
    before = float(np.median([times[i] for i in monitored]))
    return float(np.median([times[i] for i in window])) / before - 1 if before > 0 else None


# ---------------------------------------------------------------------- figures and traces


def measured_simulation(dag: DAG, spans_by_rank: list[dict], step: int) -> Simulation | None:
    """The measured timeline of ``step`` as a Simulation: each rank's spans shifted so that its
    start-of-step mark (recorded right after a barrier) is time 0."""
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
    return Simulation(dag, end - start, start, end)


def write_outputs(report: dict, merged: dict[str, dict], cfg: DemoConfig, out: Path) -> list[Path]:
    """Write report.json, report.md, loss_vs_time.png, timelines and traces into ``out``."""
    from tfz.timeline import write_chrome_trace, write_gantt_png

    out.mkdir(parents=True, exist_ok=True)
    written = [out / "report.json"]
    (out / "report.json").write_text(json.dumps(report, indent=2))
    written.append(_plot_losses(report, merged, out / "loss_vs_time.png"))
    written.append(_plot_freezing(report, out / "freeze_ratio.png"))
    written.append(_plot_batch_times(report, out / "batch_time.png"))
    dag = build_dag(build_schedule(cfg.schedule, cfg.ranks, cfg.microbatches))
    figures = []
    method = next((m for m in _TF_METHODS if m in merged), None)
    if method is not None:
        m = merged[method]
        steps = sorted(set().union(*(s.keys() for s in m["spans"])))
        before = [s for s in steps if m["phase"][s] == "monitor_upper"]
        picks = {"before": before[-1] if before else None, "after": steps[-1] if steps else None}
        ratios = None
        if m["plan"] is not None:
            by_name = m["plan"]["ratios"]
            ratios = np.array([by_name.get(name, 0.0) for name in dag.names])
        for label, step in picks.items():
            sim = None if step is None else measured_simulation(dag, m["spans"], step)
            if sim is None:
                continue
            asked = m["span_ratios"].get(step)
            r = None if asked is None or not any(asked) else np.asarray(asked)
            title = f"{method}, measured step {step + 1} ({label} freezing)"
            write_gantt_png(out / f"timeline_{label}.png", sim, r, title=title)
            write_chrome_trace(out / f"trace_{label}.json", sim, r)
            figures.append(f"timeline_{label}.png")
            written += [out / f"timeline_{label}.png", out / f"trace_{label}.json"]
        if m["timeline_durations"] is not None and ratios is not None:
            sim = simulate(dag, np.asarray(m["timeline_durations"]))
            write_gantt_png(out / "timeline_planned.png", sim, ratios, title=f"{method}, planned (LP)")
            write_chrome_trace(out / "trace_planned.json", sim, ratios)
            figures.append("timeline_planned.png")
            written += [out / "timeline_planned.png", out / "trace_planned.json"]
    (out / "report.md").write_text(markdown(report, figures))
    written.append(out / "report.md")
    return written


def _plot_losses(report: dict, merged: dict[str, dict], path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for i, (name, m) in enumerate(merged.items()):
        color = f"C{i}"
        wall = np.cumsum(m["step_ms"]) / 1e3
        loss = m["loss"]
        k = min(10, len(loss))
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(wall[k - 1 :], smooth, color=color, lw=1.2, label=f"{name} (train, mean of {k})")
        evals = report["methods"][name]["evals"]
        if evals:
            ax.plot(
                [e["wall_time_s"] for e in evals],
                [e["val_loss"] for e in evals],
                "o--",
                color=color,
                ms=4,
                lw=0.8,
                label=f"{name} (validation)",
            )
    ax.set_xlabel("training wall time of the method (s)")
    ax.set_ylabel("loss (nats per byte)")
    ax.set_title("loss vs wall time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


def _plot_batch_times(report: dict, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    w0, w1 = report["config"]["window_steps"]
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
    fig.savefig(path)
    return path


def _plot_freezing(report: dict, path: Path) -> Path:
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
    fig.savefig(path)
    return path


def _fmt(value, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def markdown(report: dict, figures: list[str]) -> str:
    cfg = report["config"]
    lines = [
        "# tfz demo",
        "",
        f"{cfg['schedule']} over {cfg['ranks']} ranks ({cfg['num_stages']} stages), {cfg['microbatches']} "
        f"microbatches of {cfg['microbatch_size']} x {cfg['seq_len']} bytes, {cfg['steps']} steps per "
        f"method, seed {cfg['seed']}. Throughput and batch times over steps "
        f"{cfg['window_steps'][0] + 1}-{cfg['window_steps'][1]} (every method's freezing in force).",
        "",
        "| method | tokens/s | gain | mean freeze ratio per stage | train loss | val loss | val acc | "
        "time to target (s) | batch ms measured | batch ms predicted |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in report["methods"].items():
        ratios = " ".join(f"{r:.2f}" for r in m["mean_freeze_ratio"])
        lines.append(
            f"| {name} | {_fmt(m['tokens_per_s'], ',.0f')} | {_fmt(m['throughput_gain'], '.3f')}x | "
            f"{ratios} | "
            f"{m['train_loss']:.4f} | {_fmt(m['val_loss'], '.4f')} | {_fmt(m['val_acc'], '.4f')} | "
            f"{_fmt(m['time_to_target_s'], '.1f', 'never')} | {_fmt(m['batch_time_measured_ms'], '.1f')} | "
            f"{_fmt(m['batch_time_predicted_ms'], '.1f')} |"
        )
    if report.get("goals"):
        lines += ["", "Goals (TimelyFreeze vs no freezing):", ""]
        for key, g in report["goals"].items():
            value = g["value"]
            shown = (
                "-" if value is None else (f"{value:.3f}x" if key == "throughput_gain" else f"{value:+.2%}")
            )
            line = f"- {key}: {shown} (goal {g['goal']}): {'met' if g['met'] else 'NOT met'}"
            if g.get("none_batch_time_shift") is not None:
                line += (
                    f" (no freezing's own batch time moved {g['none_batch_time_shift']:+.1%} between "
                    "TimelyFreeze's unfrozen monitoring and the window: the machine's speed drift)"
                )
            lines.append(line)
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
