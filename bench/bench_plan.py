"""Freeze-ratio LP: tfz.plan.solve against the generic HiGHS formulation, cold and warm, and what a
fresh process pays to plan.

Instances: a schedule with P ranks and M microbatches, durations of one of four kinds:
    uniform  tfz.profile.Profile.uniform(f=1, i=1, w=1, w_frozen=0) (what `tfz plan` uses by default):
             every action of a kind takes the same time, the most degenerate LP;
    stage    one set of F/I/W times per stage, U(0.8, 1.2) each, W frozen at U(5%, 30%) of W (what
             `tfz profile` writes and per-stage medians give);
    tied     like random, then rounded to a grid of 0.25 (many exact ties);
    random   per action F ~ U(0.8, 1.2), B ~ U(1.6, 2.4), I and W ~ U(0.8, 1.2), B/W frozen at 40-60%.
Cap 0.8. Generic = tfz.plan.solve_generic (every DAG edge a row, two cold HiGHS solves); HiGHS path =
tfz.plan.solve without the native extension (the fallback). Warm re-plans start from the plan of the
undrifted durations after (a) every duration moved by U(-2%, +2%), (b) one factor U(0.97, 1.03) per
(stage, kind) for the unfrozen and one for the frozen durations, (c) one stage 10% slower, and smaller
drifts like (a): (d) U(+-0.01%), (e) U(+-0.1%), (f) U(+-0.5%); each against a cold solve of the same
drifted durations.

pytest-benchmark (sizes up to 16k; the generic solve only up to 4k):
    python -m pytest bench/bench_plan.py -q --benchmark-enable
Tables for bench/RESULTS.md:
    python bench/bench_plan.py --fresh                   # a fresh process: `tfz plan` and its solve
    python bench/bench_plan.py --cold [--instances 1f1b:32:256,...] [--kinds uniform,...] [--generic-max N]
    python bench/bench_plan.py --warm [--sizes 8,16,32,64] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from tfz.dag import build_dag
from tfz.plan import PlanConfig, flow, solve, solve_generic
from tfz.profile import Profile
from tfz.schedule import build_schedule

CONFIG = PlanConfig(max_freeze_ratio=0.8)
KINDS = ("uniform", "stage", "tied", "random")


def instance(name: str, P: int, M: int, kind: str, seed: int = 0):
    """(dag, unfrozen, frozen) of schedule ``name`` with durations of ``kind`` (module docstring)."""
    dag = build_dag(build_schedule(name, P, M))
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        return (dag, *Profile.uniform(f=1.0, i=1.0, w=1.0, w_frozen=0.0).durations(dag))
    if kind == "stage":
        return (dag, *Profile.random_stages(dag.num_stages, rng).durations(dag))
    n = dag.num_actions
    b = dag.kind_mask("B")
    bw = dag.kind_mask("B", "W")
    up = np.where(b, rng.uniform(1.6, 2.4, n), rng.uniform(0.8, 1.2, n))
    low = np.where(bw, up * rng.uniform(0.4, 0.6, n), up)
    if kind == "tied":
        up = np.round(up * 4) / 4
        low = np.where(bw, np.minimum(np.round(low * 4) / 4, up - 0.25), up)
    elif kind != "random":
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return dag, up, low


def drift(dag, up, low, how: str, seed: int = 1):
    """Drifted (unfrozen, frozen): ``how`` is one of "abcdef" (see the module docstring)."""
    rng = np.random.default_rng(seed)
    small = {"a": 0.02, "d": 1e-4, "e": 1e-3, "f": 5e-3}
    n = len(up)
    if how in small:
        rel = small[how]
        f, g = rng.uniform(1 - rel, 1 + rel, n), rng.uniform(1 - rel, 1 + rel, n)
    elif how == "b":
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
    """tfz.plan.solve as it runs without the native extension."""
    native = flow.NATIVE
    flow.NATIVE = False
    try:
        return solve(dag, up, low, config)
    finally:
        flow.NATIVE = native


@pytest.mark.parametrize("kind", ["uniform", "random"])
@pytest.mark.parametrize("P", [8, 16, 32])
def test_structured_cold(benchmark, P, kind):
    dag, up, low = instance("1f1b", P, 8 * P, kind)
    plan = benchmark(solve, dag, up, low, CONFIG)
    assert plan.status == "optimal"


@pytest.mark.parametrize("P", [8, 16])
def test_generic_cold(benchmark, P):
    dag, up, low = instance("1f1b", P, 8 * P, "random")
    plan = benchmark(solve_generic, dag, up, low, CONFIG)
    assert plan.status == "optimal"


@pytest.mark.parametrize("how", ["a", "b", "c", "e"])
@pytest.mark.parametrize("P", [8, 16, 32])
def test_structured_warm(benchmark, P, how):
    dag, up, low = instance("1f1b", P, 8 * P, "random")
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
    return abs(a - b) / max(abs(a), abs(b), 1e-300)


FRESH_CMD = ["plan", "--schedule", "1f1b", "--ranks", "4", "--microbatches", "8", "--json"]


def _fresh(args) -> None:
    """`tfz plan` in a new process each time: with every bytecode cache in place; with tfz's own
    removed first (a fresh install: pip compiles site-packages, an editable tfz compiles on first
    import); and with none at all (PYTHONPYCACHEPREFIX pointing to a new directory: numpy, scipy and
    the standard library compiled again too)."""
    import tfz

    package = os.path.dirname(tfz.__file__)
    exe = [sys.executable, "-c", "import sys; from tfz.cli import main; sys.exit(main(sys.argv[1:]))"]
    print("| bytecode caches | `tfz plan` wall min / median (s) | solve min / median (s) | native |")
    print("|---|---|---|---|")
    for label in ("all in place", "tfz's removed", "none (PYTHONPYCACHEPREFIX)"):
        walls, solves = [], []
        for _ in range(args.repeat):
            env = dict(os.environ)
            if label.startswith("tfz"):
                for root, dirs, _ in os.walk(package):
                    if "__pycache__" in dirs:
                        shutil.rmtree(os.path.join(root, "__pycache__"))
            with tempfile.TemporaryDirectory() as tmp:
                if label.startswith("none"):
                    env["PYTHONPYCACHEPREFIX"] = tmp
                t = time.perf_counter()
                out = subprocess.run(exe + FRESH_CMD, env=env, capture_output=True, text=True, check=True)
                walls.append(time.perf_counter() - t)
            solves.append(json.loads(out.stdout)["solve_seconds"])
        wall = f"{min(walls):.3f} / {np.median(walls):.3f}"
        print(
            f"| {label} | {wall} | {min(solves):.4f} / {np.median(solves):.4f} | {flow.NATIVE} |", flush=True
        )


COLD = "1f1b:8:64,1f1b:16:128,1f1b:32:256,1f1b:64:512,zbv:16:128,interleaved1f1b:16:192"


def _instances(text: str) -> list[tuple[str, int, int]]:
    out = []
    for item in text.split(","):
        name, P, M = item.split(":")
        out.append((name, int(P), int(M)))
    return out


def _cold(args) -> None:
    print(
        "| schedule | P | M | actions | kind | structured min / median (s) | generic (s) | HiGHS path (s) |"
        " generic / structured | rel. diff makespan / total |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    kinds = args.kinds.split(",")
    for name, P, M in _instances(args.instances):
        for kind in kinds:
            dag, up, low = instance(name, P, M, kind)
            n = dag.num_actions
            s_min, s_med, s_plan = _times(args.repeat, solve, dag, up, low, CONFIG)
            g = h = ratio = diff = "not run"
            if n <= args.generic_max:
                g_min, _, g_plan = _times(1, solve_generic, dag, up, low, CONFIG)
                g, ratio = f"{g_min:.3f}", f"{g_min / s_min:.1f}x"
                diff = (
                    f"{_rel(g_plan.makespan_planned, s_plan.makespan_planned):.1e} / "
                    f"{_rel(g_plan.total_ratio, s_plan.total_ratio):.1e}"
                )
            if n <= args.highs_max:
                h_min, _, _ = _times(1, solve_highs_path, dag, up, low, CONFIG)
                h = f"{h_min:.3f}"
            s = f"{s_min:.3f} / {s_med:.3f}"
            print(f"| {name} | {P} | {M} | {n} | {kind} | {s} | {g} | {h} | {ratio} | {diff} |", flush=True)


def _warm(args) -> None:
    print(
        "| P | actions | drift | warm start | warm min / median (s) | cold min / median (s) | cold / warm"
        " | rel. diff |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for P in map(int, args.sizes.split(",")):
        dag, up, low = instance("1f1b", P, 8 * P, "random")
        first = solve(dag, up, low, CONFIG)
        for how in args.drifts:
            up2, low2 = drift(dag, up, low, how)
            w_min, w_med, w_plan = _times(args.repeat, solve, dag, up2, low2, CONFIG, warm_start=first)
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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fresh", action="store_true", help="the fresh-process table")
    ap.add_argument("--cold", action="store_true", help="the cold table")
    ap.add_argument("--warm", action="store_true", help="the warm re-plan table")
    ap.add_argument("--instances", default=COLD, help="cold table: schedule:P:M, comma separated")
    ap.add_argument("--kinds", default="uniform,stage,random", help="cold-table duration kinds")
    ap.add_argument("--generic-max", type=int, default=16384, help="largest instance for the generic LP")
    ap.add_argument("--highs-max", type=int, default=16384, help="largest instance for the HiGHS path")
    ap.add_argument("--sizes", default="8,16,32,64", help="warm table: ranks P (M = 8P), comma separated")
    ap.add_argument("--drifts", default="abcdef", help="warm-table drifts (see the module docstring)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    print(f"native solver: {flow.NATIVE}; load average before: {os.getloadavg()[0]:.2f}")
    if args.fresh:
        _fresh(args)
    solve(*instance("1f1b", 2, 4, "random"), CONFIG)  # the HiGHS banner, first-call costs
    if args.cold:
        _cold(args)
    if args.warm:
        _warm(args)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
