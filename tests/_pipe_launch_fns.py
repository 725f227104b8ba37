"""Rank functions for tests/test_launch.py (module level, so spawned processes can import them)."""

from __future__ import annotations

import os
import time


def rank_info(rank: int, world: int, tag: str) -> dict:
    """What a rank sees: its arguments, environment and an all-reduce over the group."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return {
        "rank": rank,
        "world": world,
        "tag": tag,
        "env": (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]),
        "dist": (dist.get_rank(), dist.get_world_size()),
        "sum": float(t),
        "tensor": torch.arange(3) * rank,
    }


class CustomError(Exception):
    """An exception type defined outside builtins."""


def raise_on(rank: int, world: int, bad_rank: int, kind: str) -> None:
    """``bad_rank`` fails (raises or dies); the others block in a collective that never completes."""
    import torch
    import torch.distributed as dist

    if rank == bad_rank:
        time.sleep(0.2)
        if kind == "value":
            raise ValueError(f"bad value on rank {rank}")
        if kind == "custom":
            raise CustomError("custom failure")
        if kind == "exit":
            os._exit(7)
    dist.all_reduce(torch.ones(1))  # the failing rank never joins: the others would wait forever
    dist.all_reduce(torch.ones(1))


def sleep_forever(rank: int, world: int) -> None:
    time.sleep(3600)


def unpicklable_result(rank: int, world: int):
    return lambda: rank


def torchrun_main() -> None:
    """Entry of the torchrun test script: print one line per rank."""
    from tfz.pipeline import run_from_env

    info = run_from_env(rank_info, "torchrun")
    print(f"RESULT {info['rank']} {info['world']} {info['sum']}", flush=True)
