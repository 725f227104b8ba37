"""Instances for the tfz.plan tests: schedules at a size they allow, and durations of four kinds.

Kinds: ``uniform`` (``tfz.profile.Profile.uniform``: every action of a kind takes the same time, the
most degenerate LP), ``stage`` (one set of times per stage, as ``tfz profile`` writes them),
``tied`` (random times on a coarse grid: many exact ties) and ``random`` (per action).
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from tfz.profile import Profile
from tfz.schedule import build_schedule

KINDS = ("uniform", "stage", "tied", "random")


def schedule(name, P, M, V=None):
    """build_schedule, raising M to the schedule's minimum; skip names not built yet."""
    try:
        return build_schedule(name, P, M, V)
    except ValueError as exc:
        msg = str(exc)
        if "unknown schedule" in msg:
            pytest.skip(f"schedule {name} not available yet")
        match = re.search(r"needs at least (\d+) microbatches", msg)
        if match:
            return build_schedule(name, P, int(match.group(1)), V)
        raise


def random_times(dag, rng, equal_share=0.1, grid=None):
    """Random (unfrozen, frozen): F/I fixed, B/W frozen at 10-90% of unfrozen, a share of B/W with
    frozen == unfrozen (they cannot gain); with ``grid`` every time is a multiple of it."""
    n = dag.num_actions
    fr = dag.kind_mask("B", "W")
    up = rng.uniform(0.5, 3.0, n)
    low = np.where(fr, up * rng.uniform(0.1, 0.9, n), up)
    if grid is not None:
        up = np.round(up / grid) * grid + grid
        low = np.where(fr, np.minimum(np.round(low / grid) * grid, up - grid), up)
    low = np.where(fr & (rng.random(n) < equal_share), up, low)
    return up, low


def times(dag, kind, rng):
    """(unfrozen, frozen) of one of :data:`KINDS`."""
    if kind == "uniform":
        return Profile.uniform(f=1.0, i=1.0, w=1.0, w_frozen=0.0).durations(dag)
    if kind == "stage":
        return Profile.random_stages(dag.num_stages, rng).durations(dag)
    if kind == "tied":
        return random_times(dag, rng, equal_share=0.0, grid=0.25)
    if kind == "random":
        return random_times(dag, rng, equal_share=0.0)
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
