"""Timing estimates of the controller: windows of per-step action times, medians, bounds, drift.

Arrays named ``upper`` / ``lower`` are float64 [n] aligned with ``dag.actions`` (milliseconds):
the unfrozen and the fully frozen duration of every action. Window rows hold only this process's
actions (``local`` index array into ``dag.actions``).

Bounds model. A B or W action's time is linear in the active fraction x of its W FLOPs (the
realised, FLOP-weighted fraction of its stage's units left trainable by the masks it ran with):
``t = a + b x``, so the frozen bound is ``l = a`` and the unfrozen bound ``u = a + b``.
:func:`fit_linear` fits a and b per action from monitoring samples at a few levels of x (the
unfrozen window at x = 1 and the partly frozen window's levels).

Gap model. The DAG has no time between actions (communication, the runtime's own work), so its
makespan falls short of the measured batch. :func:`fit_gap` fits one overhead ``g`` added to every
action's duration so that the simulated unfrozen batch equals the measured one; the plan and its
predictions use ``u + g`` and ``l + g``. The stable phase's drift check compares the action times
alone, and the measured batch with the simulated one plus g (``tfz.controller.timely``).

Drift model. In the stable phase action v runs with ratio r_v and is predicted to take
``p_v = u_v (1 - r_v) + l_v r_v``. A stage drifts when its summed measured time is off the summed
prediction by more than the threshold in most steps of a full window (:func:`drifting_stages`).
Per (stage, kind) the window medians m_v are then fitted by
``m_v ~ alpha * u_v (1 - r_v) + beta * l_v r_v`` (least squares over the stage's microbatches). A
plan gives most microbatches the same ratio, so the two scales are not told apart by the data: with
every ratio equal, only the actions' differing estimates u_v / l_v separate the two features, and
two scales would fit the noise of those estimates (alpha of 0.6-3.2 for a true 1.2 at 3% noise,
ratios 0.8 and one 0.79; alpha / beta up to 200 at 20% noise in the estimates, all ratios 0.8, and
each refit compounding the last). So a single scale ``alpha = beta = sum m / sum p`` is used unless
the ratios themselves vary (standard deviation at least 0.1 over the group's actions), the features
are far from collinear (1 - corr^2 >= 0.05), and two scales fit the medians significantly better
than one (an F statistic above 10 on the residuals, about p = 0.02 at 8 microbatches). New estimates are
``u' = alpha u`` and ``l' = min(beta l, u')``. The fit needs only sums over actions
(:func:`drift_stats`), so ranks add their local sums and every rank derives the same new estimates.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

import numpy as np

from tfz._validate import check_number
from tfz.dag import DAG, simulate
from tfz.schedule import FREEZABLE_KINDS, KINDS

__all__ = [
    "MAX_TIMING_MS",
    "TimingWindow",
    "assess_drift",
    "bound_estimates",
    "drift_stats",
    "drifting_stages",
    "FitWindow",
    "fit_gap",
    "fit_linear",
    "parse_timings",
    "refit",
    "stage_sums",
]

_NSTATS = 11  # S11, S12, S22, S1m, S2m, sum m, sum p, sum m^2, count, sum r, sum r^2
_RATIO_SPREAD = 0.1  # standard deviation of the ratios below this: one common scale
_COLLINEAR = 0.05  # 1 - corr^2 below this: one common scale
_SEPARATE_F = 10.0  # F statistic of two scales against one above this: two scales


class TimingWindow:
    """The last ``size`` rows of per-step action times, float64 [rows, width]."""

    def __init__(self, size: int, width: int):
        if size < 1:
            raise ValueError(f"window size must be >= 1, got {size}")
        self.size = size
        self.width = width
        self._rows: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def full(self) -> bool:
        return len(self._rows) >= self.size

    def append(self, values: np.ndarray) -> None:
        """Add one step (float64 [width]); the oldest row drops out when full."""
        if values.shape != (self.width,):
            raise ValueError(f"window row must have shape ({self.width},), got {values.shape}")
        self._rows.append(np.array(values, dtype=np.float64))
        if len(self._rows) > self.size:
            del self._rows[0]

    def clear(self) -> None:
        self._rows.clear()

    def rows(self) -> np.ndarray:
        """float64 [rows, width], oldest first."""
        return np.stack(self._rows) if self._rows else np.zeros((0, self.width))

    def median(self) -> np.ndarray:
        """float64 [width]: per-column median of the rows; raises when empty."""
        if not self._rows:
            raise ValueError("median of an empty timing window")
        return np.median(np.stack(self._rows), axis=0)

    def to_list(self) -> list[list[float]]:
        return [row.tolist() for row in self._rows]

    def load_list(self, rows: list) -> None:
        self._rows = []
        for row in rows:
            self.append(np.asarray(row, dtype=np.float64))


class FitWindow:
    """The last ``size`` steps of the partly frozen monitoring window: per action its time, the active
    fraction of the masks it ran with, and the ratio those masks were asked for (its level)."""

    CHANNELS = ("times", "active", "level")

    def __init__(self, size: int, width: int):
        self.size, self.width = size, width
        self.channels = {c: TimingWindow(size, width) for c in self.CHANNELS}

    def __len__(self) -> int:
        return len(self.channels["times"])

    def append(self, times: np.ndarray, active: np.ndarray, level: np.ndarray) -> None:
        for name, values in zip(self.CHANNELS, (times, active, level)):
            self.channels[name].append(values)

    def clear(self) -> None:
        for w in self.channels.values():
            w.clear()

    def rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(times, active, level), each float64 [rows, width]."""
        return tuple(self.channels[c].rows() for c in self.CHANNELS)

    def to_dict(self) -> dict[str, list[list[float]]]:
        return {c: w.to_list() for c, w in self.channels.items()}

    def load_dict(self, rows: dict) -> None:
        for c in self.CHANNELS:
            self.channels[c].load_list(rows[c])


