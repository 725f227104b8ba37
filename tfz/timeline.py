"""Timelines of a simulated step: Chrome trace JSON and a PNG Gantt chart (``tfz.timeline``).

- :func:`chrome_trace` / :func:`write_chrome_trace`: one complete ("X") event per action, one
  track per rank, in the Trace Event Format that Perfetto (https://ui.perfetto.dev) and
  ``chrome://tracing`` open.
- :func:`gantt_png` / :func:`write_gantt_png`: ranks top to bottom, time left to right, one block
  per action, idle gaps (bubbles) hatched grey, the bubble share of every rank in its label. Given
  freeze ratios, B and W blocks are coloured by ratio (dark red = unfrozen, pale = fully frozen; W
  hatched) with a colorbar. matplotlib is imported only inside :func:`gantt_png` and draws on an Agg canvas
  (no pyplot, no global backend change).

Files are written whole or not at all (:func:`tfz._io.write_files`); ``chrome_trace_bytes`` and
``gantt_png`` give the bytes, for writing several files together.

``sim`` is a :class:`tfz.dag.Simulation`; ``ratios`` is an optional float array [n] aligned with
``sim.dag.actions``: the freeze ratio in [0, 1] of each B/W action, 0 for F and I.
"""

from __future__ import annotations

import gzip
import io
import json
import os

import numpy as np

from tfz._io import has_suffix, write_files
from tfz._validate import check_number, float_array
from tfz.schedule import FREEZABLE_KINDS, KINDS

__all__ = ["chrome_trace", "chrome_trace_bytes", "gantt_png", "write_chrome_trace", "write_gantt_png"]

KIND_COLORS = {"F": "#4C72B0", "B": "#DD8452", "I": "#55A868", "W": "#8172B3"}
_KIND_NAMES = {"F": "forward", "B": "backward", "I": "backward (input)", "W": "backward (weight)"}
_IDLE_COLOR = "#f2f2f2"
_IDLE_HATCH_COLOR = "#b0b0b0"


def _check_ratios(dag, ratios) -> np.ndarray | None:
    """float64 [n] or None; ValueError naming the first bad action."""
    if ratios is None:
        return None
    r = float_array(ratios, "freeze ratio", lambda i: str(dag.actions[i]))
    if r.shape != (dag.num_actions,):
        raise ValueError(f"ratios must have shape ({dag.num_actions},), got {r.shape}")
    bad = np.flatnonzero(~np.isfinite(r) | (r < 0) | (r > 1))
    if len(bad):
        i = bad[0]
        raise ValueError(f"freeze ratio of {dag.actions[i]} must be in [0, 1], got {r[i]}")
    fixed = np.flatnonzero(~dag.kind_mask(*FREEZABLE_KINDS) & (r != 0))
    if len(fixed):
        i = fixed[0]
        raise ValueError(f"freeze ratio of {dag.actions[i]} must be 0 (only B and W can freeze), got {r[i]}")
    return r


def chrome_trace(sim, ratios=None, *, unit_ms: float = 1.0) -> dict:
    """The simulation as a Trace Event Format object.

    One "X" event per action (``ts``/``dur`` in microseconds = simulation time x ``unit_ms`` x 1000)
    on ``pid`` 0, ``tid`` = rank; metadata names the process after the schedule and each thread
    ``rank r (bubble x%)``. Event ``args`` hold stage, microbatch, kind and, with ``ratios``, the
    freeze ratio of B/W actions. ``otherData`` holds the makespan (ms) and per-rank bubble ratios.
    """
    unit_ms = check_number("unit_ms", unit_ms, low=0, low_open=True)
    dag = sim.dag
    r = _check_ratios(dag, ratios)
    sched = dag.schedule
    scale = 1000.0 * unit_ms
    if not np.isfinite(sim.makespan * scale):
        raise ValueError(
            f"makespan {sim.makespan:.6g} x {unit_ms:g} ms is too long for a Chrome trace: its times in "
            "microseconds overflow float64"
        )
    ts = (sim.start * scale).tolist()
    dur = (sim.end * scale - sim.start * scale).tolist()
    rank, stage, kind, mb = (a.tolist() for a in (dag.rank, dag.stage, dag.kind, dag.microbatch))
    freezable = dag.kind_mask(*FREEZABLE_KINDS).tolist()
    bubble = sim.bubble_ratio.tolist()

    events: list[dict] = [
        {
            "name": "process_name",
            "ph": "M",
            "pid": 0,
            "args": {"name": f"{sched.name} ({dag.num_ranks} ranks, {sched.num_microbatches} microbatches)"},
        }
    ]
    for p in range(dag.num_ranks):
        events.append(
            {
                "name": "thread_name",
                "ph": "M",
                "pid": 0,
                "tid": p,
                "args": {"name": f"rank {p} (bubble {100 * bubble[p]:.1f}%)"},
            }
        )
        events.append({"name": "thread_sort_index", "ph": "M", "pid": 0, "tid": p, "args": {"sort_index": p}})
    ratio_list = r.tolist() if r is not None else None
    for v, name in enumerate(dag.names):
        args = {"stage": stage[v], "microbatch": mb[v], "kind": KINDS[kind[v]]}
        if ratio_list is not None and freezable[v]:
            args["freeze_ratio"] = ratio_list[v]
        events.append(
            {
                "name": name,
                "cat": KINDS[kind[v]],
                "ph": "X",
                "pid": 0,
                "tid": rank[v],
                "ts": ts[v],
                "dur": dur[v],
                "args": args,
            }
        )
    return {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {
            "generator": "tfz",
            "schedule": sched.name,
            "ranks": dag.num_ranks,
            "stages": dag.num_stages,
            "microbatches": sched.num_microbatches,
            "num_actions": dag.num_actions,
            "makespan_ms": sim.makespan * unit_ms,
            "bubble_ratio": bubble,
        },
    }


