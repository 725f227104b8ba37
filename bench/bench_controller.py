"""TimelyFreeze controller: cost of step_end and mask redraws, what a background solve costs the
training thread, and how well the two monitoring modes estimate the bounds (synthetic times).

Stages are LLaMA-8B-shaped (8 layers of dim 4096, kv 1024, ffn 14336 per stage; built on the meta
device, 5,376 row-block units of 64 rows each); the schedule is 1F1B. One process plays every rank
(``group=None``), so a decision step redraws P * M masks; per rank it is M per stage.

pytest-benchmark:
    python -m pytest bench/bench_controller.py -q --benchmark-enable
Table for bench/RESULTS.md:
    python bench/bench_controller.py [--ranks 4] [--microbatches 8] [--solve-ranks 32] [--seeds 20]
    python bench/bench_controller.py --monitoring-only --seeds 20
"""

from __future__ import annotations

import argparse
import threading
import time

import numpy as np
import pytest
from torch import nn

from tfz.controller import Phase, TimelyFreeze, TimelyFreezeConfig
from tfz.controller.estimates import fit_gap
from tfz.dag import build_dag, simulate
from tfz.nn import FreezableLinear
from tfz.plan import PlanConfig, solve
from tfz.profile import Profile, StageTimes
from tfz.schedule import build_schedule

DIM, KV, FFN, LAYERS = 4096, 1024, 14336, 8


def llama8b_stage():
    """8 decoder layers' linear layers on the meta device (no memory)."""
    shapes = [(DIM, DIM), (DIM, KV), (DIM, KV), (DIM, DIM), (DIM, FFN), (DIM, FFN), (FFN, DIM)]
    layers = [FreezableLinear(i, o, bias=False, device="meta") for _ in range(LAYERS) for i, o in shapes]
    return nn.Sequential(*layers)


def stable_controller(P: int, M: int, check_every: int = 10):
    """A controller in its stable phase (phase_unit 2) and the per-step timings it is fed."""
    sched = build_schedule("1f1b", P, M)
    dag = build_dag(sched)
    cfg = TimelyFreezeConfig(phase_unit=2, check_every=check_every, async_solve=False)
    c = TimelyFreeze(cfg, dag, {s: llama8b_stage() for s in range(dag.num_stages)})
    rng = np.random.default_rng(0)
    up = np.where(dag.kind_mask("B"), 40.0, 15.0) * rng.uniform(0.95, 1.05, dag.num_actions)
    low = np.where(dag.kind_mask("B"), 25.0, up)
    step = 0

    def times():
        r = c.requested_ratios()
        d = (up - r * (up - low)) * (1 + 0.005 * rng.standard_normal(dag.num_actions))
        return dict(zip(dag.names, d.tolist()))

    while c.phase is not Phase.STABLE:
        c.step_end(step, times())
        step += 1
    return c, times, step


def monitoring_controller(P: int, M: int, monitoring: str):
    """A controller at the first step of its 31-step lower-bound window."""
    dag = build_dag(build_schedule("1f1b", P, M))
    cfg = TimelyFreezeConfig(
        phase_unit=2, monitor_steps=31, check_every=10, async_solve=False, monitoring=monitoring
    )
    c = TimelyFreeze(cfg, dag, {s: llama8b_stage() for s in range(dag.num_stages)})
    times = dict(zip(dag.names, np.where(dag.kind_mask("B"), 40.0, 15.0).tolist()))
    step = 0
    while c.phase is not Phase.MONITOR_LOWER:
        c.step_end(step, times)
        step += 1
    return c, times, step


def small_stage():
    """Two linear layers, 64 row blocks of 16 rows: fine-grained realised fractions."""
    return nn.Sequential(FreezableLinear(256, 512), FreezableLinear(512, 512))


