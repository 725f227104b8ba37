"""A plan's stage means tell the truth: each equals the share of the stage's weight-gradient work that
the masks drawn from the plan (tfz.masks) skip, FLOP-weighted, B/W actions that cannot gain included
at 0; those actions are named in the plan."""

import numpy as np
import pytest

from tfz.dag import build_dag
from tfz.masks import LayerSpec, StageUnits, select, select_covering
from tfz.plan import PlanConfig, solve
from tfz.schedule import build_schedule

# rows of 8 x 64 = 512 weights: the realised share is within 1 / (2 * 96) of the ratio asked
UNITS = StageUnits(
    (LayerSpec("qkv", 384, 64), LayerSpec("out", 128, 64), LayerSpec("mlp", 256, 64)), block_rows=8
)


def _instance(name, weighting, rng):
    """Durations where each microbatch's backward time follows its token count (variable lengths
    for ``duration`` weighting), and a third of one stage's B/W actions take as long frozen."""
    dag = build_dag(build_schedule(name, 3, 8))
    M = dag.schedule.num_microbatches
    tokens = rng.integers(200, 1000, M) if weighting == "duration" else np.full(M, 512)
    per_token = rng.uniform(0.8, 1.2, (dag.num_stages, 8)) * 1e-3  # ms per token per (stage, kind)
    up = per_token[dag.stage, dag.kind] * tokens[dag.microbatch]
    bw = dag.kind_mask("B", "W")
    low = np.where(bw, up * rng.uniform(0.3, 0.6, dag.num_actions), up)
    stuck = bw & (dag.stage == 1) & (rng.random(dag.num_actions) < 0.35)
    low = np.where(stuck, up, low)
    return dag, up, low, tokens, stuck


@pytest.mark.parametrize("weighting", ["count", "duration"])
@pytest.mark.parametrize("name", ["1f1b", "zbv"])
@pytest.mark.parametrize("layout", ["independent", "cover"])
def test_stage_mean_is_the_share_the_masks_skip(name, weighting, layout):
    dag, up, low, tokens, stuck = _instance(name, weighting, np.random.default_rng(3))
    plan = solve(dag, up, low, PlanConfig(max_freeze_ratio=0.5, weighting=weighting))
    assert sorted(plan.cannot_gain) == sorted(dag.names[i] for i in np.flatnonzero(stuck))
    assert np.all(plan.ratios[stuck] == 0)
    bw = dag.kind_mask("B", "W")
    for s in range(dag.num_stages):
        acts = np.flatnonzero(bw & (dag.stage == s))
        mbs = dag.microbatch[acts]
        if layout == "cover":
            drawn = select_covering(UNITS, plan.ratios[acts].tolist(), stage=s, seed=5)
        else:
            drawn = [
                select(UNITS, float(plan.ratios[v]), stage=s, microbatch=int(m), seed=5)
                for v, m in zip(acts, mbs)
            ]
        frozen = np.array([m.frozen_fraction for m in drawn])
        flops = UNITS.total * tokens[mbs]  # weight-gradient FLOPs of each microbatch's W part
        realised = float(np.sum(flops * frozen) / np.sum(flops))
        assert plan.stage_mean_ratio[s] == pytest.approx(realised, abs=UNITS.bound + 1e-12), (s, layout)
    assert max(plan.stage_mean_ratio) <= 0.5 + 1e-9
    # the stage with actions that cannot gain freezes: a mean over the others alone would differ
    assert plan.stage_mean_ratio[1] > 0.05
