"""tfz.schedule builders, names and CSV against closed forms and an independent executor (no torch).

Equality with torch's own schedules is in test_schedule_torch.py.
"""

import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from _sched_exec import execute

from tfz.dag import build_dag, simulate
from tfz.schedule import SCHEDULES, Action, Schedule, build_schedule, make_schedule
from tfz.schedule.csv_io import dump_csv, load_csv

# (name, P, M, V) combinations every builder must handle; M includes the minimum and non-multiples
VALID = [
    ("gpipe", 1, 1, 1),
    ("gpipe", 3, 5, 1),
    ("1f1b", 1, 3, 1),
    ("1f1b", 4, 4, 1),
    ("1f1b", 3, 7, 1),
    ("interleaved1f1b", 1, 3, 2),
    ("interleaved1f1b", 4, 3, 2),
    ("interleaved1f1b", 4, 10, 2),
    ("interleaved1f1b", 2, 6, 3),
    ("interleaved1f1b", 3, 4, 4),
    ("interleavedzb", 2, 1, 2),
    ("interleavedzb", 4, 10, 2),
    ("interleavedzb", 3, 6, 3),
    ("zbh1", 1, 2, 1),
    ("zbh1", 4, 2, 1),
    ("zbh1", 4, 9, 1),
    ("zbv", 1, 1, 2),
    ("zbv", 3, 2, 2),
    ("zbv", 4, 9, 2),
    ("dualpipev", 1, 2, 2),
    ("dualpipev", 3, 6, 2),
    ("dualpipev", 4, 11, 2),
]

KINDS_USED = {
    "gpipe": {"F", "B"},
    "1f1b": {"F", "B"},
    "interleaved1f1b": {"F", "B"},
    "interleavedzb": {"F", "I", "W"},
    "zbh1": {"F", "I", "W"},
    "zbv": {"F", "I", "W"},
    "dualpipev": {"F", "B", "I", "W"},
}


def _durations(sched, f, i, w):
    table = {"F": f, "I": i, "W": w, "B": i + w}
    return {a: table[a.kind] for a in sched.actions()}


def _simulate(sched, f=1.0, i=1.0, w=1.0):
    dag = build_dag(sched)
    return simulate(dag, {str(a): t for a, t in _durations(sched, f, i, w).items()})


def _bubble_time(sim):
    return sim.makespan - sim.busy


@pytest.mark.parametrize("name,P,M,V", VALID)
def test_structure(name, P, M, V):
    sched = build_schedule(name, P, M, V)
    assert (sched.num_ranks, sched.num_microbatches, sched.num_stages) == (P, M, P * V)
    # placement from first principles: loop puts stage s on s % P; V puts rank r's two chunks at r, 2P-1-r
    if name in ("zbv", "dualpipev"):
        assert sched.placement == "v"
        assert all(set(sched.stages_of(r)) == {r, 2 * P - 1 - r} for r in range(P))
    else:
        assert sched.placement == "loop"
        assert sched.stage_to_rank == tuple(s % P for s in range(P * V))
    for r, order in enumerate(sched.orders):
        assert all(sched.stage_to_rank[a.stage] == r for a in order)
    assert {a.kind for a in sched.actions()} == KINDS_USED[name] or M == 1
    # every stage runs each kind in microbatch order
    for s in range(sched.num_stages):
        for kind in "FBIW":
            mbs = [a.microbatch for a in sched.actions() if a.stage == s and a.kind == kind]
            assert mbs == sorted(mbs)
    build_dag(sched)  # complete, no duplicates, no deadlock


@pytest.mark.parametrize("name,P,M,V", VALID[1::2])
def test_simulation_matches_independent_executor(name, P, M, V):
    sched = build_schedule(name, P, M, V)
    dag = build_dag(sched)
    rng = random.Random(hash((name, P, M, V)) & 0xFFFF)
    for _ in range(3):
        dur = {a: rng.uniform(0.1, 2.0) for a in sched.actions()}
        ref = execute(sched, dur)
        assert ref is not None, "the independent executor deadlocked"
        sim = simulate(dag, {str(a): t for a, t in dur.items()})
        np.testing.assert_allclose(sim.end, [ref[tuple(a)] for a in dag.actions], rtol=1e-12)


