"""Train a small LLaMA-style decoder byte-level on text that needs no download (the Python standard
library's sources), pipelined over CPU ranks with torch.distributed.pipelining and gloo, with no
freezing and with TimelyFreeze (or every method), and write report.json, report.md, timelines, Chrome
traces and a loss-vs-wall-time plot. Under torchrun the same command uses torchrun's processes."""

from __future__ import annotations

import argparse

from tfz.cli import UsageError


def _methods(text: str) -> tuple[str, ...]:
    from tfz.demo import METHODS

    if text.strip() == "all":
        return METHODS
    names = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in names if m not in METHODS]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown method(s) {bad or text!r}; choose from {', '.join(METHODS)} or all"
        )
    return names


def add_arguments(p: argparse.ArgumentParser) -> None:
    from tfz.demo import DemoConfig
    from tfz.schedule import SCHEDULES

    d = DemoConfig()
    p.add_argument(
        "--schedule", choices=SCHEDULES, default=d.schedule, help="pipeline schedule (default %(default)s)"
    )
    p.add_argument("--ranks", type=int, default=d.ranks, help="pipeline ranks (default %(default)s)")
    p.add_argument(
        "--steps", type=int, default=d.steps, help="optimizer steps per method (default %(default)s)"
    )
    p.add_argument(
        "--methods",
        type=_methods,
        default=d.methods,
        help="comma list of none, timelyfreeze, apf, autofreeze, timelyfreeze+apf, timelyfreeze+autofreeze, "
        "or all (default none,timelyfreeze)",
    )
    p.add_argument(
        "--max-freeze-ratio",
        type=float,
        default=d.max_freeze_ratio,
        help="TimelyFreeze cap (default %(default)s)",
    )
    p.add_argument(
        "--data", default=None, help="text file or folder (default: the standard library's sources)"
    )
    p.add_argument("--out", default=d.out, help="output folder (default %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed (default %(default)s)")
    p.add_argument(
        "--microbatches", type=int, default=d.microbatches, help="microbatches per step (default %(default)s)"
    )
    p.add_argument(
        "--phase-unit",
        type=int,
        default=d.phase_unit,
        help="TimelyFreeze phase unit in steps (default %(default)s)",
    )
    p.add_argument(
        "--eval-every", type=int, default=d.eval_every, help="validation interval (default %(default)s)"
    )


def run(args) -> int:
    from tfz.demo import DemoConfig, run_demo
    from tfz.demo.report import markdown

    cfg = DemoConfig(
        schedule=args.schedule,
        ranks=args.ranks,
        steps=args.steps,
        methods=args.methods,
        max_freeze_ratio=args.max_freeze_ratio,
        data=args.data,
        out=args.out,
        seed=args.seed,
        microbatches=args.microbatches,
        phase_unit=args.phase_unit,
        eval_every=args.eval_every,
    )
    if args.data is not None:
        from pathlib import Path

        if not Path(args.data).exists():
            raise UsageError(f"--data {args.data} does not exist")
    print(
        f"tfz demo: {cfg.schedule} over {cfg.ranks} ranks, {cfg.steps} steps, "
        f"methods {', '.join(cfg.methods)} -> {cfg.out}/",
        flush=True,
    )
    report = run_demo(cfg)
    if report is None:
        return 0
    print()
    print(markdown(report, []).split("![loss")[0].strip())
    print(f"\nwrote {cfg.out}/report.json, report.md, loss_vs_time.png, timelines and traces")
    return 0
