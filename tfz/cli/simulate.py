"""Simulate one training step of a pipeline schedule: makespan, per-rank bubbles, critical path.

Times are uniform (--f/--i/--w, 1 ms each by default; full backward B = I + W) or read from a
tfz-profile JSON (--profile); --gap adds time between actions to every action. Nothing is frozen.
--trace writes a Chrome trace (open it in https://ui.perfetto.dev), --png a Gantt chart.
"""

from __future__ import annotations

import argparse
import json

from tfz.cli._common import (
    add_schedule_arguments,
    add_time_arguments,
    check_stdout,
    check_timeline_outputs,
    durations_from_args,
    path_arg,
    profile_from_args,
    schedule_from_args,
    write_timelines,
)

__all__ = ["add_arguments", "run", "summary"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_schedule_arguments(parser)
    add_time_arguments(parser)
    out = parser.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")
    out.add_argument(
        "--trace", type=path_arg, metavar="FILE", help="write a Chrome trace JSON (.json or .json.gz)"
    )
    out.add_argument("--png", type=path_arg, metavar="FILE", help="write a Gantt chart PNG")


def summary(sim) -> dict:
    """The ``--json`` object: makespan (ms), per-rank bubble ratio and busy time, critical path."""
    dag = sim.dag
    sched = dag.schedule
    return {
        "schedule": sched.name,
        "ranks": dag.num_ranks,
        "stages": dag.num_stages,
        "stages_per_rank": sched.stages_per_rank,
        "microbatches": sched.num_microbatches,
        "num_actions": dag.num_actions,
        "num_edges": dag.num_edges,
        "unit": "ms",
        "makespan": sim.makespan,
        "bubble_ratio": sim.bubble_ratio.tolist(),
        "busy": sim.busy.tolist(),
        "critical_path": [str(a) for a in sim.critical_path],
    }


def _format(s: dict) -> str:
    cp = s["critical_path"]
    bubbles = " ".join(f"{100 * b:.1f}%" for b in s["bubble_ratio"])
    mean = 100 * sum(s["bubble_ratio"]) / len(s["bubble_ratio"])
    return "\n".join(
        [
            f"{s['schedule']}: {s['ranks']} ranks, {s['stages']} stages, {s['microbatches']} microbatches, "
            f"{s['num_actions']} actions",
            f"makespan: {s['makespan']:.6g} ms",
            f"bubble per rank: {bubbles} (mean {mean:.1f}%)",
            f"critical path: {len(cp)} actions, {cp[0]} ... {cp[-1]}",
        ]
    )


def run(args: argparse.Namespace) -> int:
    from tfz.dag import build_dag, simulate

    check_stdout()
    check_timeline_outputs(args)
    profile = profile_from_args(args)
    dag = build_dag(schedule_from_args(args))
    unfrozen, _ = durations_from_args(args, profile, dag)
    sim = simulate(dag, unfrozen)
    written = write_timelines(args, sim)
    s = summary(sim) | {"gap_ms": args.gap}
    if args.json:
        print(json.dumps(s), flush=True)
    else:
        lines = [_format(s)]
        lines += [f"wrote {path}" for path in written]
        print("\n".join(lines), flush=True)
    return 0