@pytest.mark.parametrize("P,M", [(2, 2), (2, 7), (3, 3), (4, 4), (4, 9), (8, 8), (8, 21)])
def test_zbh1_bubble_is_a_third_of_1f1b(P, M):
    """Zero-bubble paper: 1F1B idles (P-1)(F+B) = (P-1)(F+I+W) per rank, ZB-H1 (P-1)(F+I-W)."""
    one = _simulate(build_schedule("1f1b", P, M))
    zb = _simulate(build_schedule("zbh1", P, M))
    np.testing.assert_allclose(_bubble_time(one), 3.0 * (P - 1), rtol=1e-12)
    np.testing.assert_allclose(_bubble_time(zb), 1.0 * (P - 1), atol=1e-12)
    np.testing.assert_allclose(_bubble_time(zb) * 3, _bubble_time(one), atol=1e-12)
    np.testing.assert_allclose(zb.bubble_ratio, (P - 1) / (3 * M + P - 1), rtol=1e-12)


@pytest.mark.parametrize("name", ["zbh1", "interleavedzb"])
@pytest.mark.parametrize("f,i,w", [(1.0, 1.0, 0.5), (1.0, 2.0, 1.0), (2.0, 1.0, 1.0), (1.5, 1.0, 0.25)])
@pytest.mark.parametrize("P", [2, 4, 5])
def test_zero_bubble_formula(name, f, i, w, P):
    """(P-1)(F + I - W) idle per rank for ZB-H1 (paper, section 3.1) and torch's ZB1P, M a multiple of P."""
    M = 3 * P
    sim = _simulate(build_schedule(name, P, M), f, i, w)
    np.testing.assert_allclose(_bubble_time(sim), (P - 1) * (f + i - w), rtol=1e-12)


@pytest.mark.parametrize("V", [2, 3])
@pytest.mark.parametrize("P,M", [(2, 4), (4, 8), (4, 12), (8, 16)])
def test_interleaved_1f1b_bubble(P, M, V):
    """Megatron's interleaved 1F1B (M a multiple of P) idles (P-1)(F+B) of per-chunk time on every rank."""
    sim = _simulate(build_schedule("interleaved1f1b", P, M, V), 1.0, 1.5, 0.5)
    np.testing.assert_allclose(_bubble_time(sim), (P - 1) * 3.0, rtol=1e-12)
    np.testing.assert_allclose(sim.busy, V * M * 3.0, rtol=1e-12)


def _peak_in_flight(order, opens, closes):
    live = peak = 0
    for a in order:
        live += a.kind == opens
        live -= a.kind in closes
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("P,M", [(2, 5), (4, 4), (4, 11), (8, 8), (8, 3)])
def test_zbh1_memory_equals_1f1b(P, M):
    """Microbatches awaiting their input gradient per rank match 1F1B; held for W, at most 1F1B's peak."""
    zb = build_schedule("zbh1", P, M)
    one = build_schedule("1f1b", P, max(M, P))
    if M >= P:
        for r in range(P):
            assert _peak_in_flight(zb.orders[r], "F", "I") == _peak_in_flight(one.orders[r], "F", "B")
    peak_1f1b = max(_peak_in_flight(o, "F", "B") for o in one.orders)
    assert peak_1f1b == P
    assert max(_peak_in_flight(o, "F", "W") for o in zb.orders) <= peak_1f1b
    for order in zb.orders:  # W follows its own I, never B
        seen_i = set()
        for a in order:
            assert a.kind != "B"
            if a.kind == "I":
                seen_i.add(a.microbatch)
            if a.kind == "W":
                assert a.microbatch in seen_i


@pytest.mark.parametrize("P", [1, 2, 3, 5])
def test_zbh1_every_microbatch_count(P):
    for M in range(1, 2 * P + 2):
        sched = build_schedule("zbh1", P, M)
        dag = build_dag(sched)
        assert dag.num_actions == 3 * P * M


def test_torch_class_names_are_aliases():
    assert build_schedule("ZBVZeroBubble", 2, 4) == build_schedule("zbv", 2, 4)
    assert (
        build_schedule("InterleavedZeroBubble", 2, 4).orders == build_schedule("interleavedzb", 2, 4).orders
    )
    assert build_schedule("Interleaved1F1B", 2, 4).orders == build_schedule("interleaved1f1b", 2, 4).orders


