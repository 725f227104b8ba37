"""``tfz demo``: train a small LLaMA-style model pipelined over CPU ranks, with and without freezing.

:func:`run_demo` spawns ``config.ranks`` processes (gloo), trains every method in lockstep
(:mod:`tfz.demo.worker`) and writes the report (:mod:`tfz.demo.report`). Under ``torchrun`` the same
entry point uses the processes torchrun started.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tfz.demo.config import METHODS, DemoConfig

__all__ = ["METHODS", "DemoConfig", "run_demo"]


def _gathering_rank(rank: int, world: int, cfg: DemoConfig):
    import torch.distributed as dist

    from tfz.demo.worker import run_rank

    result = run_rank(rank, world, cfg)
    everything: list[Any] = [None] * world
    dist.all_gather_object(everything, result)
    return everything if rank == 0 else None


def run_demo(cfg: DemoConfig) -> dict[str, Any] | None:
    """Train, then write the report into ``cfg.out``; returns the report (None on non-zero torchrun ranks)."""
    from tfz.demo.report import build_report, write_outputs
    from tfz.pipeline import launch, run_from_env

    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        world = int(os.environ["WORLD_SIZE"])
        if world != cfg.ranks:
            cfg = DemoConfig(**{**cfg.__dict__, "ranks": world})
        results = run_from_env(_gathering_rank, cfg, backend="gloo")
        if results is None:
            return None
    else:
        from tfz.demo.worker import run_rank

        results = launch(run_rank, cfg.ranks, cfg, timeout=cfg.timeout)
    report, merged = build_report(results, cfg)
    write_outputs(report, merged, cfg, Path(cfg.out))
    return report
