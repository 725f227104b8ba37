"""tfz.timeline: Chrome trace structure and the PNG Gantt chart."""

import gzip
import json
import re

import numpy as np
import pytest

from tfz.dag import build_dag, simulate
from tfz.profile import Profile
from tfz.schedule import build_schedule
from tfz.timeline import (
    _idle_intervals,
    chrome_trace,
    default_png_size,
    gantt_png,
    write_chrome_trace,
    write_gantt_png,
)


def _sim(name="1f1b", P=4, M=6, seed=None):
    dag = build_dag(build_schedule(name, P, M))
    d = Profile.uniform(1.0, 1.5, 0.75).durations(dag)[0]
    if seed is not None:
        d = d * np.random.default_rng(seed).uniform(0.5, 2.0, dag.num_actions)
    return simulate(dag, d)


def _ratios(dag, seed=0):
    r = np.random.default_rng(seed).uniform(0, 1, dag.num_actions)
    return np.where(dag.kind_mask("B", "W"), r, 0.0)


@pytest.mark.parametrize(
    "name,P,M,unit_ms", [("1f1b", 4, 6, 1.0), ("gpipe", 3, 5, 0.25), ("1f1b", 1, 2, 2.0)]
)
def test_chrome_trace_structure(name, P, M, unit_ms):
    sim = _sim(name, P, M, seed=P + M)
    dag, sched = sim.dag, sim.dag.schedule
    trace = json.loads(json.dumps(chrome_trace(sim, unit_ms=unit_ms), allow_nan=False))
    events = trace["traceEvents"]
    x = [e for e in events if e["ph"] == "X"]
    assert len(x) == dag.num_actions
    assert sorted(e["name"] for e in x) == sorted(str(a) for a in sched.actions())

    rank_of = {str(a): r for r, order in enumerate(sched.orders) for a in order}
    index = {str(a): v for v, a in enumerate(dag.actions)}
    for e in x:
        v = index[e["name"]]
        assert e["tid"] == rank_of[e["name"]] and e["pid"] == 0
        assert e["ts"] == pytest.approx(sim.start[v] * unit_ms * 1000, rel=1e-12, abs=1e-9)
        assert e["ts"] + e["dur"] == pytest.approx(sim.end[v] * unit_ms * 1000, rel=1e-12)
        assert e["cat"] == e["args"]["kind"] == e["name"][len(str(e["args"]["stage"]))]
        assert "freeze_ratio" not in e["args"]

    # one track per rank whose events never overlap; its name carries the idle share of the step
    span_us = sim.makespan * unit_ms * 1000
    names = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert sorted(names) == list(range(P))
    for r in range(P):
        mine = sorted((e["ts"], e["dur"]) for e in x if e["tid"] == r)
        assert all(t0 + d0 <= t1 + 1e-6 for (t0, d0), (t1, _) in zip(mine, mine[1:]))
        idle = 1 - sum(d for _, d in mine) / span_us
        assert names[r] == f"rank {r} (bubble {100 * idle:.1f}%)"
    sort_index = {e["tid"]: e["args"]["sort_index"] for e in events if e["name"] == "thread_sort_index"}
    assert sort_index == {r: r for r in range(P)}
    proc = [e for e in events if e["name"] == "process_name"]
    assert len(proc) == 1 and name in proc[0]["args"]["name"]
    other = trace["otherData"]
    assert other["makespan_ms"] == pytest.approx(sim.makespan * unit_ms)
    assert other["ranks"] == P and other["microbatches"] == M and other["num_actions"] == dag.num_actions
    assert trace["displayTimeUnit"] == "ms"


def test_chrome_trace_freeze_ratios():
    sim = _sim("gpipe", 3, 4)
    r = _ratios(sim.dag)
    x = [e for e in chrome_trace(sim, r)["traceEvents"] if e["ph"] == "X"]
    for e in x:
        v = sim.dag.index[e["name"]]
        if e["cat"] in "BW":
            assert e["args"]["freeze_ratio"] == r[v]
        else:
            assert "freeze_ratio" not in e["args"]


@pytest.mark.parametrize("suffix", [".json", ".json.gz"])
def test_write_chrome_trace(tmp_path, suffix):
    sim = _sim()
    path = tmp_path / f"trace{suffix}"
    write_chrome_trace(path, sim, unit_ms=0.5)
    raw = gzip.decompress(path.read_bytes()) if suffix.endswith(".gz") else path.read_bytes()
    assert json.loads(raw) == json.loads(json.dumps(chrome_trace(sim, unit_ms=0.5)))


