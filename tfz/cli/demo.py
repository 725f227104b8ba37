"""Train a small LLaMA-style decoder on a byte-pair vocabulary learned from its base's corpus, pipelined
over CPU ranks with torch.distributed.pipelining and gloo, with no freezing and with TimelyFreeze (or
every method), and write report.json, report.md, timelines, Chrome traces and a
validation-loss-vs-wall-time plot. By default every method fine-tunes the same base model
(pretrained without freezing on the Python standard library's sources; built once on first use and
cached) on torch's own Python sources, as in the paper's experiments; --task pretrain trains from
scratch. No download is needed. Under torchrun the same command uses torchrun's processes."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from tfz._validate import MAX_SEED, short_repr
from tfz.cli import UsageError
from tfz.cli._common import path_arg, positive_float, ratio, schedule_name, step_exponent


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


def _seeds(text: str) -> tuple[int, ...]:
    """argparse type: comma-separated distinct integers in [0, MAX_SEED] ("0,1,2"), as tfz profile --seed."""
    parts = [p.strip() for p in text.split(",")]
    try:
        seeds = tuple(int(p) for p in parts)
    except ValueError:  # also more than 4300 digits
        seeds = ()
    if not seeds or any(not 0 <= s <= MAX_SEED for s in seeds):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers in [0, {MAX_SEED:,}], got {short_repr(text)}"
        )
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"seeds repeat in {short_repr(text)}")
    return seeds


def _ratios(text: str) -> tuple[float, ...]:
    """argparse type: comma-separated numbers ("0,0.8"); TimelyFreezeConfig checks their range."""
    try:
        return tuple(float(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {short_repr(text)}"
        ) from None


def check_folder(label: str, path: str | Path) -> Path:
    """A folder before any work: an existing writable one, or one that can be made in a writable
    folder (made only once the run ends, so a refused run leaves nothing behind)."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{label} {str(path)!r} exists and is not a folder")
    parent = folder
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{label} {str(path)!r}: {str(parent)!r} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{label} {str(path)!r}: {str(parent)!r} is not writable")
    return folder


def _flags():
    """(flag, DemoConfig field, argparse type, help) of every ``tfz demo`` flag."""
    from tfz.demo import TASKS
    from tfz.demo.config import OUTPUT_LAYERS
    from tfz.schedule import SCHEDULES

    return (
        (
            "--task",
            "task",
            TASKS,
            "finetune: every method fine-tunes one pretrained base; pretrain: from scratch",
        ),
        ("--schedule", "schedule", SCHEDULES, "pipeline schedule"),
        ("--ranks", "ranks", int, "pipeline ranks"),
        ("--steps", "steps", int, "optimizer steps per method"),
        (
            "--methods",
            "methods",
            _methods,
            "comma list of none, tfz-none (no freezing through tfz's stage), timelyfreeze, apf, "
            "autofreeze, timelyfreeze+apf, timelyfreeze+autofreeze, or all",
        ),
        ("--seeds", "seeds", _seeds, "comma list: one comparison per seed, reported as mean and spread"),
        ("--max-freeze-ratio", "max_freeze_ratio", ratio, "TimelyFreeze cap on each stage's mean ratio"),
        (
            "--action-cap",
            "action_cap",
            ratio,
            "TimelyFreeze cap on each microbatch's ratio (default: --max-freeze-ratio; 1: the paper's LP)",
        ),
        (
            "--makespan-slack",
            "makespan_slack",
            ratio,
            "TimelyFreeze freezes as little as a step (1 + this) times the shortest allows",
        ),
        (
            "--step-scale",
            "step_scale",
            step_exponent,
            "scale each partly frozen row's AdamW step by (microbatches / active microbatches) ** this "
            "(0: AdamW's own step)",
        ),
        (
            "--lr",
            "lr",
            positive_float,
            "peak learning rate (default: the task's, see tfz.demo.DemoConfig.lr)",
        ),
        (
            "--data",
            "data",
            path_arg,
            "text file or folder to train on (finetune: the fine-tuning corpus; default: torch's Python "
            "sources for finetune, the standard library's sources for pretrain)",
        ),
        ("--base", "base", path_arg, "base model file to fine-tune (default: the demo's own, built once)"),
        (
            "--vocab-size",
            "vocab_size",
            int,
            "byte-pair vocabulary of the demo's base and of pretrain runs (256: bytes; --base has its own)",
        ),
        ("--out", "out", path_arg, "output folder"),
        ("--microbatches", "microbatches", int, "microbatches per step"),
        ("--phase-unit", "phase_unit", int, "TimelyFreeze phase unit in steps (default: a tenth of --steps)"),
        (
            "--monitoring",
            "monitoring",
            ("partial", "frozen"),
            "TimelyFreeze's second monitoring half: every action partly frozen, or all frozen (no learning)",
        ),
        (
            "--monitor-ratios",
            "monitor_ratios",
            _ratios,
            "comma list: freeze ratios of TimelyFreeze's partly frozen monitoring half (default 0,0.8: a 0 "
            "measures both bounds in the same steps)",
        ),
        (
            "--output-layer",
            "output_layer",
            OUTPUT_LAYERS,
            "trained: the output layer trains on every microbatch; freezable: methods may freeze its rows",
        ),
        (
            "--mask-layout",
            "mask_layout",
            ("arcs", "cover"),
            "TimelyFreeze's masks: a contiguous run of every layer's rows per microbatch, or scattered "
            "row blocks",
        ),
        ("--eval-every", "eval_every", int, "validation interval in steps"),
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    from tfz.demo import DemoConfig

    fields = DemoConfig.__dataclass_fields__
    for flag, name, kind, text in _flags():
        default = fields[name].default
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        extra = {"choices": kind} if isinstance(kind, tuple) else {"type": kind}
        if name == "schedule":  # any case, as simulate and plan take it
            extra["type"] = schedule_name
        suffix = "" if default is None else f" (default {shown})"
        p.add_argument(flag, dest=name, default=default, help=text + suffix, **extra)


def run(args) -> int:
    from tfz.demo import DemoConfig, run_demo
    from tfz.demo.report import markdown

    cfg = DemoConfig(**{name: getattr(args, name) for _, name, _, _ in _flags()})
    if args.data is not None and not Path(args.data).exists():
        raise UsageError(f"--data {args.data!r} does not exist")
    if args.base is not None and not Path(args.base).is_file():
        raise UsageError(f"--base {args.base!r} is not a file")
    check_folder("--out", cfg.out)
    if cfg.task == "finetune" or cfg.vocab_size > 256:  # a base, vocabulary or encoded text is cached
        from tfz.demo.base import cache_dir

        check_folder("cache folder ($TFZ_CACHE_DIR)", cache_dir(cfg.cache_folder))
    seeds = ", ".join(map(str, cfg.seeds))
    banner = (
        f"tfz demo: {cfg.task}, {cfg.schedule} over {cfg.ranks} ranks, {cfg.steps} steps, "
        f"methods {', '.join(cfg.methods)}, seed{'s' if len(cfg.seeds) > 1 else ''} {seeds} -> {cfg.out}/"
    )
    # the banner once data and base passed their checks; an error in a rank is one line too
    report = run_demo(cfg, announce=lambda: print(banner, flush=True))
    if report is None:
        return 0
    print()
    print(markdown(report, []).split("![loss")[0].strip())
    print(f"\nwrote {cfg.out}/report.json, report.md, loss_vs_time.png, timelines and traces")
    return 0
