"""Simulation cost against the number of actions (tfz.dag, tfz.profile).

Run: ``python -m pytest bench/bench_simulate.py -q --benchmark-enable --benchmark-columns=min,median,max``

Sizes target ~1k, 4k, 16k, 65k and 100k+ actions over 8 ranks; the microbatch count is derived
from the schedule's actions per microbatch. Schedules without a builder yet are skipped.
"""

import numpy as np
import pytest

from tfz.dag import build_dag, simulate
from tfz.profile import Profile
from tfz.schedule import build_schedule

RANKS = 8
TARGETS = (1_000, 4_000, 16_000, 65_000, 100_000)
SCHEDULES = ("1f1b", "zbh1", "zbv")


def _schedule(name: str, target: int):
    try:
        probe = build_schedule(name, RANKS, 2 * RANKS)
    except ValueError as exc:
        if "unknown schedule" in str(exc):
            pytest.skip(f"{name} has no builder yet")
        raise
    per_mb = probe.num_actions / (2 * RANKS)
    microbatches = max(RANKS, int(np.ceil(target / per_mb)))
    return build_schedule(name, RANKS, microbatches)


def _info(benchmark, sched):
    benchmark.extra_info.update(
        schedule=sched.name,
        ranks=sched.num_ranks,
        microbatches=sched.num_microbatches,
        actions=sched.num_actions,
    )


@pytest.mark.benchmark(group="build_dag")
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", SCHEDULES)
def test_build_dag(benchmark, name, target):
    sched = _schedule(name, target)
    _info(benchmark, sched)
    dag = benchmark(build_dag, sched)
    assert dag.num_actions == sched.num_actions


@pytest.mark.benchmark(group="simulate")
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", SCHEDULES)
def test_simulate(benchmark, name, target):
    sched = _schedule(name, target)
    dag = build_dag(sched)
    durations = Profile.uniform(1.0, 1.0, 1.0).durations(dag)[0]
    _info(benchmark, sched)
    sim = benchmark(simulate, dag, durations)
    assert sim.makespan > 0


@pytest.mark.benchmark(group="end_to_end")
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", SCHEDULES)
def test_end_to_end(benchmark, name, target):
    """What ``tfz simulate --json`` computes: schedule, DAG, profile durations, simulation,
    bubbles and critical path."""
    sched = _schedule(name, target)
    profile = Profile.uniform(1.0, 1.2, 0.8)
    _info(benchmark, sched)

    def step():
        s = build_schedule(name, RANKS, sched.num_microbatches)
        dag = build_dag(s)
        sim = simulate(dag, profile.durations(dag)[0])
        return sim.makespan, sim.bubble_ratio, sim.critical_path

    makespan, _, path = benchmark(step)
    assert makespan > 0 and len(path) > 0