# --- bad input ----------------------------------------------------------------------------------


def test_unknown_schedule_lists_choices():
    with pytest.raises(ValueError) as err:
        build_schedule("zb-h7", 2, 4)
    assert "'zb-h7'" in str(err.value)
    assert all(name in str(err.value) for name in SCHEDULES)


@pytest.mark.parametrize("ranks", [0, -1, True, 2.0, "2"])
def test_bad_ranks(ranks):
    with pytest.raises(ValueError, match=f"ranks must be an integer >= 1, got {ranks!r}"):
        build_schedule("1f1b", ranks, 4)


@pytest.mark.parametrize("name", SCHEDULES)
def test_zero_microbatches(name):
    with pytest.raises(ValueError, match="microbatches must be an integer >= 1, got 0"):
        build_schedule(name, 2, 0)


@pytest.mark.parametrize(
    "name,P,least",
    [("1f1b", 4, 4), ("1f1b", 8, 8), ("dualpipev", 3, 6), ("dualpipev", 1, 2), ("dualpipev", 8, 16)],
)
def test_too_few_microbatches(name, P, least):
    with pytest.raises(ValueError) as err:
        build_schedule(name, P, least - 1)
    assert f"{name} with {P} ranks needs at least {least} microbatches, got {least - 1}" in str(err.value)
    build_dag(build_schedule(name, P, least))  # the minimum itself works