def estimate_errors(
    monitoring: str, seed: int, noise: float, levels=(0.4, 0.8), P=4, M=8, unit=10, drift: float = 0.0
):
    """One run on synthetic times: every B action takes ``l + x (u - l)`` (x the realised active
    fraction of its masks) times (1 + noise * N(0, 1)), with a 3x slow step in 2% of the samples;
    from the second monitoring half on, the machine is ``drift`` slower (every time x (1 + drift)).
    Returns the median relative error of u and of l over B actions, the plan's predicted batch time
    against its true one, and the plan's true batch time against the LP optimum on the true times
    (the truth: the machine as it is when the plan runs, after the drift)."""
    dag = build_dag(build_schedule("1f1b", P, M))
    rng = np.random.default_rng(seed)
    stages = {s: StageTimes(f=1.0 + 0.1 * s, i=1.0, w=1.5 + 0.2 * s, w_frozen=0.3) for s in range(P)}
    u, low = Profile(stages=stages).durations(dag)
    u = u * rng.uniform(0.9, 1.1, dag.num_actions)
    low = np.where(dag.kind_mask("B"), low * rng.uniform(0.9, 1.1, dag.num_actions), u)
    low = np.minimum(low, u)
    cfg = TimelyFreezeConfig(
        phase_unit=unit, async_solve=False, monitoring=monitoring, monitor_ratios=levels, seed=seed
    )
    c = TimelyFreeze(cfg, dag, {s: small_stage() for s in range(P)})
    b = dag.kind_mask("B")
    k = 0
    while c.plan is None:
        active = np.ones(dag.num_actions)
        for i in np.flatnonzero(b).tolist():
            m = c.masks_for(int(dag.stage[i]), int(dag.microbatch[i]))
            active[i] = 1.0 if m is None else 1.0 - m.frozen_fraction
        d = (low + active * (u - low)) * (1 + noise * rng.standard_normal(dag.num_actions))
        d = np.where(rng.random(dag.num_actions) < 0.02, 3 * d, d)
        if c.phase is not Phase.WARMUP and c.phase is not Phase.MONITOR_UPPER:
            d = d * (1 + drift)
        c.step_end(k, dict(zip(dag.names, d.tolist())))
        k += 1
    eu, el = c.estimates
    u, low = u * (1 + drift), low * (1 + drift)
    true_span = simulate(dag, u - c.plan.ratios * (u - low)).makespan
    best = solve(dag, u, low, cfg.plan).makespan_planned
    return (
        float(np.median(np.abs(eu[b] / u[b] - 1))),
        float(np.median(np.abs(el[b] / low[b] - 1))),
        c.plan.makespan_planned / true_span - 1,
        true_span / best - 1,
    )


def python_work(n: int = 20000) -> float:
    """Interpreter-bound work standing in for the training loop's Python glue; returns seconds."""
    t0 = time.perf_counter()
    acc = 0
    for i in range(n):
        acc += i % 7
    return time.perf_counter() - t0


def solve_instance(P: int):
    dag = build_dag(build_schedule("1f1b", P, 8 * P))
    rng = np.random.default_rng(0)
    b = dag.kind_mask("B")
    up = np.where(b, rng.uniform(1.6, 2.4, dag.num_actions), rng.uniform(0.8, 1.2, dag.num_actions))
    low = np.where(b, up * rng.uniform(0.4, 0.6, dag.num_actions), up)
    return dag, up, low


def glue_slowdown(P: int, rounds: int = 20) -> tuple[float, float, float, int]:
    """(solve seconds, median glue time alone, median glue time while a solve runs in a thread, glue
    runs during the solve)."""
    dag, up, low = solve_instance(P)
    solve(dag, up, low, PlanConfig())  # first-call costs (HiGHS banner) outside the timings
    t0 = time.perf_counter()
    solve(dag, up, low, PlanConfig())
    seconds = time.perf_counter() - t0
    alone = float(np.median([python_work() for _ in range(rounds)]))
    done = threading.Event()
    thread = threading.Thread(target=lambda: (solve(dag, up, low, PlanConfig()), done.set()))
    thread.start()
    during = []
    while not done.is_set():
        during.append(python_work())
    thread.join()
    return seconds, alone, float(np.median(during)), len(during)


def gap_fit_seconds(P: int, rounds: int = 5) -> tuple[float, int]:
    """(median seconds of ``fit_gap`` on the 1F1B instance of ``solve_instance(P)``, its actions): the
    one-off cost at the end of monitoring, on every rank."""
    dag, up, _ = solve_instance(P)
    batch = simulate(dag, up + 0.05).makespan
    spent = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fit_gap(dag, up, batch)
        spent.append(time.perf_counter() - t0)
    return float(np.median(spent)), dag.num_actions


def batch_check_seconds(P: int, rounds: int = 5) -> float:
    """Median seconds of the simulation the drift check adds with batch times (the plan's batch on
    the instance of ``solve_instance(P)``), on every rank at each decision step of the stable phase."""
    dag, up, low = solve_instance(P)
    spent = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        simulate(dag, 0.5 * (up + low) + 0.05)
        spent.append(time.perf_counter() - t0)
    return float(np.median(spent))


@pytest.fixture(scope="module")
def stable():
    return stable_controller(4, 8)


def test_step_end_between_decisions(benchmark, stable):
    c, times, step = stable
    k = [step]

    def setup():
        if (k[0] + 1) % c.config.check_every == 0:  # run decision steps untimed
            c.step_end(k[0], times())
            k[0] += 1
        return (k[0], times()), {}

    def one(step, timings):
        c.step_end(step, timings)
        k[0] += 1

    benchmark.pedantic(one, setup=setup, rounds=50)