def test_bad_ratios_and_unit():
    sim = _sim("gpipe", 2, 2)
    dag = sim.dag
    with pytest.raises(ValueError, match="shape"):
        chrome_trace(sim, np.zeros(3))
    r = np.zeros(dag.num_actions)
    b = int(np.flatnonzero(dag.kind_mask("B"))[0])
    for bad in (1.5, -0.1, np.nan):
        r[b] = bad
        with pytest.raises(ValueError, match=str(dag.actions[b])):
            chrome_trace(sim, r)
    r[:] = 0
    f = int(np.flatnonzero(dag.kind_mask("F"))[0])
    r[f] = 0.5
    with pytest.raises(ValueError, match=f"{dag.actions[f]} must be 0"):
        write_gantt_png("unused.png", sim, r)
    for unit in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="unit_ms"):
            chrome_trace(sim, unit_ms=unit)


@pytest.mark.parametrize("name,P,M", [("1f1b", 4, 6), ("gpipe", 3, 5), ("1f1b", 2, 9)])
def test_idle_intervals_cover_the_bubbles(name, P, M):
    sim = _sim(name, P, M, seed=7)
    g_rank, lo, hi = _idle_intervals(sim)
    assert np.all(hi > lo) and np.all(lo >= 0) and np.all(hi <= sim.makespan)
    idle = np.bincount(g_rank, weights=hi - lo, minlength=P)
    np.testing.assert_allclose(idle, sim.makespan * sim.bubble_ratio, rtol=1e-9, atol=1e-9)
    # no gap overlaps an action of its rank
    for r, a, b in zip(g_rank, lo, hi):
        mine = sim.dag.rank == r
        overlap = np.minimum(sim.end[mine], b) - np.maximum(sim.start[mine], a)
        assert np.all(overlap <= 1e-9)


def _pixels(path):
    import matplotlib.image

    img = matplotlib.image.imread(path)
    return img, {tuple(p) for p in np.round(img[..., :3].reshape(-1, 3) * 255).astype(int).tolist()}


def _rgb(color):
    from matplotlib.colors import to_rgb

    return tuple(int(round(c * 255)) for c in to_rgb(color))


def test_png_size_colors_and_bubbles(tmp_path):
    sim = _sim("gpipe", 4, 6)
    path = tmp_path / "g.png"
    write_gantt_png(path, sim, size=(8.0, 3.0), dpi=50)
    assert path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img, colors = _pixels(path)
    assert img.shape == (150, 400, 4)
    assert _rgb("#4C72B0") in colors  # forward blocks
    assert _rgb("#DD8452") in colors  # backward blocks
    assert _rgb("#f2f2f2") in colors  # idle gaps (gpipe has large bubbles)


def test_png_default_size(tmp_path):
    sim = _sim("1f1b", 4, 4)
    path = tmp_path / "g.png"
    write_gantt_png(path, sim, title="custom title")
    w, h = default_png_size(4)
    assert (w, h) == (12.0, pytest.approx(3.1))
    img, _ = _pixels(path)
    assert img.shape[:2] == (round(h * 100), round(w * 100))
    assert default_png_size(64) == (12.0, 16.0) and default_png_size(1) == (12.0, 3.0)


def test_png_shades_backward_by_freeze_ratio(tmp_path):
    from matplotlib import colormaps

    sim = _sim("gpipe", 3, 4)
    B = sim.dag.kind_mask("B")
    r = np.where(B, 0.0, 0.0)
    r[np.flatnonzero(B)[::2]] = 1.0  # half the backwards fully frozen, half unfrozen
    path = tmp_path / "shaded.png"
    write_gantt_png(path, sim, r, size=(10.0, 3.0), dpi=60)
    _, colors = _pixels(path)
    assert _rgb("#4C72B0") in colors  # forwards keep their colour
    assert _rgb("#DD8452") not in colors  # backwards are coloured by ratio instead
    assert _rgb(colormaps["YlOrRd"](1.0)) in colors  # ratio 0: dark red
    assert _rgb(colormaps["YlOrRd"](0.2)) in colors  # ratio 1: pale


