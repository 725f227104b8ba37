"""The freeze-ratio LP of one DAG: validated data and its sparse formulations.

Per action v: unfrozen time ``U_v``, frozen time ``L_v`` and, for a freezable action (B or W with
``L_v < U_v``), a ratio ``r_v`` in ``[0, c_v]`` with duration ``U_v - r_v (U_v - L_v)``. Everything
else has a fixed duration. With ``t_v`` the start time of v and ``T`` the batch time:

    t_v >= t_u + d_u  for every edge u -> v,   T >= t_v + d_v,   t >= 0,
    sum_{v in stage s} a_v r_v <= cap * sum_{v in stage s} a_v      for every stage s

where the sums run over every B/W action of the stage and ``a_v`` is 1 (``weighting="count"``: each
microbatch's weight update counts the same, as the masks freeze a share of a stage's weight-gradient
FLOPs per microbatch) or ``U_v`` (``"duration"``). A B/W action that cannot gain from freezing
(``L_v >= U_v``) keeps ``r_v = 0`` and counts at 0 in its stage's mean, so the mean is the share of the
stage's weight-gradient work the masks will skip. Phase 1 minimises T, phase 2 minimises ``sum r``
subject to ``T <= T*``.

:func:`build_lp` writes the constraints as rows ``lo <= A x <= hi`` over columns ``x = [t, r, T]``,
either for every DAG edge and every action (``reduced=False``, the plain formulation) or for a
smaller, equivalent set (``reduced=True``): program order chains plus the cross-rank edges that no
other cross-rank edge between the same two ranks implies, and a T row for the last action of each
rank only. Both describe the same feasible (r, T) set because durations are >= 0, so t_v >= t_u + d_u
follows along any path from u to v.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

import numpy as np

from tfz._defaults import MAX_FREEZE_RATIO
from tfz._validate import check_ratio, float_array
from tfz.dag import DAG
from tfz.schedule import FREEZABLE_KINDS

if TYPE_CHECKING:  # scipy.sparse takes a quarter second to import; only the HiGHS paths need it
    import scipy.sparse as sp

__all__ = ["LP", "PlanConfig", "PlanProblem", "build_lp", "reduced_edges"]


@dataclass(frozen=True)
class PlanConfig:
    """Options of the freeze-ratio LP.

    The mean of a stage runs over all its B/W actions, those that cannot gain from freezing included
    (at ratio 0): it is the share of the stage's weight-gradient work the masks skip.
    """

    max_freeze_ratio: float = MAX_FREEZE_RATIO
    """Cap on each stage's mean ratio, in [0, 1] (default 0.8, the paper's experiments)."""
    action_cap: float | None = None
    """Optional cap on every single ratio, in [0, 1] (``solve`` also takes a per-action array)."""
    weighting: Literal["count", "duration"] = "count"
    """How the stage mean is taken. ``"count"`` (default): every microbatch's weight update counts the
    same, whatever its duration (the masks freeze a share of each microbatch's weight-gradient FLOPs,
    equal across microbatches of one size). ``"duration"``: each action weighs its unfrozen duration,
    so the cap bounds the share of the stage's backward time that is frozen; use it when microbatches
    differ in size (e.g. variable sequence lengths), where FLOPs follow time."""

    makespan_slack: float = 0.0
    """Second phase's makespan budget above the minimum, as a share of it, in [0, 1]: minimise the
    total ratio subject to makespan <= (1 + slack) T*. 0 (default): the paper's lexicographic optimum.
    Near T* the frontier is steep: on the demo's plan 2% slack frees 12-17% of the freezing, where
    lowering ``max_freeze_ratio`` to give up the same speed frees less. Solved with HiGHS when > 0."""

    def makespan_budget(self, t_star: float) -> float:
        """The second phase's bound on the makespan, given the minimum ``t_star``."""
        return t_star * (1.0 + self.makespan_slack)

    def __post_init__(self):
        # stored as plain floats, so that plans serialise; a float32 0.8 is 0.8, not 0.800000011920929
        for name in ("max_freeze_ratio", "action_cap", "makespan_slack"):
            value = getattr(self, name)
            ratio = check_ratio(name, value, optional=name == "action_cap")
            if isinstance(value, np.floating) and np.finfo(value.dtype).bits < 64:
                ratio = float(str(value))
            object.__setattr__(self, name, ratio)
        if self.weighting not in ("count", "duration"):
            raise ValueError(f"weighting must be 'count' or 'duration', got {self.weighting!r}")