@pytest.mark.parametrize("name", ["interleaved1f1b", "interleavedzb"])
@pytest.mark.parametrize("P,M,rounds", [(4, 9, 2), (4, 14, 3), (2, 5, 2), (8, 17, 2)])
def test_interleaved_rounds_rule(name, P, M, rounds):
    with pytest.raises(ValueError) as err:
        build_schedule(name, P, M)
    text = str(err.value)
    assert name in text and f"{P} ranks and {M} microbatches" in text
    assert f"multiple of the number of rounds max(1, {M} // {P}) = {rounds}" in text
    lo, hi = (M // rounds) * rounds, (M // rounds + 1) * rounds
    assert f"{lo}, {hi}" in text
    for ok in (lo, hi):  # the suggested counts really work
        build_dag(build_schedule(name, P, ok))


@pytest.mark.parametrize(
    "name,V,allowed",
    [
        ("zbv", 3, "exactly 2"),
        ("dualpipev", 1, "exactly 2"),
        ("gpipe", 2, "exactly 1"),
        ("zbh1", 2, "exactly 1"),
    ]
    + [("interleaved1f1b", 1, ">= 2"), ("interleavedzb", 1, ">= 2")],
)
def test_bad_stages_per_rank(name, V, allowed):
    with pytest.raises(ValueError, match=f"{name} supports stages per rank {allowed}, got {V}"):
        build_schedule(name, 2, 4, V)
    with pytest.raises(ValueError, match="stages per rank must be an integer >= 1, got 0"):
        build_schedule(name, 2, 4, 0)


def test_builders_do_not_import_torch():
    code = textwrap.dedent(
        """
        import sys
        from tfz.schedule import SCHEDULES, build_schedule
        from tfz.schedule.csv_io import load_csv, dump_csv
        for name in SCHEDULES:
            build_schedule(name, 2, 4)
        assert "torch" not in sys.modules, "tfz.schedule imported torch"
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --- CSV ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,P,M,V", VALID[::2])
def test_csv_round_trip(tmp_path, name, P, M, V):
    sched = build_schedule(name, P, M, V)
    path = tmp_path / "s.csv"
    dump_csv(sched, path)
    rows = path.read_text().splitlines()
    assert rows == [",".join(str(a) for a in order) for order in sched.orders]
    back = load_csv(path)
    assert back.name == "s"
    assert (back.orders, back.stage_to_rank, back.num_microbatches) == (
        sched.orders,
        sched.stage_to_rank,
        sched.num_microbatches,
    )
    if P > 1:  # with one rank, loop and V placements are the same
        assert back.placement == sched.placement


@pytest.mark.parametrize("name", SCHEDULES)
def test_csv_round_trip_of_one_rank_is_equal(tmp_path, name):
    """With one rank every placement puts all stages on rank 0: the name says which it was."""
    sched = build_schedule(name, 1, 2)
    dump_csv(sched, tmp_path / "s.csv")
    back = load_csv(tmp_path / "s.csv", name=name)
    assert back == sched
    assert back.placement == ("v" if name in ("zbv", "dualpipev") else "loop")


@pytest.mark.parametrize("text", ["\u0663F0", "\uff10F\uff11", "0F\u0661", "\U0001d7ceB0"])
def test_action_parse_takes_ascii_digits_only(text):
    with pytest.raises(ValueError, match="malformed action"):
        Action.parse(text)


def test_csv_reads_torch_style_cells(tmp_path):
    """Bubbles (empty cells), rows of different lengths, spaces, and an overlapped F&B pair."""
    text = "0F0,,0F1, 3F0 ,(0F2;3B0)OVERLAP_F_B\n,1F0,2F0\n"
    path = tmp_path / "t.csv"
    path.write_text(text)
    sched = load_csv(path, name="hand")
    expected = [["0F0", "0F1", "3F0", "0F2", "3B0"], ["1F0", "2F0"]]
    assert [[str(a) for a in o] for o in sched.orders] == expected
    assert sched.stage_to_rank == (0, 1, 1, 0) and sched.placement == "v"
    assert sched.num_microbatches == 3 and sched.name == "hand"


def test_csv_custom_placement(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("1F0,1B0\n0F0,0B0\n")
    sched = load_csv(path)
    assert sched.stage_to_rank == (1, 0) and sched.placement == "custom"
    build_dag(sched)


@pytest.mark.parametrize(
    "cell", ["0X1", "F0", "0F", "-1F0", "0F0x", "abc", "0 F0", "(0F1)OVERLAP", "(0F1;zz)OVERLAP_F_B"]
)
def test_csv_malformed_cell(tmp_path, cell):
    path = tmp_path / "bad.csv"
    path.write_text(f"0F0,0B0\n1F0,1B0,{cell}\n")
    with pytest.raises(ValueError) as err:
        load_csv(path)
    text = str(err.value)
    assert "row 2 (rank 1), column 3" in text and repr(cell) in text and str(path) in text


@pytest.mark.parametrize("cell", ["0SEND_F0", "1RECV_B2", "0UNSHARD", "1REDUCE_GRAD"])
def test_csv_rejects_communication_actions(tmp_path, cell):
    path = tmp_path / "comms.csv"
    path.write_text(f"0F0,{cell},0B0\n1F0,1B0\n")
    with pytest.raises(ValueError, match="communication/FSDP action") as err:
        load_csv(path)
    assert "row 1 (rank 0), column 2" in str(err.value)


@pytest.mark.parametrize(
    "text,message",
    [
        ("", "empty schedule file: no rows"),
        ("0F0,0B0\n\n1F0,1B0\n", "row 2 (rank 1) has no actions"),
        ("0F0,0B0\n , ,\n", "row 2 (rank 1) has no actions"),
        ("0F0,0B0,1F1\n1F0,1B0\n", "stage 1 is on two ranks: rank 0"),
        ("0F0,0B0\n2F0,2B0\n", "stage 1 appears in no row"),
    ],
)
def test_csv_structure_errors(tmp_path, text, message):
    path = tmp_path / "x.csv"
    path.write_text(text)
    with pytest.raises(ValueError) as err:
        load_csv(path)
    assert message in str(err.value)


def test_csv_stage_on_two_ranks_names_both_places(tmp_path):
    path = tmp_path / "two.csv"
    path.write_text("0F0,1F0\n1F1,0B0\n")
    with pytest.raises(ValueError) as err:
        load_csv(path)
    text = str(err.value)
    assert "row 1 (rank 0), column 2: '1F0'" in text and "row 2 (rank 1), column 1: '1F1'" in text


def test_hand_made_deadlocking_csv(tmp_path):
    """Rank 0 runs 0B0 before 0F1; 0B0 needs 1B0, which rank 1 runs only after 1F1, which needs 0F1."""
    path = tmp_path / "deadlock.csv"
    path.write_text("0F0,0B0,0F1,0B1\n1F1,1F0,1B0,1B1\n")
    sched = load_csv(path)  # well-formed: the cycle is found when building the DAG
    assert execute(sched, {a: 1.0 for a in sched.actions()}) is None  # the ranks really wait forever
    with pytest.raises(ValueError, match="deadlock") as err:
        build_dag(sched)
    assert all(a in str(err.value) for a in ("0B0", "0F1", "1F1"))


def test_incomplete_csv_is_caught_by_the_dag(tmp_path):
    path = tmp_path / "incomplete.csv"
    path.write_text("0F0,0F1,0I0,0W0,0B1\n1F0,1F1,1I0,1B1\n")
    with pytest.raises(ValueError, match="1I0 has no matching 1W0"):
        build_dag(load_csv(path))


def test_dump_csv_rejects_bad_input(tmp_path):
    with pytest.raises(TypeError, match="Schedule"):
        dump_csv([["0F0"]], tmp_path / "a.csv")
    empty_rank = Schedule("e", 1, (0, 1), ((Action(0, "F", 0), Action(0, "B", 0)), ()))
    with pytest.raises(ValueError, match="rank 1 of schedule 'e' has no actions"):
        dump_csv(empty_rank, tmp_path / "b.csv")
    strings = make_schedule("s", [["0F0"]], 1)
    with pytest.raises(TypeError, match="'0F0', not an Action"):
        dump_csv(strings, tmp_path / "c.csv")


# -- size limits -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("P,M", [(1, 2), (2, 4), (3, 6), (4, 8), (4, 11)])
def test_estimate_counts_the_actions_built(name, P, M):
    from tfz.schedule import estimate_size
    from tfz.schedule.builders import min_microbatches

    M = max(M, min_microbatches(name, P))
    try:
        sched = build_schedule(name, P, M)
    except ValueError:  # the interleaved rounds rule
        pytest.skip("count not accepted by this schedule")
    est = estimate_size(name, P, M, sched.stages_per_rank)
    if name == "dualpipev":  # some backwards are full B (2 actions), some I + W (3): an upper bound
        assert 2 * sched.num_stages * M <= sched.num_actions <= est.actions
    else:
        assert est.actions == sched.num_actions
    assert est.bytes == est.actions * 600


@pytest.mark.parametrize(
    "name,P,M,shown",
    [
        ("1f1b", 10**9, 10**9, "2e+18 actions"),
        ("1f1b", 10**6, 10**6, "2e+12 actions"),
        ("gpipe", 1, 10**9, "2e+09 actions"),
        ("zbv", 1000, 1000, "6,000,000 actions"),
    ],
)
def test_oversized_schedules_are_refused_before_building(name, P, M, shown):
    import tracemalloc

    tracemalloc.start()
    with pytest.raises(ValueError) as err:
        build_schedule(name, P, M)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    msg = str(err.value)
    assert f"{P} ranks" in msg and f"{M} microbatches" in msg and shown in msg, msg
    assert "the limit is 2,000,000 actions (tfz.schedule.MAX_ACTIONS)" in msg and " GB" in msg
    assert peak < 1e6  # nothing was built


def test_size_limit_boundary_and_custom_limit():
    from tfz.schedule import MAX_ACTIONS, check_size

    assert MAX_ACTIONS == 2_000_000
    assert check_size("1f1b", 4, 250_000).actions == MAX_ACTIONS  # exactly at the limit: accepted
    with pytest.raises(ValueError, match="2,000,002 actions"):
        check_size("1f1b", 1, 1_000_001)
    with pytest.raises(ValueError, match=r"has 16 actions .*the limit is 15 actions"):
        build_schedule("1f1b", 2, 4, max_actions=15)
    assert build_schedule("1f1b", 2, 4, max_actions=16).num_actions == 16


def test_numpy_counts_are_accepted_and_bools_refused():
    assert build_schedule("1f1b", np.int64(2), np.int32(4)) == build_schedule("1f1b", 2, 4)
    with pytest.raises(ValueError, match="microbatches must be an integer >= 1, got True"):
        build_schedule("1f1b", 1, True)


def test_csv_with_a_huge_microbatch_allocates_nothing(tmp_path):
    import tracemalloc

    path = tmp_path / "huge.csv"
    path.write_text("0F0,0F999999999,0B0\n")
    sched = load_csv(path)
    assert sched.num_microbatches == 10**9
    tracemalloc.start()
    with pytest.raises(ValueError, match=r"^stage 0 is missing microbatch 1: no forward 0F1$"):
        build_dag(sched)
    assert tracemalloc.get_traced_memory()[1] < 1e6
    tracemalloc.stop()


@pytest.mark.parametrize(
    "text,message",
    [
        ("0F0,0F0,0B0,0F7\n", "duplicate action 0F0"),
        ("0F0,0B0,0F5\n", "stage 0 is missing microbatch 1: no forward 0F1"),
        ("0F0,0F1,0B0,0B1\n1F0,1B0,1F9\n", "stage 0 is missing microbatch 2: no forward 0F2"),
        (
            "0F0,0F1,0F2,0F3,0F4,0B0,0B1,0B2,0B3,0B4\n1F0,1F4\n2F0\n",
            "stage 1 is missing microbatch 1: no forward 1F1",
        ),
    ],
)
def test_sparse_and_dense_checks_give_the_same_error(tmp_path, monkeypatch, text, message):
    """A schedule with fewer actions than (stage, microbatch) pairs is checked without the dense
    table; the error is the one the dense check gives for the same schedule."""
    import tfz.dag

    path = tmp_path / "s.csv"
    path.write_text(text)
    sched = load_csv(path)
    assert sched.num_stages * sched.num_microbatches > sched.num_actions
    with pytest.raises(ValueError) as err:
        build_dag(sched)
    assert str(err.value) == message
    monkeypatch.setattr(tfz.dag, "_check_complete_sparse", lambda *a: None)  # the dense path
    with pytest.raises(ValueError) as err:
        build_dag(sched)
    assert str(err.value) == message


def test_csv_stage_gap_far_away_is_named_fast(tmp_path):
    path = tmp_path / "gap.csv"
    path.write_text("0F0,0B0\n999999999F0,999999999B0\n")
    with pytest.raises(ValueError, match="stage 1 appears in no row, but stages up to 999999999 are used"):
        load_csv(path)


def test_csv_size_limits(tmp_path, monkeypatch):
    import tfz.schedule.csv_io as csv_io

    path = tmp_path / "big.csv"
    path.write_text("".join(f"{r}F0,{r}B0\n" for r in range(100)))  # 100 ranks, 200 actions
    size = path.stat().st_size
    monkeypatch.setattr(csv_io, "MAX_CSV_BYTES", size - 1)
    with pytest.raises(ValueError, match=rf"{size:,} bytes is larger than a schedule CSV may be"):
        load_csv(path)
    monkeypatch.setattr(csv_io, "MAX_CSV_BYTES", size)
    assert load_csv(path).num_actions == 200
    monkeypatch.setattr(csv_io, "MAX_ACTIONS", 150)
    with pytest.raises(ValueError, match=r"big.csv \(after row 76\) has 152 actions .*limit is 150"):
        load_csv(path)


def test_long_cells_are_cut_in_messages(tmp_path):
    path = tmp_path / "long.csv"
    path.write_text("0F" + "9" * 5000 + "\n")
    with pytest.raises(ValueError) as err:
        load_csv(path)
    msg = str(err.value)
    assert "malformed action" in msg and "(5004 characters)" in msg and len(msg) < 400


def _builds(name, P, M) -> bool:
    try:
        build_schedule(name, P, M)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("name", ["interleaved1f1b", "interleavedzb"])
def test_interleaved_hint_names_the_nearest_counts_that_build(name):
    """Over every small (P, M) a refused count suggests the nearest counts below and above that build
    (found by building every count, not by the rule)."""
    import re

    for P in range(1, 7):
        ok = [M for M in range(1, 4 * P + 8) if _builds(name, P, M)]
        for M in range(2, 3 * P + 3):
            if M in ok:
                continue
            with pytest.raises(ValueError) as err:
                build_schedule(name, P, M)
            lo, hi = map(int, re.search(r"nearby valid counts: (\d+), (\d+)$", str(err.value)).groups())
            assert lo == max(m for m in ok if m < M) and hi == min(m for m in ok if m > M), (P, M)
