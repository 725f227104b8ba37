"""Step time of a 2-rank 1F1B pipeline: torch's PipelineStage vs the freeze-aware stage, freezing off.

Run: ``python -m pytest bench/bench_pipeline.py -q -s --benchmark-enable`` (or ``python
bench/bench_pipeline.py``). Two gloo ranks on CPU (one thread each) run Schedule1F1B over 2 stages
and 8 microbatches of 128 tokens; each stage is 2 blocks of LayerNorm(256) -> Linear(256, 1024) ->
GELU -> Linear(1024, 256) as FreezableLinear, MSE loss. Variants, each with its own copy of the same
weights and its own schedule:

- ``torch``: ``PipelineStage`` (the baseline);
- ``tfz-off``: ``FreezeAwareStage`` without provider: torch's backward, plus action records and W
  FLOP counting (forward pre-hooks);
- ``tfz-zero``: ``FreezeAwareStage`` with a provider that freezes nothing and an ``ActionTimer``:
  every backward goes through tfz's engine;
- ``tfz-half`` (for scale, not an overhead figure): as ``tfz-zero`` with half of every stage's
  FreezableLinear rows frozen (``RatioMasks`` at 0.5, 128-row blocks) for every microbatch.

After warm-up steps, every round runs one step of each variant, in an order rotated per round, with a
barrier before and after each step; the time is rank 0's wall time between the barriers. Reported: the
median step time per variant and the median over rounds of the per-round ratio to ``torch`` (paired,
which cancels slow drifts of a shared machine).
"""

from __future__ import annotations

import os
import statistics
import time

import pytest

ROUNDS = int(os.environ.get("TFZ_BENCH_ROUNDS", "40"))
WARMUP = 3
MICROBATCHES, TOKENS, DIM, HIDDEN, BLOCKS = 8, 128, 256, 1024, 2


class _NoFreezing:
    def masks_for(self, stage, microbatch):
        return None


def _stage_module(stage: int):
    import torch
    from torch import nn

    import tfz.nn

    torch.manual_seed(stage)
    layers = []
    for _ in range(BLOCKS):
        layers += [nn.LayerNorm(DIM), nn.Linear(DIM, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, DIM)]
    return tfz.nn.convert_to_freezable(nn.Sequential(*layers))