def _as_times(dag: DAG, values, what: str) -> np.ndarray:
    arr = float_array(values, f"{what} duration", lambda i: str(dag.actions[i]))
    if arr.shape != (dag.num_actions,):
        raise ValueError(f"{what} durations must have shape ({dag.num_actions},), got {arr.shape}")
    bad = np.flatnonzero(~np.isfinite(arr) | (arr < 0))
    if len(bad):
        i = bad[0]
        raise ValueError(f"{what} duration of {dag.actions[i]} must be finite and >= 0, got {arr[i]}")
    return arr


@dataclass(frozen=True, eq=False)
class PlanProblem:
    """Validated LP data of one DAG (arrays aligned with ``dag.actions``)."""

    dag: DAG
    unfrozen: np.ndarray
    """float64 [n]: U."""
    frozen: np.ndarray
    """float64 [n]: L (== U where the duration is fixed)."""
    cap: np.ndarray
    """float64 [n]: upper bound of each ratio (0 where the duration is fixed)."""
    weight: np.ndarray
    """float64 [n]: a_v in the stage mean, for every B/W action (0 for the others)."""
    freezable: np.ndarray
    """bool [n]: actions whose duration depends on their ratio (B/W with L < U)."""
    max_freeze_ratio: float
    config: PlanConfig

    @classmethod
    def create(
        cls, dag: DAG, unfrozen, frozen, config: PlanConfig | None = None, action_cap=None
    ) -> PlanProblem:
        """Validate and derive the LP data; ValueError names the first bad action or value."""
        if not isinstance(dag, DAG):
            raise TypeError(f"dag must be a tfz.dag.DAG, got {type(dag).__name__}")
        if config is None:
            config = PlanConfig()
        if not isinstance(config, PlanConfig):
            raise TypeError(f"config must be a PlanConfig, got {type(config).__name__}")
        if dag.num_actions == 0:
            raise ValueError("empty DAG: nothing to plan")
        up = _as_times(dag, unfrozen, "unfrozen")
        low = _as_times(dag, frozen, "frozen")
        over = np.flatnonzero(low > up)
        if len(over):
            i = over[0]
            raise ValueError(
                f"frozen duration of {dag.actions[i]} ({low[i]}) exceeds its unfrozen duration ({up[i]})"
            )
        bw = dag.kind_mask(*FREEZABLE_KINDS)
        odd = np.flatnonzero(~bw & (low != up))
        if len(odd):
            i = odd[0]
            a = dag.actions[i]
            raise ValueError(
                f"frozen duration of {a} ({low[i]}) differs from its unfrozen duration ({up[i]}), "
                f"but {a.kind} actions have no parameters to freeze"
            )
        if action_cap is None:
            action_cap = config.action_cap
        if action_cap is None:
            caps = np.ones(dag.num_actions)
        elif np.ndim(action_cap) == 0:
            value = action_cap.item() if isinstance(action_cap, np.ndarray) else action_cap
            caps = np.full(dag.num_actions, check_ratio("action cap", value))
        else:
            caps = float_array(action_cap, "action cap", lambda i: str(dag.actions[i]))
            if caps.shape != (dag.num_actions,):
                raise ValueError(f"action caps must have shape ({dag.num_actions},), got {caps.shape}")
            bad = np.flatnonzero(~(caps >= 0) | ~(caps <= 1))
            if len(bad):
                i = bad[0]
                raise ValueError(f"action cap of {dag.actions[i]} must be in [0, 1], got {caps[i]}")
        freezable = (low < up) & bw
        caps = np.where(freezable, caps, 0.0)
        weight = np.where(bw, up if config.weighting == "duration" else 1.0, 0.0)
        return cls(dag, up, low, caps, weight, freezable, float(config.max_freeze_ratio), config)

    @property
    def num_actions(self) -> int:
        return self.dag.num_actions

    @property
    def delta(self) -> np.ndarray:
        """float64 [n]: U - L, the time a fully frozen action saves."""
        return self.unfrozen - self.frozen

    @property
    def cannot_gain(self) -> np.ndarray:
        """bool [n]: B/W actions whose frozen time is not below their unfrozen time (ratio 0)."""
        return self.dag.kind_mask(*FREEZABLE_KINDS) & ~self.freezable

    def scaled(self) -> tuple[PlanProblem, float]:
        """This problem with every duration divided by the largest one, and that factor.

        The solvers work on the scaled problem, so their tolerances mean the same at any time unit; its
        ratios are those of this problem and its makespans are ``1 / factor`` of this problem's.
        Raises ValueError naming a duration that is not 0 but would become one too small for float64
        (below ``2.2e-308`` of the largest).
        """
        i = int(np.argmax(self.unfrozen))
        factor = float(self.unfrozen[i])
        if factor == 0.0:
            return self, 1.0
        tiny = np.finfo(np.float64).tiny
        for what, values in (("unfrozen", self.unfrozen), ("frozen", self.frozen), ("saved", self.delta)):
            bad = np.flatnonzero((values > 0) & (values / factor < tiny))
            if what == "saved":
                bad = bad[self.freezable[bad]]
            if len(bad):
                j = bad[0]
                raise ValueError(
                    f"{what} duration of {self.dag.actions[j]} ({float(values[j])!r}) cannot be "
                    f"represented next to the largest duration ({factor!r}, {self.dag.actions[i]}): their "
                    "ratio is below float64's range"
                )
        weight = self.weight / factor if self.config.weighting == "duration" else self.weight
        problem = replace(self, unfrozen=self.unfrozen / factor, frozen=self.frozen / factor, weight=weight)
        return problem, factor

    def stage_budget(self) -> tuple[np.ndarray, np.ndarray]:
        """(weight sum, budget) per stage, float64 [S] each: ``sum_s a_v r_v <= budget_s``."""
        S = self.dag.num_stages
        total = np.bincount(self.dag.stage, weights=self.weight, minlength=S)
        return total, self.max_freeze_ratio * total

    def durations(self, ratios: np.ndarray) -> np.ndarray:
        """float64 [n]: durations under ``ratios``."""
        return self.unfrozen - np.asarray(ratios, dtype=np.float64) * self.delta

    def stage_mean(self, ratios: np.ndarray) -> np.ndarray:
        """float64 [S]: weighted mean ratio per stage over all its B/W actions (0 without any)."""
        S = self.dag.num_stages
        total = np.bincount(self.dag.stage, weights=self.weight, minlength=S)
        num = np.bincount(self.dag.stage, weights=self.weight * ratios, minlength=S)
        return np.divide(num, total, out=np.zeros(S), where=total > 0)