def test_png_many_ranks_and_actions(tmp_path):
    sim = _sim("gpipe", 64, 16, seed=3)
    path = tmp_path / "big.png"
    write_gantt_png(path, sim, _ratios(sim.dag))
    img, colors = _pixels(path)
    assert img.shape[:2] == (1600, 1200)
    assert _rgb("#4C72B0") in colors and _rgb("#f2f2f2") in colors


def test_chrome_trace_refuses_times_that_overflow_in_microseconds():
    dag = build_dag(build_schedule("1f1b", 2, 2))
    sim = simulate(dag, np.full(dag.num_actions, 1e306))
    with pytest.raises(ValueError, match="too long for a Chrome trace"):
        chrome_trace(sim)
    assert chrome_trace(sim, unit_ms=1e-6)["otherData"]["makespan_ms"] == pytest.approx(6e300)


@pytest.mark.skipif(not __import__("os").path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("write", [write_chrome_trace, write_gantt_png])
def test_write_errors_name_the_path(write):
    with pytest.raises(OSError) as err:
        write("/dev/full", _sim("1f1b", 2, 2))
    assert err.value.filename == "/dev/full" and "/dev/full" in str(err.value)


@pytest.mark.parametrize("exponent", [-1064, -40, 30, 1000])
def test_png_draws_tiny_and_huge_times(tmp_path, exponent):
    """Times of 1e-319 ms (which matplotlib's axes collapse to nothing) or 1e301 ms draw the same
    blocks as at 1 ms: the same share of forward and backward pixels."""
    sim = _sim("gpipe", 3, 4)
    scaled = type(sim)(sim.dag, *(np.ldexp(a, exponent) for a in (sim.durations, sim.start, sim.end)))
    shares = []
    for i, s in enumerate((sim, scaled)):
        path = tmp_path / f"{i}.png"
        write_gantt_png(path, s, size=(8.0, 3.0), dpi=50, title="same title")
        img, _ = _pixels(path)
        rgb = np.round(img[..., :3] * 255).astype(int)
        shares.append([np.mean(np.all(rgb == _rgb(c), axis=-1)) for c in ("#4C72B0", "#DD8452")])
    assert min(shares[0]) > 0.02
    np.testing.assert_allclose(shares[1], shares[0], rtol=0.1)


def test_trace_ending_in_gz_of_any_case_is_compressed(tmp_path):
    """``--trace out.json.GZ`` passes the CLI's ending check (any case), so it is gzip too."""
    sim = _sim()
    for name in ("t.json.GZ", "t.JSON.Gz"):
        write_chrome_trace(tmp_path / name, sim)
        raw = (tmp_path / name).read_bytes()
        assert raw[:2] == b"\x1f\x8b", name  # gzip's magic number
        assert json.loads(gzip.decompress(raw)) == json.loads(json.dumps(chrome_trace(sim)))


@pytest.mark.parametrize(
    "write,name",
    [(write_chrome_trace, "t.json"), (write_chrome_trace, "t.json.gz"), (write_gantt_png, "g.png")],
)
def test_a_failed_write_keeps_the_old_file_and_names_the_path(tmp_path, write, name):
    """A write that fails part-way (a full disk, ``ulimit -f``) leaves the file as it was, and no
    temporary file beside it."""
    from _cli import file_size_limit

    path = tmp_path / name
    path.write_bytes(b"old")
    sim = _sim("1f1b", 8, 64)
    with file_size_limit(1024), pytest.raises(OSError) as err:
        write(path, sim)
    assert err.value.filename == str(path) and "File too large" in str(err.value)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_ratios_must_be_real_numbers():
    sim = _sim("gpipe", 1, 1)  # 0F0 0B0
    for ratios, message in (
        (["0", "0.5"], "freeze ratio of 0F0 must be a real number, got '0'"),
        ([False, True], "freeze ratio of 0F0 must be a real number, got False"),
        ([0, 10**400], "freeze ratio of 0B0 must be a number float64 can hold"),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            chrome_trace(sim, ratios)


def test_png_title_and_unit_with_dollar_signs():
    """User text is drawn as it is, not parsed as mathtext (an odd number of '$' would raise)."""
    sim = _sim("gpipe", 2, 2)
    for title, unit in ((None, "$x_$"), ("loss $x_$", "ms"), ("a $\\frac{1}{$ b", "$")):
        assert gantt_png(sim, title=title, unit=unit)[:8] == b"\x89PNG\r\n\x1a\n"
