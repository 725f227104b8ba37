"""tfz's schedule orders against torch 2.13's own schedules, CSV exchange with torch's runtime.

``from_torch`` runs torch's step loops with recording stand-in stages (no process group); the
distributed tests run 1F1B and GPipe for real on gloo ranks and record the stage calls.
"""

import logging

import numpy as np
import pytest
from _sched_dist import reference_grads, spawn

from tfz.dag import build_dag
from tfz.schedule import build_schedule, make_schedule
from tfz.schedule.action import Action
from tfz.schedule.builders import min_microbatches
from tfz.schedule.csv_io import load_csv
from tfz.schedule.torch_io import TORCH_NAMES, from_torch, instantiate_torch, replay_on_torch

torch = pytest.importorskip("torch")

TORCH_CLASS = {tfz: cls for cls, tfz in TORCH_NAMES.items()}


@pytest.fixture(autouse=True)
def _quiet_torch():
    logging.getLogger("torch.distributed.pipelining.schedules").setLevel(logging.ERROR)


def _microbatch_grid(P: int, least: int) -> list[int]:
    """The minimum, values around P and 2P (non-multiples included) and a larger odd count."""
    return sorted({m for m in (least, P - 1, P, P + 1, 2 * P - 1, 2 * P, 2 * P + 1, 3 * P + 2) if m >= least})


def _cases(names, ranks, vs):
    for name in names:
        for P in ranks:
            for V in vs(name):
                for M in _microbatch_grid(P, min_microbatches(name, P)):
                    yield name, P, M, V


MULTI = ["interleaved1f1b", "interleavedzb", "zbv", "dualpipev"]
MULTI_CASES = list(_cases(MULTI, (1, 2, 4, 8), lambda n: (2, 3, 4) if n.startswith("interleaved") else (2,)))
SINGLE_CASES = list(_cases(["gpipe", "1f1b"], (1, 2, 3, 4, 8), lambda n: (1,)))


def _check_same_as_torch(name, P, M, V):
    try:
        ours = build_schedule(name, P, M, V)
    except ValueError as ours_err:
        # tfz refuses exactly when torch refuses
        with pytest.raises(ValueError, match="rejects"):
            from_torch(TORCH_CLASS[name], P, M, V)
        return str(ours_err)
    theirs = from_torch(TORCH_CLASS[name], P, M, V)
    assert theirs.name == name
    assert theirs.stage_to_rank == ours.stage_to_rank
    for r in range(P):
        assert theirs.orders[r] == ours.orders[r], f"rank {r} differs"
    return None


@pytest.mark.parametrize("name,P,M,V", MULTI_CASES, ids=lambda x: str(x))
def test_multi_stage_orders_equal_torch(name, P, M, V):
    _check_same_as_torch(name, P, M, V)


@pytest.mark.parametrize("name,P,M,V", SINGLE_CASES, ids=lambda x: str(x))
def test_single_stage_orders_equal_torch_step_loop(name, P, M, V):
    _check_same_as_torch(name, P, M, V)