def reduced_edges(dag: DAG) -> tuple[np.ndarray, np.ndarray]:
    """Edges (src, dst) that imply all of ``dag``'s edges along paths.

    Kept: program order (consecutive actions of a rank) and cross-rank edges u -> v not dominated
    by another cross-rank edge u' -> v' between the same ranks with u' at or after u and v' at or
    before v in program order (then u -> u' -> v' -> v is a path). Same-rank edges other than
    program order are implied by the program order chain.
    """
    src, dst = dag.src, dag.dst
    rank = dag.rank.astype(np.int64)
    starts = np.searchsorted(rank, np.arange(dag.num_ranks))
    pos = np.arange(dag.num_actions) - starts[rank]
    same = rank[src] == rank[dst]
    prog = same & (dst == src + 1)
    cs, cd = src[~same], dst[~same]
    if len(cs):
        pair = rank[cs] * dag.num_ranks + rank[cd]
        pu, pv = pos[cs], pos[cd]
        order = np.lexsort((pv, -pu, pair))
        cs, cd, pair, pv = cs[order], cd[order], pair[order], pv[order]
        # running minimum of pos(v') over earlier edges of the same rank pair (reset per pair)
        big = int(pv.max()) + 1
        group = np.cumsum(np.r_[True, pair[1:] != pair[:-1]]) - 1
        key = pv - group * big
        prev_min = np.r_[np.iinfo(np.int64).max, np.minimum.accumulate(key)[:-1]]
        first = np.r_[True, pair[1:] != pair[:-1]]
        keep = first | (key < prev_min)
        cs, cd = cs[keep], cd[keep]
    return np.concatenate([src[prog], cs]), np.concatenate([dst[prog], cd])


