"""Freeze-ratio LP: solve time vs size, structured solver against the generic HiGHS formulation.

Instances: 1F1B with P ranks and M = 8P microbatches (1k to 65k actions); per action, F takes
U(0.8, 1.2), B takes U(1.6, 2.4) unfrozen and 40-60% of that frozen; cap 0.8. Warm re-plans start
from the plan of the undrifted durations after (a) every duration moved by U(-2%, +2%), (b) one
factor U(0.97, 1.03) per (stage, kind) for the unfrozen and one for the frozen durations, (c) one
stage 10% slower, and smaller drifts like (a): (d) U(-0.01%, +0.01%), (e) U(-0.1%, +0.1%),
(f) U(-0.5%, +0.5%); each is compared with a cold solve of the same drifted durations.

pytest-benchmark (sizes up to 16k; the generic solve only up to 4k):
    python -m pytest bench/bench_plan.py -q --benchmark-enable
Tables for bench/RESULTS.md (the generic and the HiGHS-path solves only up to --generic-max):
    python bench/bench_plan.py [--sizes 8,16,32,64] [--generic-max 32] [--repeat 3]
    python bench/bench_plan.py --warm-only [--drifts abcdef]   # the warm re-plan table alone
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import pytest

import tfz.plan.solver as plan_solver
from tfz.dag import build_dag
from tfz.plan import PlanConfig, solve, solve_generic
from tfz.plan.problem import PlanProblem
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
    """Drift (a): every duration moved by U(-rel, +rel)."""
    rng = np.random.default_rng(seed)
    up2 = up * rng.uniform(1 - rel, 1 + rel, len(up))
    low2 = np.where(low < up, np.minimum(low * rng.uniform(1 - rel, 1 + rel, len(up)), up2), up2)
    return up2, low2


def drift(dag, up, low, how: str, seed: int = 1):
    """Drifted (unfrozen, frozen): ``how`` is "a", "b" or "c" (see the module docstring)."""
    small = {"a": 0.02, "d": 1e-4, "e": 1e-3, "f": 5e-3}
    if how in small:
        return perturb(up, low, seed, rel=small[how])
    rng = np.random.default_rng(seed)
    if how == "b":
        key = dag.stage.astype(np.int64) * 8 + dag.kind.astype(np.int64)
        f = rng.uniform(0.97, 1.03, key.max() + 1)[key]
        g = rng.uniform(0.97, 1.03, key.max() + 1)[key]
    elif how == "c":
        f = g = np.where(dag.stage == dag.num_stages // 3, 1.1, 1.0)
    else:
        raise ValueError(f"drift must be one of 'abcdef', got {how!r}")
    up2 = up * f
    return up2, np.where(low < up, np.minimum(low * g, up2), up2)


def solve_highs_path(dag, up, low, config):
    """The previous structured path (reduced LP in HiGHS from the uncapped network basis)."""
    t0 = time.perf_counter()
    return plan_solver._solve_highs(PlanProblem.create(dag, up, low, config), None, t0)


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


@pytest.mark.parametrize("how", ["a", "b", "c", "e"])
@pytest.mark.parametrize("P", [8, 16, 32])
def test_structured_warm(benchmark, P, how):
    dag, up, low = instance(P)
    first = solve(dag, up, low, CONFIG)
    up2, low2 = drift(dag, up, low, how)
    plan = benchmark(solve, dag, up2, low2, CONFIG, warm_start=first)
    assert plan.warm


def _times(repeat: int, fn, *args, **kwargs):
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
    ap.add_argument(
        "--generic-max", type=int, default=32, help="largest P for the generic and HiGHS-path solves"
    )
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--drifts", default="abcdef", help="warm-table drifts (see the module docstring)")
    ap.add_argument("--warm-only", action="store_true", help="only the warm re-plan table")
    args = ap.parse_args(argv)
    sizes = list(map(int, args.sizes.split(",")))
    solve(*instance(2), CONFIG)  # compile (or load) the numba kernels outside the timings
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    if args.warm_only:
        plans = {P: solve(*instance(P), CONFIG) for P in sizes}
        _warm_table(args, sizes, plans)
        return
    print(
        "| P | M | actions | generic (s) | HiGHS path (s) | structured min / median (s) | vs generic |"
        " vs HiGHS path | rel. diff makespan / total |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    plans = {}
    for P in sizes:
        dag, up, low = instance(P)
        s_min, s_med, s_plan = _times(args.repeat, solve, dag, up, low, CONFIG)
        plans[P] = s_plan
        if P <= args.generic_max:
            rep = 1 if P >= 32 else args.repeat
            g_min, _, g_plan = _times(rep, solve_generic, dag, up, low, CONFIG)
            h_min, _, h_plan = _times(rep, solve_highs_path, dag, up, low, CONFIG)
            diff = (
                f"{_rel(g_plan.makespan_planned, s_plan.makespan_planned):.1e} / "
                f"{_rel(g_plan.total_ratio, s_plan.total_ratio):.1e}"
            )
            g, h = f"{g_min:.3f}", f"{h_min:.3f}"
            vs_g, vs_h = f"{g_min / s_min:.1f}x", f"{h_min / s_min:.1f}x"
        else:
            g = h = vs_g = vs_h = diff = "not run"
        print(
            f"| {P} | {8 * P} | {dag.num_actions} | {g} | {h} | {s_min:.3f} / {s_med:.3f} | {vs_g} | {vs_h} |"
            f" {diff} |",
            flush=True,
        )
    print()
    _warm_table(args, sizes, plans)


def _warm_table(args, sizes, plans) -> None:
    print(
        "| P | actions | drift | warm start | warm min / median (s) | cold min / median (s) | cold / warm"
        " | rel. diff |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for P in sizes:
        dag, up, low = instance(P)
        for how in args.drifts:
            up2, low2 = drift(dag, up, low, how)
            w_min, w_med, w_plan = _times(args.repeat, solve, dag, up2, low2, CONFIG, warm_start=plans[P])
            c_min, c_med, c_plan = _times(args.repeat, solve, dag, up2, low2, CONFIG)
            assert w_plan.warm and not c_plan.warm
            diff = max(
                _rel(w_plan.makespan_planned, c_plan.makespan_planned),
                _rel(w_plan.total_ratio, c_plan.total_ratio),
            )
            start = getattr(w_plan._warm_state, "start", "?")
            print(
                f"| {P} | {dag.num_actions} | {how} | {start} | {w_min:.3f} / {w_med:.3f} |"
                f" {c_min:.3f} / {c_med:.3f} | {c_min / w_min:.2f}x | {diff:.1e} |",
                flush=True,
            )
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