def test_grid_covers_refusals_and_non_multiples():
    """The grid above exercises torch's refusals (the rounds rule) and M not a multiple of P."""
    refused = [
        c for c in MULTI_CASES if c[0].startswith("interleaved") and c[2] > c[1] and c[2] % (c[2] // c[1])
    ]
    assert len(refused) >= 6
    assert any(c[2] % c[1] and c[1] > 1 for c in MULTI_CASES if c not in refused)


def _accepted(case):
    try:
        build_schedule(*case)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("name,P,M,V", [c for c in MULTI_CASES if c[1] in (2, 4) and _accepted(c)][::4])
def test_runtime_executes_its_ir(name, P, M, V):
    """For runtime schedules the executed order is torch's IR without bubbles, pairs expanded."""
    executed = from_torch(TORCH_CLASS[name], P, M, V)
    assert from_torch(TORCH_CLASS[name], P, M, V, source="ir") == executed


@pytest.mark.parametrize("P,M", [(2, 2), (2, 4), (3, 5), (4, 4), (4, 8)])
def test_torch_1f1b_ir_is_off_by_one_on_the_last_rank(P, M):
    ir = from_torch("1F1B", P, M, source="ir")
    executed = from_torch("1F1B", P, M)
    assert executed == build_schedule("1f1b", P, M)
    assert ir.orders[: P - 1] == executed.orders[: P - 1]
    last_ir = [a.microbatch for a in ir.orders[P - 1] if a.kind == "F"]
    last_run = [a.microbatch for a in executed.orders[P - 1] if a.kind == "F"]
    assert last_run == list(range(M)) and last_ir == list(range(1, M + 1))
    with pytest.raises(ValueError, match=f"microbatch {M} not in"):
        build_dag(ir)


@pytest.mark.parametrize(
    "name,P,M,V,marker",
    [
        ("zbv", 2, 2, 2, ",,"),  # bubbles are empty cells
        ("dualpipev", 2, 5, 2, "OVERLAP_F_B"),
        ("interleaved1f1b", 4, 8, 2, ",,"),
        ("interleavedzb", 3, 6, 3, "W"),
    ],
)
def test_torch_dumped_csv_loads(tmp_path, name, P, M, V, marker):
    path = tmp_path / f"{name}.csv"
    instantiate_torch(TORCH_CLASS[name], P, M, V)._dump_csv(str(path), format="compute_only")
    assert marker in path.read_text()
    loaded = load_csv(path)
    ours = build_schedule(name, P, M, V)
    assert loaded.orders == ours.orders
    assert loaded.stage_to_rank == ours.stage_to_rank and loaded.num_microbatches == M
    build_dag(loaded)


@pytest.mark.parametrize(
    "name,P,M,V",
    [
        ("zbh1", 2, 4, 1),
        ("zbh1", 4, 3, 1),
        ("zbh1", 5, 11, 1),
        ("gpipe", 3, 2, 1),
        ("1f1b", 3, 5, 1),
        ("interleaved1f1b", 3, 6, 3),
        ("interleavedzb", 4, 8, 2),
        ("zbv", 3, 7, 2),
        ("dualpipev", 3, 7, 2),
    ],
)
def test_dumped_csv_runs_on_torch_runtime(tmp_path, name, P, M, V):
    """torch's _PipelineScheduleRuntime loads tfz's CSV (validation, send/recv lowering) and runs it as is."""
    sched = build_schedule(name, P, M, V)
    replayed = replay_on_torch(sched, tmp_path / "s.csv")
    assert replayed.orders == sched.orders
    assert replayed.stage_to_rank == sched.stage_to_rank


def test_torch_runtime_rejects_deadlocking_schedule():
    sched = make_schedule(
        "dead", [[Action.parse(x) for x in o.split()] for o in ("0F0 0B0 0F1 0B1", "1F1 1F0 1B0 1B1")], 2
    )
    with pytest.raises(ValueError, match="torch's _PipelineScheduleRuntime rejects schedule 'dead'"):
        replay_on_torch(sched)


def test_from_torch_bad_input():
    with pytest.raises(ValueError, match="Unknown schedule name 'nope'"):
        from_torch("nope", 2, 4)
    with pytest.raises(TypeError, match="torch schedule class or name"):
        from_torch(42, 2, 4)
    with pytest.raises(ValueError, match="Schedule1F1B runs one stage per rank, got stages per rank 2"):
        from_torch("1F1B", 2, 4, 2)
    with pytest.raises(ValueError, match="torch's Schedule1F1B rejects ranks=4, microbatches=3"):
        from_torch("1F1B", 4, 3)
    with pytest.raises(ValueError, match="torch's ScheduleDualPipeV rejects"):
        from_torch("DualPipeV", 2, 3)
    with pytest.raises(ValueError, match="ranks must be an integer >= 1, got 0"):
        from_torch("GPipe", 0, 3)
    with pytest.raises(ValueError, match="source must be 'executed' or 'ir'"):
        from_torch("GPipe", 2, 3, source="both")


def test_from_torch_accepts_classes_and_other_schedules():
    from torch.distributed.pipelining import ScheduleGPipe
    from torch.distributed.pipelining.schedules import ScheduleLoopedBFS

    assert from_torch(ScheduleGPipe, 2, 3) == build_schedule("gpipe", 2, 3)
    bfs = from_torch(ScheduleLoopedBFS, 2, 3)  # a schedule tfz has no builder for
    assert bfs.name == "loopedbfs" and bfs.placement == "loop"
    build_dag(bfs)


# --- real runs on gloo -----------------------------------------------------------------------------


def _check_runs(results, runs, world):
    for run_index, run in enumerate(runs):
        name, M = run["tfz"], run["microbatches"]
        expected = build_schedule(name, world, M)
        ref = reference_grads(world, M)
        for r in range(world):
            got = results[r][run_index]
            assert got["log"] == [str(a) for a in expected.orders[r]], f"{name} rank {r}"
            for g, g_ref in zip(got["grads"], ref[r]):
                np.testing.assert_allclose(g, g_ref, rtol=0, atol=1e-12)


@pytest.mark.distributed
def test_torch_1f1b_and_gpipe_execute_tfz_orders_on_2_ranks():
    runs = [
        {"kind": "torch", "schedule": "1F1B", "tfz": "1f1b", "microbatches": 4},
        {"kind": "torch", "schedule": "1F1B", "tfz": "1f1b", "microbatches": 2},
        {"kind": "torch", "schedule": "GPipe", "tfz": "gpipe", "microbatches": 3},
    ]
    _check_runs(spawn(runs, 2), runs, 2)


@pytest.mark.distributed
def test_torch_1f1b_executes_tfz_order_on_3_ranks():
    runs = [{"kind": "torch", "schedule": "1F1B", "tfz": "1f1b", "microbatches": 5}]
    results = spawn(runs, 3)
    _check_runs(results, runs, 3)
    # torch's IR for the same class disagrees with the run on the last rank only
    ir = from_torch("1F1B", 3, 5, source="ir")
    assert [str(a) for a in ir.orders[2]] != results[2][0]["log"]
    assert [[str(a) for a in o] for o in ir.orders[:2]] == [results[r][0]["log"] for r in range(2)]