@dataclass(frozen=True, eq=False)
class LP:
    """``min cost @ x  s.t.  row_lo <= A x <= row_hi, col_lo <= x <= col_hi``; x = [t (n), r (k), T]."""

    A: sp.csc_matrix
    row_lo: np.ndarray
    row_hi: np.ndarray
    col_lo: np.ndarray
    col_hi: np.ndarray
    ratio_actions: np.ndarray
    """int64 [k]: action index of each r column."""
    num_actions: int
    stage_rows: np.ndarray
    """int64: row index of each stage cap row."""
    stage_of_row: np.ndarray | None = None
    """int64: stage of each stage cap row (aligned with ``stage_rows``)."""

    @property
    def t_col(self) -> int:
        return self.A.shape[1] - 1

    @property
    def r_cols(self) -> slice:
        return slice(self.num_actions, self.num_actions + len(self.ratio_actions))

    def phase1_cost(self) -> np.ndarray:
        c = np.zeros(self.A.shape[1])
        c[self.t_col] = 1.0
        return c

    def phase2_cost(self) -> np.ndarray:
        c = np.zeros(self.A.shape[1])
        c[self.r_cols] = 1.0
        return c


def build_lp(problem: PlanProblem, *, reduced: bool = True) -> LP:
    """Sparse LP of ``problem`` (see the module docstring for the two variants)."""
    dag = problem.dag
    n = dag.num_actions
    up, delta = problem.unfrozen, problem.delta
    fr = problem.freezable
    ratio_actions = np.flatnonzero(fr)
    k = len(ratio_actions)
    rcol = np.full(n, -1, dtype=np.int64)
    rcol[ratio_actions] = n + np.arange(k)
    tcol = n + k

    if reduced:
        src, dst = reduced_edges(dag)
        ends = np.r_[np.flatnonzero(np.diff(dag.rank)), n - 1]  # last action of each rank
    else:
        src, dst = dag.src, dag.dst
        ends = np.arange(n)
    E, R = len(src), len(ends)
    # edge rows: t_dst - t_src + delta_src r_src >= U_src ; end rows: T - t_u + delta_u r_u >= U_u
    u = np.concatenate([src, ends])
    plus = np.concatenate([dst, np.full(R, tcol)])
    rows = np.arange(E + R)
    has_r = fr[u]
    stage_of = dag.stage[ratio_actions].astype(np.int64)
    total, budget = problem.stage_budget()
    # a stage row is needed only when the cap can bind
    need = (
        np.bincount(
            stage_of,
            weights=problem.weight[ratio_actions] * problem.cap[ratio_actions],
            minlength=dag.num_stages,
        )
        > budget * (1 + 1e-12) + 1e-300
    )
    stages = np.flatnonzero(need)
    srow = np.full(dag.num_stages, -1, dtype=np.int64)
    srow[stages] = E + R + np.arange(len(stages))
    in_row = need[stage_of]
    r_idx = np.concatenate([rows, rows, rows[has_r], srow[stage_of[in_row]]])
    c_idx = np.concatenate([plus, u, rcol[u[has_r]], rcol[ratio_actions[in_row]]])
    vals = np.concatenate(
        [np.ones(E + R), -np.ones(E + R), delta[u[has_r]], problem.weight[ratio_actions[in_row]]]
    )
    m = E + R + len(stages)
    import scipy.sparse as sp

    A = sp.csc_matrix((vals, (r_idx, c_idx)), shape=(m, tcol + 1))
    row_lo = np.concatenate([up[u], np.full(len(stages), -np.inf)])
    row_hi = np.concatenate([np.full(E + R, np.inf), budget[stages]])
    col_lo = np.zeros(tcol + 1)
    col_hi = np.concatenate([np.full(n, np.inf), problem.cap[ratio_actions], [np.inf]])
    return LP(A, row_lo, row_hi, col_lo, col_hi, ratio_actions, n, srow[stages], stages)