MAX_TIMING_MS = 1e9
"""Longest action or batch time taken (about 11.6 days): times are exchanged between ranks in float32,
and windows sum them, so absurd values are refused where they enter, not as an overflow later."""


def parse_timings(timings: Mapping, local_pos: Mapping[str, int], dag: DAG, where: str) -> np.ndarray:
    """float64 [len(local_pos)]: ``timings`` (action name -> ms) in local order.

    ``where`` names this process in errors (``"rank 1"``). Raises ValueError for a name that is not
    in the schedule or belongs to another rank, a missing action, or a value that is not a finite
    number in [0, MAX_TIMING_MS]; TypeError when ``timings`` is not a mapping.
    """
    if not isinstance(timings, Mapping):
        raise TypeError(f"timings must be a mapping of action name to ms, got {type(timings).__name__}")
    out = np.full(len(local_pos), np.nan)
    for key, value in timings.items():
        name = str(key)
        j = local_pos.get(name)
        if j is None:
            if name in dag.index:
                owner = int(dag.rank[dag.index[name]])
                raise ValueError(f"timing for action {name!r}, which runs on rank {owner}, not on {where}")
            raise ValueError(f"timing for unknown action {name!r} (not in schedule {dag.schedule.name!r})")
        out[j] = check_number(f"timing of action {name!r}", value, low=0, high=MAX_TIMING_MS, unit="ms")
    missing = np.flatnonzero(np.isnan(out))
    if len(missing):
        names = sorted(local_pos, key=local_pos.get)
        shown = [names[j] for j in missing[:5]]
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(f"no timing for {len(missing)} action(s) of {where}: {shown}{more}")
    return out


