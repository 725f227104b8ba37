"""``tfz demo``: train a small LLaMA-style model pipelined over CPU ranks, with and without freezing.

:func:`run_demo` makes sure the base model exists (``--task finetune``; :mod:`tfz.demo.base`), then,
once per seed, spawns ``config.ranks`` processes (gloo), trains every method in lockstep
(:mod:`tfz.demo.worker`) and finally writes the report of all seeds (:mod:`tfz.demo.report`). Under
``torchrun`` the same entry point uses the processes torchrun started.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tfz.demo.config import METHODS, TASKS, DemoConfig

__all__ = ["METHODS", "TASKS", "DemoConfig", "prepare", "run_demo"]


def _gathering_rank(rank: int, world: int, cfg: DemoConfig, seed: int):
    import torch.distributed as dist

    from tfz.demo.worker import run_rank

    result = run_rank(rank, world, cfg, seed)
    everything: list[Any] = [None] * world
    dist.all_gather_object(everything, result)
    return everything if rank == 0 else None


def _checked_base(cfg: DemoConfig):
    """The base model of ``cfg.base``, refused (ValueError naming it) if it cannot run this demo."""
    from tfz.demo.base import load_base

    base = load_base(cfg.base)
    base.check_fits(cfg.build_schedule().num_stages, cfg.seq_len)
    return base


def _long_enough(cfg: DemoConfig, corpus):
    """``corpus``, refused (ValueError naming the split) unless both splits hold a sequence."""
    import numpy as np

    corpus.sequences("val", cfg.val_sequences, cfg.seq_len)
    corpus.batch("train", 1, cfg.seq_len, np.random.default_rng(0))
    return corpus


def prepare(
    cfg: DemoConfig, progress: Callable[[str], None] = print, announce: Callable[[], None] | None = None
) -> tuple[DemoConfig, dict[str, Any]]:
    """Check the data and the base before any rank starts, building the default base on first use.

    Returns the config with ``base`` set to the base file (finetune) and what the report says about
    the task: the corpus, the base and the validation set. Bad data or a bad base raise ValueError /
    OSError naming it; ``announce`` is called once both passed, before the default base is built.
    """
    from tfz.demo.worker import encode_data, load_data

    corpus = _long_enough(cfg, load_data(cfg))  # bytes: no fewer than tokens, checked before any build
    base = _checked_base(cfg) if cfg.task == "finetune" and cfg.base is not None else None
    if announce is not None:
        announce()
    info: dict[str, Any] = {"task": cfg.task, "corpus": corpus.source}
    if cfg.task == "finetune":
        if cfg.base is None:
            from tfz.demo.base import ensure_base

            num_stages = cfg.build_schedule().num_stages
            base, _ = ensure_base(cfg.base_spec(num_stages), cfg.cache_folder, progress=progress)
            base.check_fits(num_stages, cfg.seq_len)
            cfg = cfg.replace(base=str(base.path))
        info["base"] = cfg.base
        info["base_metrics"] = base.metrics
    corpus = _long_enough(cfg, encode_data(cfg, corpus, base, progress))
    info["vocab_size"] = 256 if corpus.tokenizer is None else corpus.tokenizer.vocab_size
    info["validation"] = {
        "sequences": cfg.val_sequences,
        "tokens": cfg.val_sequences * cfg.seq_len,
        "split_tokens": int(len(corpus.val)),
    }
    return cfg, info


def _torchrun_config(cfg: DemoConfig) -> tuple[DemoConfig, int]:
    """(``cfg`` with torchrun's ``WORLD_SIZE`` ranks, this process's ``RANK``); ValueError naming the
    environment variable when it is bad or the demo cannot run that many ranks."""
    from tfz.demo.config import check_ranks
    from tfz.pipeline.launch import ranks_from_env

    rank, world = ranks_from_env()
    check_ranks(world, f"WORLD_SIZE={world}")
    try:
        return cfg.replace(ranks=world), rank
    except ValueError as exc:
        raise ValueError(f"WORLD_SIZE={world}: {exc}") from None


def run_demo(
    cfg: DemoConfig, progress: Callable[[str], None] = print, announce: Callable[[], None] | None = None
) -> dict[str, Any] | None:
    """Train every seed, then write the report into ``cfg.out``; returns the report (None on non-zero
    torchrun ranks). ``announce`` is called once the data and a given base passed their checks."""
    from tfz.demo.report import build_report, combine, write_outputs
    from tfz.pipeline import launch, run_from_env

    torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = 0
    if torchrun:
        cfg, rank = _torchrun_config(cfg)
    leader = rank == 0
    cfg, info = prepare(cfg, progress if leader else lambda _: None, announce if leader else None)
    per_seed, first_merged = [], None
    for seed in cfg.seeds:
        if len(cfg.seeds) > 1:
            progress(f"seed {seed}:")
        if torchrun:
            results = run_from_env(_gathering_rank, cfg, seed, backend="gloo")
            if results is None:
                continue
        else:
            from tfz.demo.worker import run_rank

            results = launch(run_rank, cfg.ranks, cfg, seed, timeout=cfg.timeout)
        seed_report, merged = build_report(results, cfg, seed)
        per_seed.append(seed_report)
        first_merged = first_merged or merged
    if not per_seed:
        return None
    none_first = [r["methods"].get("none", {}).get("evals") for r in per_seed]
    starts = [e[0]["val_loss"] for e in none_first if e and e[0]["step"] == 0]
    if starts:
        info["base_val_loss" if cfg.task == "finetune" else "initial_val_loss"] = sum(starts) / len(starts)
    report = combine(per_seed, cfg, {"task": info})
    write_outputs(report, first_merged, cfg, Path(cfg.out))
    return report