def bench_rank(rank: int, world: int, rounds: int, variants: tuple[str, ...]) -> dict[str, list[float]]:
    """One rank: build ``variants``, warm up, then time ``rounds`` interleaved rounds."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    from tfz.masks import StageUnits
    from tfz.pipeline import FreezeAwareStage, RatioMasks
    from tfz.timing import ActionTimer

    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    loss_fn = lambda out, target: F.mse_loss(out, target)  # noqa: E731
    schedules, modules, timers = {}, {}, {}
    for name in variants:
        module = _stage_module(rank)
        if name == "torch":
            stage = PipelineStage(module, rank, world, cpu)
        elif name == "tfz-off":
            stage = FreezeAwareStage(module, rank, world, cpu)
        else:
            timers[name] = ActionTimer("cpu")
            provider = _NoFreezing()
            if name == "tfz-half":
                units = {rank: StageUnits.from_module(module, block_rows=128)}
                provider = RatioMasks({(rank, mb): 0.5 for mb in range(MICROBATCHES)}, units)
            stage = FreezeAwareStage(module, rank, world, cpu, provider=provider, timer=timers[name])
        schedules[name] = Schedule1F1B(stage, MICROBATCHES, loss_fn=loss_fn)
        modules[name] = module
    g = torch.Generator().manual_seed(0)
    x = torch.randn(MICROBATCHES * TOKENS, DIM, generator=g)
    y = torch.randn(MICROBATCHES * TOKENS, DIM, generator=g)

    def step(name: str) -> float:
        modules[name].zero_grad(set_to_none=True)
        dist.barrier()
        start = time.perf_counter()
        if rank == 0:
            schedules[name].step(x)
        else:
            schedules[name].step(target=y)
        dist.barrier()
        elapsed = time.perf_counter() - start
        if name in timers:
            timers[name].collect()
        return elapsed * 1e3

    for _ in range(WARMUP):
        for name in variants:
            step(name)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        for name in order:
            times[name].append(step(name))
    return times


def action_overhead_rank(rank: int, world: int, steps: int) -> dict[str, float]:
    """One process, one stage, GPipe over 8 microbatches of a tiny model (the compute is negligible):
    median step time per variant, interleaved; the difference to ``torch`` / 16 actions is the tfz
    cost per action."""
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    import tfz.nn
    from tfz.pipeline import FreezeAwareStage
    from tfz.timing import ActionTimer

    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    runs = {}
    for name in OVERHEAD:
        torch.manual_seed(0)
        module = tfz.nn.convert_to_freezable(
            nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
        )
        if name == "torch":
            stage = PipelineStage(module, 0, 1, cpu)
        elif name == "tfz-off":
            stage = FreezeAwareStage(module, 0, 1, cpu)
        else:
            stage = FreezeAwareStage(module, 0, 1, cpu, provider=_NoFreezing(), timer=ActionTimer("cpu"))
        runs[name] = (ScheduleGPipe(stage, MICROBATCHES, loss_fn=lambda o, t: F.mse_loss(o, t)), stage)
    x, y = torch.randn(MICROBATCHES * 2, 8), torch.randn(MICROBATCHES * 2, 8)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(steps):
        for name, (schedule, stage) in runs.items():
            stage.submod.zero_grad(set_to_none=True)
            start = time.perf_counter()
            schedule.step(x, target=y)
            elapsed = time.perf_counter() - start
            if stage.__class__ is not PipelineStage and stage.tfz.timer is not None:
                stage.tfz.timer.collect()
            if i >= 20:
                times[name].append(elapsed * 1e6)
    base = statistics.median(times["torch"])
    return {name: (statistics.median(v) - base) / (2 * MICROBATCHES) for name, v in times.items()}


def summarize(times: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Median step (ms) per variant, the median paired ratio to ``torch`` and its 95% bootstrap
    interval (resampling rounds)."""
    import numpy as np

    base = np.array(times["torch"])
    rng = np.random.default_rng(0)
    out = {}
    for name, values in times.items():
        ratios = np.array(values) / base
        boot = np.median(rng.choice(ratios, size=(2000, len(ratios))), axis=1)
        out[name] = {
            "median_ms": statistics.median(values),
            "ratio": float(np.median(ratios)),
            "ratio_lo": float(np.quantile(boot, 0.025)),
            "ratio_hi": float(np.quantile(boot, 0.975)),
        }
    return out


def _table(summary) -> str:
    lines = ["| variant | median step | paired ratio to torch | 95% interval |", "|---|---:|---:|---:|"]
    for name, row in summary.items():
        lines.append(
            f"| {name} | {row['median_ms']:.2f} ms | {row['ratio']:.4f} | "
            f"{row['ratio_lo']:.4f} - {row['ratio_hi']:.4f} |"
        )
    return "\n".join(lines)


OVERHEAD = ("torch", "tfz-off", "tfz-zero")
HALF = ("torch", "tfz-half")


def run(variants: tuple[str, ...] = OVERHEAD, rounds: int = ROUNDS) -> dict:
    from tfz.pipeline import launch

    per_rank = launch(bench_rank, 2, rounds, variants, timeout=1800)
    return summarize(per_rank[0])


@pytest.mark.benchmark(group="pipeline-overhead")
def test_cost_per_action(benchmark):
    from tfz.pipeline import launch

    cost = benchmark.pedantic(launch, args=(action_overhead_rank, 1, 400), rounds=1, iterations=1)[0]
    for name, us in cost.items():
        benchmark.extra_info[f"{name}_us_per_action"] = us
    print("\n" + "\n".join(f"{name}: {us:+.1f} us per action vs torch" for name, us in cost.items()))


@pytest.mark.benchmark(group="pipeline-overhead")
@pytest.mark.parametrize("variants", [OVERHEAD, HALF], ids=["overhead", "half-frozen"])
def test_step_time(benchmark, variants):
    summary = benchmark.pedantic(run, args=(variants,), rounds=1, iterations=1)
    for name, row in summary.items():
        for key, value in row.items():
            benchmark.extra_info[f"{name}_{key}"] = value
    print("\n" + _table(summary))
    assert set(summary) == set(variants)


if __name__ == "__main__":
    from tfz.pipeline import launch

    cost = launch(action_overhead_rank, 1, 400, timeout=600)[0]
    print("\n".join(f"{name}: {us:+.1f} us per action vs torch" for name, us in cost.items()))
    print(_table(run(OVERHEAD)))
    print(_table(run(HALF)))