def chrome_trace_bytes(path: str | os.PathLike, sim, ratios=None, **kw) -> bytes:
    """What :func:`write_chrome_trace` writes to ``path``: :func:`chrome_trace` as JSON, gzip-compressed
    if ``path`` ends in ``.gz`` (any case, as the CLI's ending check)."""
    text = json.dumps(chrome_trace(sim, ratios, **kw), separators=(",", ":"), allow_nan=False)
    data = text.encode("utf-8")
    return gzip.compress(data) if has_suffix(path, ".gz") else data


def write_chrome_trace(path: str | os.PathLike, sim, ratios=None, **kw) -> None:
    """Write :func:`chrome_trace` as JSON to ``path`` (gzip-compressed if it ends in ``.gz``), whole or
    not at all (:func:`tfz._io.write_files`). An OSError names ``path``."""
    write_files({path: chrome_trace_bytes(path, sim, ratios, **kw)})


def default_png_size(num_ranks: int) -> tuple[float, float]:
    """Figure size in inches of :func:`gantt_png`: 12 wide, ``1.5 + 0.4 * ranks`` tall,
    clipped to [3, 16]."""
    return 12.0, float(np.clip(1.5 + 0.4 * num_ranks, 3.0, 16.0))


def _idle_intervals(sim) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rank, start, end) of every idle gap of every rank within [0, makespan]."""
    dag = sim.dag
    order = np.lexsort((sim.start, dag.rank))
    rank, start, end = dag.rank[order], sim.start[order], sim.end[order]
    P, span = dag.num_ranks, sim.makespan
    first = np.ones(len(rank), dtype=bool)
    first[1:] = rank[1:] != rank[:-1]
    last = np.ones(len(rank), dtype=bool)
    last[:-1] = first[1:]
    gap_rank = [rank[~first], rank[first], rank[last]]
    gap_lo = [end[:-1][~first[1:]], np.zeros(first.sum()), end[last]]
    gap_hi = [start[~first], start[first], np.full(last.sum(), span)]
    idle_ranks = np.setdiff1d(np.arange(P), rank)  # ranks without actions idle all step
    gap_rank.append(idle_ranks)
    gap_lo.append(np.zeros(len(idle_ranks)))
    gap_hi.append(np.full(len(idle_ranks), span))
    g_rank, g_lo, g_hi = (np.concatenate(x) for x in (gap_rank, gap_lo, gap_hi))
    keep = g_hi - g_lo > 1e-9 * max(span, 1e-300)
    return g_rank[keep], g_lo[keep], g_hi[keep]


def _readable_scale(sim, unit: str):
    """(sim, axis unit): times outside [1e-3, 1e6] are drawn in a power-of-ten multiple of ``unit``
    (``"1e-318 ms"``), which matplotlib's axes can place (they collapse spans of 1e-319 to nothing)."""
    span = sim.makespan
    if span <= 0 or 1e-3 <= span < 1e6:
        return sim, unit
    exp = int(np.floor(np.log10(span)))
    step = 10.0**exp
    return type(sim)(sim.dag, sim.durations / step, sim.start / step, sim.end / step), f"1e{exp} {unit}"


def _boxes(rank: np.ndarray, lo: np.ndarray, hi: np.ndarray, height: float) -> np.ndarray:
    """Vertices [k, 4, 2] of rectangles [lo, hi] x [rank - height/2, rank + height/2]."""
    y0, y1 = rank - height / 2, rank + height / 2
    return np.stack(
        [np.stack([lo, y0], -1), np.stack([lo, y1], -1), np.stack([hi, y1], -1), np.stack([hi, y0], -1)], 1
    )


def _ratio_cmap():
    """Ratio 0 -> dark red (full work), 1 -> pale yellow (all weights frozen), never white."""
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap

    return ListedColormap(colormaps["YlOrRd"](np.linspace(1.0, 0.2, 256)), name="tfz_freeze_ratio")


def write_gantt_png(path: str | os.PathLike, sim, ratios=None, **kw) -> None:
    """:func:`gantt_png` written to ``path`` whole or not at all (:func:`tfz._io.write_files`); an
    OSError names ``path``."""
    write_files({path: gantt_png(sim, ratios, **kw)})


