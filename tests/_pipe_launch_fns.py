"""Rank functions for tests/test_launch.py (module level, so spawned processes can import them)."""

from __future__ import annotations

import os
import time
from pathlib import Path


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


def pause_between_heartbeats(rank: int, world: int, pause_s: float, busy: bool) -> int:
    """Report once, then compute (``busy``) or sleep for ``pause_s`` without reporting, then report."""
    from tfz.pipeline import heartbeat

    heartbeat("start", step=0)
    end = time.monotonic() + pause_s
    x = 0
    while time.monotonic() < end:
        if busy:
            x = sum(i * i for i in range(20000)) + x % 7  # an evaluation or a checkpoint between actions
        else:
            time.sleep(0.05)
    heartbeat("end", step=1)
    return rank


def sleep_forever(rank: int, world: int) -> None:
    time.sleep(3600)


def write_pid_then_sleep(rank: int, world: int, folder: str) -> None:
    """Write this rank's pid to ``folder/rank<r>.pid`` (whole, by rename), then sleep for an hour."""
    path = Path(folder) / f"rank{rank}.pid"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(str(os.getpid()))
    tmp.rename(path)
    time.sleep(3600)


def unpicklable_result(rank: int, world: int):
    return lambda: rank


def torchrun_main() -> None:
    """Entry of the torchrun test script: print one line per rank."""
    from tfz.pipeline import run_from_env

    info = run_from_env(rank_info, "torchrun")
    print(f"RESULT {info['rank']} {info['world']} {info['sum']}", flush=True)


class _SleepingProvider:
    """Freezes nothing; its ``call``-th mask request (counting from 0) sleeps for an hour, inside
    the backward action that asked."""

    def __init__(self, call: int):
        self.call, self.calls = call, 0

    def masks_for(self, stage, mb):
        self.calls += 1
        if self.calls - 1 == self.call:
            time.sleep(3600)
        return None


def run_hanging(rank: int, world: int, hang_rank: int, where: str, steps: int = 3) -> str:
    """1F1B over 2 ranks for ``steps`` steps; ``hang_rank`` sleeps for an hour ``where``: "action"
    (in its backward of microbatch 2 of step 1) or "between" (after step 1, outside any action)."""
    import torch
    import torch.nn.functional as F
    from _pipe_workers import MICROBATCHES, make_batch, make_stage_module
    from torch.distributed.pipelining import Schedule1F1B

    import tfz.nn
    from tfz.pipeline import FreezeAwareStage

    torch.set_num_threads(1)
    module = tfz.nn.convert_to_freezable(make_stage_module(rank))
    asleep = rank == hang_rank and where == "action"
    provider = _SleepingProvider(MICROBATCHES + 2 if asleep else -1)  # step 1, microbatch 2
    stage = FreezeAwareStage(module, rank, world, torch.device("cpu"), provider=provider)
    schedule = Schedule1F1B(stage, MICROBATCHES, loss_fn=lambda o, t: F.mse_loss(o, t))
    x, y = make_batch()
    for step in range(steps):
        schedule.step(*((x,) if rank == 0 else ()), **({"target": y} if rank == world - 1 else {}))
        if step == 1 and rank == hang_rank and where == "between":
            time.sleep(3600)
    return "finished"


class _Sentinel:
    """Records, when it is freed, whether the process group still existed."""

    freed_with_group: list[bool] = []

    def __del__(self):
        import torch.distributed as dist

        _Sentinel.freed_with_group.append(dist.is_initialized())


def leave_a_cycle(rank: int, world: int) -> None:
    """Return leaving a reference cycle that holds a sentinel (as pipeline stages and works do)."""
    cycle = [_Sentinel()]
    cycle.append(cycle)


def destroy_group_then_return(rank: int, world: int) -> int:
    """Destroy the process group itself (a common clean-up at the end of training), then return."""
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    return rank * 10
