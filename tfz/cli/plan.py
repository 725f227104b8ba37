"""Solve the freeze-ratio LP for a schedule: how much to freeze each backward so the step is shortest.

Times are uniform (--f/--i/--w/--w-frozen in ms; full backward B = I + W, frozen I + W_frozen) or
read from a tfz-profile JSON (--profile); --gap adds time between actions to every action. The plan
minimises the step time, then the total freezing, with each stage's mean freeze ratio at most
--max-freeze-ratio. --json prints the whole plan; --trace and --png show the planned timeline with
B/W coloured by freeze ratio.
"""

from __future__ import annotations

import argparse
import json
import sys

from tfz._defaults import MAX_FREEZE_RATIO
from tfz.cli import UsageError
from tfz.cli._common import (
    add_schedule_arguments,
    add_time_arguments,
    check_stdout,
    check_timeline_outputs,
    durations_from_args,
    path_arg,
    profile_from_args,
    ratio,
    schedule_from_args,
    write_timelines,
)

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_schedule_arguments(parser)
    add_time_arguments(parser, frozen=True)
    lp = parser.add_argument_group("freezing")
    lp.add_argument(
        "--max-freeze-ratio",
        type=ratio,
        default=MAX_FREEZE_RATIO,
        metavar="X",
        help=f"cap on each stage's mean freeze ratio, in [0, 1] (default {MAX_FREEZE_RATIO:g})",
    )
    lp.add_argument(
        "--action-cap", type=ratio, default=None, metavar="X", help="cap on every single ratio (default 1)"
    )
    lp.add_argument(
        "--makespan-slack",
        type=ratio,
        default=0.0,
        metavar="X",
        help="freeze as little as a step time (1 + X) times the shortest allows (default 0)",
    )
    lp.add_argument(
        "--weighting",
        choices=("count", "duration"),
        default="count",
        help="stage mean over actions (count, default) or weighted by unfrozen duration",
    )
    lp.add_argument(
        "--solver",
        choices=("structured", "generic"),
        default="structured",
        help="structured (default) or the plain HiGHS formulation (reference)",
    )
    out = parser.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    out.add_argument(
        "--trace", type=path_arg, metavar="FILE", help="write a Chrome trace JSON of the planned step"
    )
    out.add_argument(
        "--png", type=path_arg, metavar="FILE", help="write a Gantt chart PNG of the planned step"
    )


def _format(plan, dag) -> str:
    means = plan.stage_mean_ratio
    shown = " ".join(f"{m:.2f}" for m in means[:16]) + (" ..." if len(means) > 16 else "")
    lines = [
        f"{dag.schedule.name}: {dag.num_ranks} ranks, {dag.num_stages} stages, "
        f"{dag.schedule.num_microbatches} microbatches, {dag.num_actions} actions",
        f"makespan unfrozen:   {plan.makespan_unfrozen:.6g} ms",
        f"makespan all frozen: {plan.makespan_all_frozen:.6g} ms",
        f"makespan planned:    {plan.makespan_planned:.6g} ms ({plan.speedup:.3f}x faster than unfrozen)",
        f"mean freeze ratio per stage (cap {plan.max_freeze_ratio:g}): {shown}",
    ]
    if plan.makespan_slack:
        lines.insert(4, f"makespan budget:     (1 + {plan.makespan_slack:g}) x the shortest")
    if plan.cannot_gain:
        names = " ".join(plan.cannot_gain[:8]) + (" ..." if len(plan.cannot_gain) > 8 else "")
        lines.append(
            f"cannot gain from freezing (frozen time not below unfrozen; ratio 0, counted in the means): "
            f"{len(plan.cannot_gain)} actions: {names}"
        )
    lines.append(f"solved in {plan.solve_seconds:.3f} s ({plan.status})")
    return "\n".join(lines)


def _solve(args, dag, unfrozen, frozen):
    """The plan for the times as given (the planner normalises its own scale); UsageError naming the
    times when the planner fails or a result is not finite."""
    import numpy as np

    from tfz.plan import PlanConfig, PlanSolveError, solve, solve_generic

    config = PlanConfig(args.max_freeze_ratio, args.action_cap, args.weighting, args.makespan_slack)
    times = f"action times {float(np.min(unfrozen)):.6g} to {float(np.max(unfrozen)):.6g} ms"
    try:
        with np.errstate(all="ignore"):  # results are checked below; no warnings beside the one line
            plan = (solve if args.solver == "structured" else solve_generic)(dag, unfrozen, frozen, config)
    except PlanSolveError as exc:
        raise UsageError(f"the {args.solver} planner failed for {times}: {exc}") from exc
    spans = [getattr(plan, k) for k in ("makespan_planned", "makespan_unfrozen", "makespan_all_frozen")]
    if not np.all(np.isfinite(spans)):
        raise UsageError(
            f"{times}: the step takes longer than float64 can hold; give the times in a larger unit"
        )
    numbers = [plan.speedup, plan.total_ratio, *plan.stage_mean_ratio]
    if not (np.all(np.isfinite(numbers)) and np.all((plan.ratios >= 0) & (plan.ratios <= 1))):
        raise UsageError(f"the {args.solver} planner returned a plan that is not finite for {times}")
    return plan


LARGE_PLAN = 65_536
"""Actions from which ``tfz plan`` says on stderr that the solve takes a while (seconds to a minute:
:data:`tfz.schedule.limits.MAX_PLAN_ACTIONS`)."""


def run(args: argparse.Namespace) -> int:
    from tfz.dag import build_dag, simulate
    from tfz.schedule.limits import MAX_PLAN_ACTIONS

    check_stdout()
    check_timeline_outputs(args)
    profile = profile_from_args(args)
    dag = build_dag(schedule_from_args(args, MAX_PLAN_ACTIONS[args.solver]))
    unfrozen, frozen = durations_from_args(args, profile, dag)
    if dag.num_actions >= LARGE_PLAN:
        print(
            f"tfz plan: solving for {dag.num_actions:,} actions (seconds to a minute at this size)",
            file=sys.stderr,
            flush=True,
        )
    plan = _solve(args, dag, unfrozen, frozen)
    written = []
    if args.trace or args.png:
        sim = simulate(dag, plan.durations(unfrozen, frozen))
        title = f"{dag.schedule.name}: planned freezing (cap {plan.max_freeze_ratio:g})"
        written = write_timelines(args, sim, plan.ratios, title=title)
    if args.json:
        d = plan.to_dict()
        d.update(
            ranks=dag.num_ranks,
            stages=dag.num_stages,
            microbatches=dag.schedule.num_microbatches,
            unit="ms",
            gap_ms=args.gap,
        )
        print(json.dumps(d), flush=True)
    else:
        lines = [_format(plan, dag)]
        if args.gap:
            lines.insert(1, f"every time above includes {args.gap:g} ms between actions (--gap)")
        lines += [f"wrote {path}" for path in written]
        print("\n".join(lines), flush=True)
    return 0
