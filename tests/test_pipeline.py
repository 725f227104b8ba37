"""Freeze-aware stages on torch's pipeline schedules: 2 gloo ranks on CPU, spawned by the tests.

For gpipe, 1f1b, interleaved1f1b, interleavedzb, zbv, dualpipev and tfz's ZB-H1 loaded from CSV, with a
fixed freezing plan (ratios 0, 1 and partial per (stage, microbatch), a fully frozen stage-0
microbatch, whole-tensor freezes), after each of two steps (the first includes torch's metadata
inference):

- every gradient equals plain float64 autograd per microbatch with the same masks, summed and divided
  by the microbatch count (max abs diff <= 1e-6; parameters no microbatch trained stay None);
- the dW GEMM FLOPs that really ran (counted by a dispatch mode) equal the stage counters' computed
  FLOPs, and the counters' skipped FLOPs equal the masks' frozen FLOPs per (stage, microbatch);
- the timed actions are tfz's schedule order for the rank, and the W queue is empty after the step;
- a class-swapped stage gives the same grads as a directly built one, and a freeze-aware stage with no
  provider the same as an unmodified torch stage (bit for bit).

A rank that raises mid-step makes the launcher raise that error promptly.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from _pipe_workers import (
    MICROBATCHES,
    SCHEDULES,
    assert_grads_match,
    expected_flops,
    plan,
    reference_grads,
    run_failing,
    run_schedules,
    run_tracer,
    runnable,
    schedule_layout,
    schedule_params,
    tracer_reference,
)

pytest.importorskip("torch")

import torch  # noqa: E402

from tfz.pipeline import RankError, launch  # noqa: E402
from tfz.pipeline.stage import torch_split_handles_functions  # noqa: E402
from tfz.schedule import Action  # noqa: E402

VARIANTS = ("direct", "swap", "none", "none-tfz", "plain")
pytestmark = pytest.mark.distributed


def _splits(schedule: str) -> bool:
    """The schedule has I/W actions (torch runs them with stage_backward_input / _weight)."""
    orders = schedule_layout(schedule)[0].orders
    return any(a.kind in "IW" for order in orders for a in order)


def _runnable(schedule: str, variant: str) -> bool:
    # an unmodified torch stage cannot run FreezableLinear through an I/W split on some torch versions
    return variant != "plain" or torch_split_handles_functions() or not _splits(schedule)


@pytest.fixture(scope="module")
def results():
    """{(schedule, variant): [rank 0 result, rank 1 result]} from one 2-rank launch."""
    runs = [(s, v) for s in SCHEDULES for v in VARIANTS if runnable(s) and _runnable(s, v)]
    out = launch(run_schedules, 2, runs, timeout=240)
    return {run: [out[r][i] for r in range(2)] for i, run in enumerate(runs)}


def _steps(results, schedule, variant):
    per_rank = results[(schedule, variant)]
    return [(r, k, step) for r, res in enumerate(per_rank) for k, step in enumerate(res["steps"])]


@pytest.mark.parametrize("schedule", schedule_params())
def test_grads_equal_masked_reference(results, schedule):
    _, num_stages = schedule_layout(schedule)
    table = plan(num_stages)
    ref = reference_grads(num_stages, table)
    seen = set()
    for r, k, step in _steps(results, schedule, "direct"):
        for s, grads in step["grads"].items():
            s = int(s)
            seen.add(s)
            assert_grads_match(grads, ref[s], f"rank {r} step {k} stage {s}")
    assert seen == set(range(num_stages))


def test_plan_covers_the_edge_cases():
    """The plan the schedule tests use has everything the brief asks for."""
    for num_stages in (2, 4):
        table = plan(num_stages)
        ratios = {key: m.frozen_fraction for key, m in table.items()}
        assert ratios[(0, 2)] == 1.0 and table[(0, 2)].frozen.all()  # stage 0 fully frozen, embedding too
        assert "embed.weight" in table[(0, 2)].frozen_tensors
        assert any(r == 0.0 for r in ratios.values()) and any(r == 1.0 for (s, _), r in ratios.items() if s)
        assert any(0 < r < 1 for r in ratios.values())
        partial_with_tensors = [
            k for k, m in table.items() if 0 < m.frozen_fraction < 1 and m.frozen_tensors and m.frozen.any()
        ]
        assert (num_stages - 1, 1) in partial_with_tensors


@pytest.mark.parametrize("schedule", schedule_params())
def test_frozen_w_flops_are_skipped(results, schedule):
    sched, num_stages = schedule_layout(schedule)
    expected = expected_flops(num_stages, plan(num_stages))
    for r, k, step in _steps(results, schedule, "direct"):
        stages = sched.stages_of(r)
        for s in stages:
            stats = step["stats"][s]
            for mb in range(MICROBATCHES):
                got = stats["microbatches"][str(mb)]
                assert (got["w_flops"], got["w_flops_skipped"]) == expected[(s, mb)], f"stage {s} mb {mb}"
        counted = sum(step["stats"][s]["w_flops"] for s in stages)
        skipped = sum(step["stats"][s]["w_flops_skipped"] for s in stages)
        assert skipped > 0
        # the dW GEMMs that ran (dispatch-mode count) are exactly the unfrozen ones
        assert step["dw_flops"] == counted, f"rank {r} step {k}"


@pytest.mark.parametrize("schedule", schedule_params())
def test_actions_are_recorded_and_timed_in_schedule_order(results, schedule):
    sched, _ = schedule_layout(schedule)
    for r, k, step in _steps(results, schedule, "direct"):
        order = [str(a) for a in sched.orders[r]]
        assert step["spans"] == order, f"rank {r} step {k}"
        for s in sched.stages_of(r):
            assert step["stats"][s]["actions"] == [a for a in order if Action.parse(a).stage == s]
        assert step["pending"] == [[] for _ in sched.stages_of(r)]


@pytest.mark.parametrize("schedule", schedule_params())
def test_class_swap_equals_direct_stage(results, schedule):
    direct = _steps(results, schedule, "direct")
    swapped = _steps(results, schedule, "swap")
    assert len(direct) == len(swapped) == 4
    for (r, k, a), (_, _, b) in zip(direct, swapped):
        assert a["grads"] == b["grads"], f"rank {r} step {k}"
        assert a["stats"] == b["stats"]
        assert a["spans"] == b["spans"]


@pytest.mark.parametrize("schedule", schedule_params())
def test_no_provider_equals_unmodified_torch_stage(results, schedule):
    if (schedule, "plain") not in results:
        pytest.skip(f"torch {torch.__version__}'s own I/W split cannot run FreezableLinear")
    plain = _steps(results, schedule, "plain")
    none = _steps(results, schedule, "none")
    for (r, k, a), (_, _, b) in zip(plain, none):
        assert a["grads"] == b["grads"], f"rank {r} step {k}"  # bit for bit
        assert b["spans"] == [str(x) for x in schedule_layout(schedule)[0].orders[r]]
        assert all(st["w_flops_skipped"] == 0 for st in b["stats"].values())
    # and freezing did change something
    masked = _steps(results, schedule, "direct")
    assert any(a["grads"] != m["grads"] for (_, _, a), (_, _, m) in zip(plain, masked))


@pytest.mark.parametrize("schedule", schedule_params())
def test_no_provider_fallback_trains_everything(results, schedule):
    """tfz's backward standing in for torch's own I/W split (torch 2.11) freezes nothing."""
    _, num_stages = schedule_layout(schedule)
    ref = reference_grads(num_stages, {})
    for r, k, step in _steps(results, schedule, "none-tfz"):
        for s, grads in step["grads"].items():
            assert_grads_match(grads, ref[int(s)], f"rank {r} step {k} stage {s}")
        assert step["spans"] == [str(x) for x in schedule_layout(schedule)[0].orders[r]]
        assert all(st["w_flops_skipped"] == 0 for st in step["stats"].values())
        assert step["pending"] == [[] for _ in step["pending"]]


@pytest.mark.parametrize("fail_at", [(1, 2), (0, 1)])
def test_rank_raising_mid_step_ends_the_run(fail_at):
    start = time.monotonic()
    with pytest.raises(RankError) as info:
        launch(run_failing, 2, fail_at, timeout=90)
    elapsed = time.monotonic() - start
    err = info.value
    assert err.rank == fail_at[0]
    assert err.exc_type == "ValueError"
    assert f"provider failed at stage {fail_at[0]} microbatch {fail_at[1]}" in err.exc_message
    assert "masks_for" in err.remote_traceback
    assert isinstance(err.__cause__, ValueError)
    assert elapsed < 45, f"took {elapsed:.1f} s"


def test_tracer_built_stages_by_class_swap():
    """Stages from torch's tracer (``_PipelineStage``), swapped after the schedule was built."""
    out = launch(run_tracer, 2, timeout=120)
    ref = tracer_reference()
    seen = set()
    for r, res in enumerate(out):
        assert (res["class"], res["base"]) == ("FreezeAwarePipelineStage", "_PipelineStage")
        for name, g in res["grads"].items():
            seen.add(name)
            assert (g is None) == (ref[name] is None), name
            if g is not None:
                np.testing.assert_allclose(g, ref[name], rtol=0, atol=1e-6, err_msg=f"rank {r} {name}")
    assert seen == set(ref)
