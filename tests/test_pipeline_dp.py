"""Freeze-aware stages under data parallelism: 4 gloo ranks on CPU as a (dp=2, pp=2) grid.

Each replica trains on its own batch with the same fixed freezing plan as tests/test_pipeline.py
(ratios 0, 1 and partial, a fully frozen stage-0 microbatch, whole-tensor freezes). After each of
two steps (the first includes torch's metadata inference), every replica's gradients must equal the
mean of the two replicas' float64 masked references (max abs diff <= 1e-6): DP reduced them, the
masks held, and parameters no microbatch trained stay None.

- FSDP2 (``fully_shard`` over the replica group, resharding after forward): every schedule.
- DDP: the schedules with full backwards; an I/W split schedule is refused with a clear error (DDP
  reduces in autograd hooks, which tfz's deferred dW does not run through).
- The freezing metrics (APF, AutoFreeze) refuse FSDP-sharded stages: a rank would judge its shard only.
"""

from __future__ import annotations

import numpy as np
import pytest
from _pipe_dp_workers import DDP_SCHEDULES, DP, run_dp
from _pipe_workers import (
    SCHEDULES,
    assert_grads_match,
    plan,
    reference_grads,
    runnable,
    schedule_layout,
    skip_unrunnable,
)

pytest.importorskip("torch")

from tfz.pipeline import RankError, launch  # noqa: E402

pytestmark = pytest.mark.distributed

RUNS = [(s, "fsdp") for s in SCHEDULES] + [(s, "ddp") for s in DDP_SCHEDULES]
RUN_PARAMS = [pytest.param(run, id=f"{run[0]}-{run[1]}", marks=skip_unrunnable(run[0])) for run in RUNS]


@pytest.fixture(scope="module")
def results():
    """{(schedule, wrapper): [result of rank 0..3]} from one 4-rank launch."""
    runs = [run for run in RUNS if runnable(run[0])]
    out = launch(run_dp, 2 * DP, runs, timeout=300)
    return {run: [out[r][i] for r in range(2 * DP)] for i, run in enumerate(runs)}


def _mean_reference(schedule: str) -> dict:
    _, num_stages = schedule_layout(schedule)
    table = plan(num_stages)
    refs = [reference_grads(num_stages, table, seed=5 + dp) for dp in range(DP)]
    return {
        s: {
            n: (None if refs[0][s][n] is None else np.mean([r[s][n] for r in refs], axis=0))
            for n in refs[0][s]
        }
        for s in refs[0]
    }


@pytest.mark.parametrize("run", RUN_PARAMS)
def test_grads_equal_mean_of_masked_references(results, run):
    ref = _mean_reference(run[0])
    replicas = set()
    for rank, res in enumerate(results[run]):
        replicas.add(res["dp"])
        for k, step in enumerate(res["steps"]):
            for s, grads in step.items():
                where = f"{run} rank {rank} (dp {res['dp']}) step {k} stage {s}"
                assert_grads_match(grads, ref[int(s)], where)
    assert replicas == set(range(DP))


def test_replicas_saw_different_data():
    """The mean differs from each replica's own gradients, so the test above sees a missing reduction."""
    ref = [reference_grads(2, plan(2), seed=5 + dp) for dp in range(DP)]
    diff = max(
        float(np.max(np.abs(np.subtract(ref[0][s][n], ref[1][s][n]))))
        for s in ref[0]
        for n in ref[0][s]
        if ref[0][s][n] is not None
    )
    assert diff > 1e-2


def test_ddp_with_split_backward_is_refused():
    with pytest.raises(RankError, match="DistributedDataParallel.*FSDP2"):
        launch(run_dp, 2 * DP, [("interleavedzb", "ddp")], timeout=120)


def test_metrics_refuse_sharded_stages():
    from _pipe_dp_workers import observe_sharded

    with pytest.raises(RankError, match="stage 1: tfz.metrics cannot judge FSDP-sharded parameters"):
        launch(observe_sharded, 1, timeout=120)
