"""Freeze-ratio LP: solve time vs size, structured solver against the generic HiGHS formulation.

Instances: 1F1B with P ranks and M = 8P microbatches (1k to 65k actions); per action, F takes
U(0.8, 1.2), B takes U(1.6, 2.4) unfrozen and 40-60% of that frozen; cap 0.8. Warm: re-plan after
every duration moved by U(-2%, +2%), starting from the previous plan.

pytest-benchmark (sizes up to 16k; the generic solve only up to 4k):
    python -m pytest bench/bench_plan.py -q --benchmark-enable
Table for bench/RESULTS.md (all sizes; the generic solve where it takes under about a minute):
    python bench/bench_plan.py [--sizes 8,16,32,64] [--generic-max 16] [--repeat 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pytest

from tfz.dag import build_dag
from tfz.plan import PlanConfig, solve, solve_generic
from tfz.schedule import build_schedule


def instance(P: int, seed: int = 0):
    """(dag, unfrozen, frozen) of 1F1B with P ranks and 8P microbatches."""
    dag = build_dag(build_schedule("1f1b", P, 8 * P))
    rng = np.random.default_rng(seed)
    n = dag.num_actions
    b = dag.kind_mask("B")
    up = np.where(b, rng.uniform(1.6, 2.4, n), rng.uniform(0.8, 1.2, n))
    low = np.where(b, up * rng.uniform(0.4, 0.6, n), up)
    return dag, up, low


def perturb(up, low, seed: int = 1, rel: float = 0.02):
    rng = np.random.default_rng(seed)
    up2 = up * rng.uniform(1 - rel, 1 + rel, len(up))
    low2 = np.where(low < up, np.minimum(low * rng.uniform(1 - rel, 1 + rel, len(up)), up2), up2)
    return up2, low2


CONFIG = PlanConfig(max_freeze_ratio=0.8)


@pytest.mark.parametrize("P", [8, 16, 32])
def test_structured_cold(benchmark, P):
    dag, up, low = instance(P)
    plan = benchmark(solve, dag, up, low, CONFIG)
    assert plan.status == "optimal"


@pytest.mark.parametrize("P", [8, 16])
def test_generic_cold(benchmark, P):
    dag, up, low = instance(P)
    plan = benchmark(solve_generic, dag, up, low, CONFIG)
    assert plan.status == "optimal"


@pytest.mark.parametrize("P", [8, 16, 32])
def test_structured_warm(benchmark, P):
    dag, up, low = instance(P)
    first = solve(dag, up, low, CONFIG)
    up2, low2 = perturb(up, low)
    plan = benchmark(solve, dag, up2, low2, CONFIG, warm_start=first)
    assert plan.warm


def _best(repeat: int, fn, *args, **kwargs):
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        times.append(time.perf_counter() - t)
    return min(times), float(np.median(times)), out


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1.0)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="8,16,32,64", help="ranks P (M = 8P), comma separated")
    ap.add_argument("--generic-max", type=int, default=16, help="largest P to run the generic solve for")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    print(
        "| P | M | actions | generic (s) | structured cold (s) | speedup | warm re-plan (s) | cold/warm |"
        " rel. diff makespan / total |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for P in map(int, args.sizes.split(",")):
        dag, up, low = instance(P)
        rep = args.repeat if dag.num_actions <= 20000 else 1
        s_min, _, s_plan = _best(rep, solve, dag, up, low, CONFIG)
        up2, low2 = perturb(up, low)
        w_min, _, w_plan = _best(rep, solve, dag, up2, low2, CONFIG, warm_start=s_plan)
        c_min, _, c_plan = _best(1, solve, dag, up2, low2, CONFIG)
        assert w_plan.warm and _rel(w_plan.makespan_planned, c_plan.makespan_planned) < 1e-6
        if P <= args.generic_max:
            g_min, _, g_plan = _best(1 if P >= 32 else rep, solve_generic, dag, up, low, CONFIG)
            diff = (
                f"{_rel(g_plan.makespan_planned, s_plan.makespan_planned):.1e} / "
                f"{_rel(g_plan.total_ratio, s_plan.total_ratio):.1e}"
            )
            g, speed = f"{g_min:.3f}", f"{g_min / s_min:.1f}x"
        else:
            g, speed, diff = "not run", "-", "-"
        print(
            f"| {P} | {8 * P} | {dag.num_actions} | {g} | {s_min:.3f} | {speed} | {w_min:.3f} | "
            f"{c_min / w_min:.1f}x | {diff} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
