"""A simulated pipeline for the controller tests: stage modules, true action times and the times a
step takes given the masks a controller handed out (``Synthetic``).

Action times come from a (u, l) model of a tfz.profile.Profile: every B/W action runs in
``u - f (u - l)`` (times a little noise), f the realised frozen fraction of its masks for that step.
A batch takes the simulated makespan of those times with ``gap`` ms added to every action.
"""

import numpy as np
from torch import nn

from tfz._validate import check_int
from tfz.controller import Phase, TimelyFreeze, TimelyFreezeConfig
from tfz.dag import build_dag, simulate
from tfz.nn import FreezableLinear
from tfz.profile import Profile, StageTimes

BLOCK = 4


def stage_module():
    """Units with block_rows=4: ten of weight 128, one of 64 (the unique smallest), eight of 168."""
    return nn.Sequential(FreezableLinear(32, 42), FreezableLinear(42, 32))


def true_times(dag, scale_stage=None, factor=1.0):
    """(u, l) [n] of a profile whose later stages are slower; optionally stage ``scale_stage`` x factor."""
    stages = {}
    for s in range(dag.num_stages):
        k = factor if s == scale_stage else 1.0
        stages[s] = StageTimes(
            f=k * (1.0 + 0.2 * s), i=k * (1.2 + 0.3 * s), w=k * (1.0 + 0.4 * s), w_frozen=0.1
        )
    return Profile(stages=stages).durations(dag)


class Synthetic:
    """Per-step times of every action of ``dag`` given a controller's masks (realised fractions)."""

    def __init__(self, dag, noise=0.0, seed=0, gap=0.0):
        self.dag = dag
        self.u, self.l = true_times(dag)
        self.noise = noise
        self.seed = seed
        self.gap = gap

    def fractions(self, controllers):
        f = np.zeros(self.dag.num_actions)
        for c in controllers:
            for s in c.local_stages:
                for i in np.flatnonzero((self.dag.stage == s) & self.dag.kind_mask("B", "W")):
                    m = c.masks_for(s, int(self.dag.microbatch[i]))
                    f[i] = 0.0 if m is None else m.frozen_fraction
        return f

    def times(self, step, *controllers):
        f = self.fractions(controllers)
        d = self.u - f * (self.u - self.l)
        if self.noise:
            rng = np.random.default_rng([self.seed, step])
            d = d * (1 + self.noise * rng.standard_normal(len(d)))
        return {name: float(x) for name, x in zip(self.dag.names, d)}

    def batch_ms(self, times):
        """The batch's wall time for one step's ``times``: their makespan with the gap."""
        return simulate(self.dag, np.array([times[n] for n in self.dag.names]) + self.gap).makespan


def make(cfg, sched, **kw):
    dag = build_dag(sched)
    return TimelyFreeze(cfg, dag, {s: stage_module() for s in range(dag.num_stages)}, **kw)


def small(**kw):
    base = dict(phase_unit=3, check_every=2, block_rows=BLOCK, async_solve=False)
    base.update(kw)
    return TimelyFreezeConfig(**base)


def expected_phase(cfg, k):
    """Phase of relative step k, in closed form (sync solve: ready at the first poll)."""
    W, M, K, R = cfg.warmup, cfg.monitor, cfg.check_every, cfg.ramp
    submit = W + 2 * M
    adopt = (submit // K + 1) * K  # first decision step after the submission
    if k < W:
        return Phase.WARMUP
    if k < W + M:
        return Phase.MONITOR_UPPER
    if k < submit:
        return Phase.MONITOR_LOWER
    if k < adopt:
        return Phase.SOLVING
    return Phase.RAMP if k < adopt + R else Phase.STABLE


def run_to_stable(c, syn, extra=0, k=0):
    while c.phase is not Phase.STABLE:
        c.step_end(k, syn.times(k, c))
        k += 1
        assert k < 200
    for _ in range(extra):
        c.step_end(k, syn.times(k, c))
        k += 1
    return k


class RotatingPolicy:
    """Ranks units starting at an offset that observe() advances; the offset is its state."""

    def __init__(self):
        self.offset = 0
        self.observed = []

    def rank(self, units, *, stage, microbatch, rng):
        n = len(units)
        return (np.arange(n) + self.offset + microbatch) % n

    def observe(self, step, stage_modules):
        self.observed.append((step, sorted(stage_modules)))
        self.offset += 1

    def state_dict(self):
        return {"offset": self.offset}

    def load_state_dict(self, state):
        self.offset = check_int("offset", state["offset"])