def bound_estimates(dag: DAG, upper: np.ndarray, lower: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Consistent (upper, lower): lower clamped to [0, upper]; actions that cannot freeze (F, I) get
    ``lower = upper`` (their upper-window median)."""
    up = np.maximum(np.asarray(upper, dtype=np.float64), 0.0)
    low = np.clip(np.asarray(lower, dtype=np.float64), 0.0, up)
    fixed = ~dag.kind_mask(*FREEZABLE_KINDS)
    low = np.where(fixed, up, low)
    return up, low


def fit_linear(active: np.ndarray, times: np.ndarray, level: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column: the line ``t = a + b x`` fitted to samples (x = active fraction, t = time).

    ``active``, ``times``, ``level``: float64 [rows, k]. The samples of a column with the same ``level``
    (the ratio the masks were asked for) form a group; its point is (median x, median t), so a slow
    step or two do not move it. ``a`` and ``b`` (float64 [k]) are the least-squares line through a
    column's points. A column whose points share one x (nothing was frozen, or every level realised
    the same fraction) gets ``b = 0`` and ``a`` = the mean of its points.
    """
    x = np.asarray(active, dtype=np.float64)
    t = np.asarray(times, dtype=np.float64)
    lv = np.asarray(level, dtype=np.float64)
    if not (x.shape == t.shape == lv.shape and x.ndim == 2 and x.shape[0] > 0):
        raise ValueError(
            f"fit_linear needs three non-empty [rows, k] arrays, got {x.shape}, {t.shape}, {lv.shape}"
        )
    points_x, points_t = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN: a column without this group
        for value in np.unique(lv):
            member = lv == value
            points_x.append(np.nanmedian(np.where(member, x, np.nan), axis=0))
            points_t.append(np.nanmedian(np.where(member, t, np.nan), axis=0))
    px, pt = np.stack(points_x), np.stack(points_t)  # [groups, k]; NaN where a column lacks the group
    have = ~np.isnan(px)
    n = have.sum(axis=0)
    mx = np.nansum(px, axis=0) / n
    mt = np.nansum(pt, axis=0) / n
    dx = np.where(have, px - mx, 0.0)
    sxx = (dx * dx).sum(axis=0)
    sxt = (dx * np.where(have, pt - mt, 0.0)).sum(axis=0)
    flat = sxx <= 1e-12
    b = np.where(flat, 0.0, sxt / np.where(flat, 1.0, sxx))
    return mt - b * mx, b


def fit_gap(dag: DAG, durations: np.ndarray, batch_ms: float) -> float:
    """The overhead g >= 0 (ms) that, added to every action of ``durations``, makes the simulated
    makespan equal ``batch_ms``; 0 when the actions alone already take that long.

    The makespan is the longest path, a maximum of lines ``length(p) + g * actions(p)``: convex and
    increasing in g. Newton steps along the critical path's line start at or past the root and move
    down to it, one line at a time, so they end after finitely many steps.
    """
    d = np.asarray(durations, dtype=np.float64)
    batch = check_number("batch_ms", batch_ms, low=0.0, unit="ms")
    run = simulate(dag, d)
    if run.makespan >= batch or dag.num_actions == 0:
        return 0.0
    g = 0.0
    for _ in range(4 * dag.num_actions + 8):
        step = (run.makespan - batch) / len(run.critical_path)
        if g > 0.0 and step <= 1e-12 * batch:
            break
        g = max(0.0, g - step)
        run = simulate(dag, d + g)
    return g


def drift_stats(
    dag: DAG,
    local: np.ndarray,
    measured: np.ndarray,
    upper: np.ndarray,
    lower: np.ndarray,
    ratios: np.ndarray,
) -> np.ndarray:
    """float64 [S, 4, 11]: per (stage, kind) sums over this process's actions for :func:`refit`.

    ``local``: int [k] action indices; ``measured``: float64 [k] window medians of those actions;
    ``upper``, ``lower``, ``ratios``: float64 [n]. The sums are additive over ranks.
    """
    S = dag.num_stages
    x1 = upper[local] * (1.0 - ratios[local])
    x2 = lower[local] * ratios[local]
    m = np.asarray(measured, dtype=np.float64)
    r = ratios[local]
    cols = np.stack(
        [x1 * x1, x1 * x2, x2 * x2, x1 * m, x2 * m, m, x1 + x2, m * m, np.ones_like(m), r, r * r], axis=1
    )
    key = dag.stage[local].astype(np.int64) * len(KINDS) + dag.kind[local].astype(np.int64)
    out = np.zeros((S * len(KINDS), _NSTATS))
    np.add.at(out, key, cols)
    return out.reshape(S, len(KINDS), _NSTATS)


def stage_sums(dag: DAG, local: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """float64 [w, S]: per window row, the summed time of this process's actions of each stage.

    ``rows``: float64 [w, k] window rows aligned with ``local`` (int [k]). Additive over ranks.
    """
    rows = np.asarray(rows, dtype=np.float64)
    S = dag.num_stages
    onehot = np.zeros((len(local), S))
    onehot[np.arange(len(local)), dag.stage[local]] = 1.0
    return rows @ onehot


def assess_drift(sums: np.ndarray, stats: np.ndarray) -> np.ndarray:
    """float64 [w, S]: relative deviation ``(measured - predicted) / predicted`` of every stage in every
    window row, from :func:`stage_sums` and the predictions in :func:`drift_stats` (0 where a stage
    has no predicted time)."""
    predicted = stats[:, :, 6].sum(axis=1)
    gap = np.asarray(sums, dtype=np.float64) - predicted
    return np.divide(gap, predicted, out=np.zeros(gap.shape), where=predicted > 0)


def drifting_stages(deviation: np.ndarray, threshold: float) -> np.ndarray:
    """bool [S]: stages whose deviation exceeds ``threshold`` on the same side in at least three
    quarters of the window's rows (every row of a window of up to 3): a drift that held for most of
    the window, so one slow step does not trigger it and one noisy step does not veto it."""
    dev = np.asarray(deviation, dtype=np.float64)
    need = math.ceil(0.75 * dev.shape[0])
    return ((dev > threshold).sum(axis=0) >= need) | ((dev < -threshold).sum(axis=0) >= need)


def _scales(row: np.ndarray) -> tuple[float, float]:
    s11, s12, s22, s1m, s2m, sm, sp, smm, n, sr, srr = row.tolist()
    common = sm / sp if sp > 0 else 1.0
    if n <= 2 or srr / n - (sr / n) ** 2 < _RATIO_SPREAD**2:
        return common, common
    if s11 <= 0 or s22 <= 0 or 1.0 - s12 * s12 / (s11 * s22) < _COLLINEAR:
        return common, common
    det = s11 * s22 - s12 * s12
    alpha = (s1m * s22 - s2m * s12) / det
    beta = (s2m * s11 - s1m * s12) / det
    if not (alpha > 0 and beta >= 0 and math.isfinite(alpha) and math.isfinite(beta)):
        return common, common
    spm, spp = s1m + s2m, s11 + 2.0 * s12 + s22
    one = max(smm - spm * spm / spp, 0.0)  # residuals of the best single scale
    two = max(smm - alpha * s1m - beta * s2m, 0.0)
    if one - two <= _SEPARATE_F * two / (n - 2):
        return common, common
    return alpha, beta


def refit(dag: DAG, stats: np.ndarray, upper: np.ndarray, lower: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """New (upper, lower) from the summed ``stats`` of :func:`drift_stats` (model in the module
    docstring). (stage, kind) groups without observations keep their estimates."""
    S = dag.num_stages
    alpha = np.ones((S, len(KINDS)))
    beta = np.ones((S, len(KINDS)))
    for s in range(S):
        for k in range(len(KINDS)):
            if stats[s, k, 6] > 0:
                alpha[s, k], beta[s, k] = _scales(stats[s, k])
    a = alpha[dag.stage, dag.kind]
    b = beta[dag.stage, dag.kind]
    up = upper * a
    return bound_estimates(dag, up, lower * b)