def test_step_end_decision_step(benchmark):
    c, times, step = stable_controller(4, 8, check_every=1)
    k = [step]

    def one():
        c.step_end(k[0], times())
        k[0] += 1

    benchmark(one)
    assert c.phase is Phase.STABLE


def test_masks_for_lookup(benchmark, stable):
    c = stable[0]
    benchmark(c.masks_for, 1, 3)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--solve-ranks", type=int, default=32, help="P of the 1F1B LP solved in the background")
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--seeds", type=int, default=20, help="seeds of the monitoring-mode comparison")
    ap.add_argument("--monitoring-only", action="store_true", help="only the monitoring-mode table")
    args = ap.parse_args(argv)
    if args.monitoring_only:
        monitoring_table(args.seeds)
        return
    P, M = args.ranks, args.microbatches
    c, times, step = stable_controller(P, M, check_every=10)
    plain, decision = [], []
    for _ in range(args.repeat * 10):
        t = times()
        t0 = time.perf_counter()
        c.step_end(step, t)
        (decision if (step + 1) % 10 == 0 else plain).append(time.perf_counter() - t0)
        step += 1
    units = len(c.units[0])
    print(f"1F1B P={P} M={M}: {c.dag.num_actions} actions, {units} units per stage, {P * M} masks per redraw")
    print("| measurement | median (ms) |")
    print("|---|---|")
    print(f"| step_end, no decision | {1e3 * np.median(plain):.3f} |")
    print(
        f"| step_end, decision step (redraw {P * M} masks, drift check) | {1e3 * np.median(decision):.1f} |"
    )
    print(f"| per mask (select over {units} units) | {1e3 * np.median(decision) / (P * M):.2f} |")
    for mode in ("partial", "frozen"):
        mc, mtimes, mstep = monitoring_controller(P, M, mode)
        spent = []
        while mc.phase is Phase.MONITOR_LOWER and len(spent) < 30:
            t0 = time.perf_counter()
            mc.step_end(mstep, mtimes)
            spent.append(time.perf_counter() - t0)
            mstep += 1
        print(
            f"| step_end in the {mode} lower-bound window ({'redraw of' if mode == 'partial' else 'no'} "
            f"{P * M} masks) | {1e3 * np.median(spent):.1f} |"
        )
    seconds, alone, during, runs = glue_slowdown(args.solve_ranks)
    print(
        f"| Python glue (20k iterations) alone / during a background solve (1F1B P={args.solve_ranks}, "
        f"M={8 * args.solve_ranks}, {seconds:.2f} s; {runs} runs) | {1e3 * alone:.2f} / {1e3 * during:.2f} "
        f"({during / alone:.2f}x) |"
    )
    gap, n = gap_fit_seconds(args.solve_ranks)
    where = f"1F1B P={args.solve_ranks}, {n} actions"
    print(f"| fit_gap at the end of monitoring ({where}, once) | {1e3 * gap:.0f} |")
    check = batch_check_seconds(args.solve_ranks)
    print(f"| the batch's drift check ({where}, each decision step) | {1e3 * check:.1f} |")
    monitoring_table(args.seeds)


def monitoring_table(seeds: int, drifts=(0.0, 0.1)) -> None:
    print(
        f"\nMonitoring modes on synthetic times (1F1B P=4 M=8, phase_unit 10, {seeds} seeds; medians, "
        "[10th-90th percentile]):"
    )
    print(
        "| noise | machine drift | monitoring | u error (B) | l error (B) | predicted / true batch time - 1 "
        "| true / optimal - 1 |"
    )
    print("|---|---|---|---|---|---|---|")
    modes = {
        "partial (0, 0.8)": ("partial", (0.0, 0.8)),
        "partial (0.4, 0.8)": ("partial", (0.4, 0.8)),
        "partial (0.5, 1.0)": ("partial", (0.5, 1.0)),
        "frozen": ("frozen", (0.4, 0.8)),
    }
    for noise in (0.01, 0.05):
        for drift in drifts:
            for name, (mode, levels) in modes.items():
                rows = np.array(
                    [estimate_errors(mode, seed, noise, levels, drift=drift) for seed in range(seeds)]
                )
                cells = []
                for j, col in enumerate(rows.T):
                    lo, mid, hi = np.percentile(np.abs(col) if j < 2 else col, [10, 50, 90])
                    cells.append(f"{100 * mid:+.2f}% [{100 * lo:+.2f}, {100 * hi:+.2f}]")
                print(f"| {noise:.0%} | {drift:+.0%} | {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