def gantt_png(
    sim,
    ratios=None,
    *,
    title: str | None = None,
    unit: str = "ms",
    size: tuple[float, float] | None = None,
    dpi: int = 100,
) -> bytes:
    """The simulation drawn as a Gantt chart, as PNG bytes.

    ``size`` is (width, height) in inches (default :func:`default_png_size`); the image is
    ``size * dpi`` pixels. Blocks are drawn as one PolyCollection per kind, so a few hundred
    thousand actions stay cheap; microbatch numbers are written into blocks only for small DAGs.
    Times outside [1e-3, 1e6] ``unit`` are drawn in a power-of-ten multiple of it.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.collections import PolyCollection
    from matplotlib.colors import Normalize, to_rgba
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    dag = sim.dag
    r = _check_ratios(dag, ratios)
    makespan = sim.makespan
    sim, axis_unit = _readable_scale(sim, unit)
    P, n, span = dag.num_ranks, dag.num_actions, sim.makespan
    width, height = default_png_size(P) if size is None else size
    fig = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()

    rank = dag.rank.astype(np.float64)
    thin = n <= 2000  # separate neighbouring blocks by a thin white edge while they are wide enough
    edge = {"edgecolors": "white", "linewidths": 0.4} if thin else {"edgecolors": "none", "linewidths": 0}

    g_rank, g_lo, g_hi = _idle_intervals(sim)
    if len(g_rank):
        idle = PolyCollection(
            _boxes(g_rank.astype(np.float64), g_lo, g_hi, 0.8),
            facecolors=_IDLE_COLOR,
            edgecolors=_IDLE_HATCH_COLOR,
            linewidths=0,
            hatch="////",
        )
        ax.add_collection(idle)

    cmap = _ratio_cmap() if r is not None else None
    colors = np.array([to_rgba(KIND_COLORS[k]) for k in KINDS])[dag.kind]
    if cmap is not None:
        shaded = dag.kind_mask(*FREEZABLE_KINDS)
        colors[shaded] = cmap(r[shaded])
    handles = []
    for k, name in enumerate(KINDS):
        sel = np.flatnonzero(dag.kind == k)
        if not len(sel):
            continue
        verts = _boxes(rank[sel], sim.start[sel], sim.end[sel], 0.8)
        by_ratio = cmap is not None and name in FREEZABLE_KINDS
        hatch = "xx" if by_ratio and name == "W" else None
        ax.add_collection(PolyCollection(verts, facecolors=colors[sel], hatch=hatch, **edge))
        label = f"{name}: {_KIND_NAMES[name]}" + (" (colour: freeze ratio)" if by_ratio else "")
        handles.append(
            Patch(facecolor=cmap(0.0) if by_ratio else KIND_COLORS[name], hatch=hatch, label=label)
        )
    handles.append(
        Patch(facecolor=_IDLE_COLOR, edgecolor=_IDLE_HATCH_COLOR, hatch="////", label="idle (bubble)")
    )

    if n <= 300 and span > 0:
        # microbatch numbers in blocks wide enough to hold them, dark text on light colours
        luminance = colors[:, :3] @ np.array([0.299, 0.587, 0.114])
        fs = 7 if P <= 16 else 5
        for v in np.flatnonzero(sim.end - sim.start > 0.02 * span).tolist():
            ax.text(
                (sim.start[v] + sim.end[v]) / 2,
                rank[v],
                str(int(dag.microbatch[v])),
                ha="center",
                va="center",
                fontsize=fs,
                color="black" if luminance[v] > 0.6 else "white",
            )

    bubble = sim.bubble_ratio
    ax.set_xlim(0, span if span > 0 else 1.0)
    ax.set_ylim(P - 0.5, -0.5)  # rank 0 on top
    ax.set_yticks(np.arange(P))
    if P <= 16:
        labels = [f"rank {p}\n{100 * bubble[p]:.1f}% idle" for p in range(P)]
    else:
        labels = [f"r{p}  {100 * bubble[p]:.1f}%" for p in range(P)]
    points_per_rank = max(height - 1.2, 0.5) * 72 / P
    ax.set_yticklabels(labels, fontsize=float(np.clip(0.45 * points_per_rank, 4.0, 9.0)))
    ax.set_xlabel(f"time ({axis_unit})", parse_math=False)  # user text: a "$" is no mathtext
    ax.grid(axis="x", color="#dddddd", linewidth=0.5)
    ax.set_axisbelow(True)
    if title is None:
        sched = dag.schedule
        title = (
            f"{sched.name}: {P} ranks, {dag.num_stages} stages, {sched.num_microbatches} microbatches, "
            f"{n} actions | makespan {makespan:.4g} {unit}, mean bubble {100 * float(bubble.mean()):.1f}%"
        )
    ax.set_title(title, fontsize=10, parse_math=False)
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False)
    if cmap is not None:
        sm = ScalarMappable(norm=Normalize(0.0, 1.0), cmap=cmap)
        fig.colorbar(sm, ax=ax, label="freeze ratio (B/W)", fraction=0.03, pad=0.01)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=dpi)
    return png.getvalue()
