"""The freeze-ratio LP as a min-cost flow with one side column per stage cap, both phases at once.

The primal (see :mod:`tfz.plan.network` for the node set) bounds differences of event-time
potentials: precedence, ``0 <= t``, ``T >=`` every end, ``L'_v <= E_v - S_v <= U_v``; each stage cap
``sum_v a_v r_v <= budget_s`` with ``r_v = (U_v - (E_v - S_v)) / delta_v`` reads
``sum_v w_v (E_v - S_v) >= h_s`` with ``w_v = a_v / delta_v``, ``h_s = sum_v a_v U_v / delta_v -
budget_s``. Its dual is a transshipment problem on the network's arcs plus one column per cap
(``w_v`` from ``S_v`` to ``E_v`` for every v of the stage, cost ``-h_s``). Phase 1 (min T) gives
supplies ``b1`` (+1 at the origin, -1 at the finish), phase 2 (min sum r) gives ``b2`` (``-1/delta_v``
at ``S_v``, ``+1/delta_v`` at ``E_v``); a basis optimal for ``b1 + eps b2`` for all small ``eps > 0``
yields potentials that are the exact lexicographic optimum.

:meth:`FlowProblem.optimize` runs the native simplex (``tfz.plan._sidesimplex``,
``csrc/sidesimplex.cpp``). A cold solve takes two calls: the uncapped problem from the longest-path
tree (:meth:`FlowProblem.cold_basis`), then the capped one from that optimum along a homotopy in the
caps (:meth:`FlowProblem.capped_start`): every cap starts at the largest stage mean of the uncapped
optimum and all of them descend together to ``max_freeze_ratio``, the basis following the optimum,
so caps bind one after another in the order of their stages' freezing.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from tfz.plan.network import TensionNetwork
from tfz.plan.problem import PlanProblem
from tfz.plan.warm import FlowBasis

try:
    from tfz.plan._sidesimplex import longest_path_tree, side_simplex
except ImportError:  # built without a C++ compiler, or with TFZ_SKIP_CPP_BUILD=1
    longest_path_tree = side_simplex = None

__all__ = ["NATIVE", "SIDE_ENTRIES", "FlowProblem", "FlowSolveError", "FlowStats"]

NATIVE = side_simplex is not None
"""Whether the native extension ``tfz.plan._sidesimplex`` is built; without it ``tfz.plan.solve``
uses the HiGHS path."""

SIDE_ENTRIES = 16
"""Without the homotopy (warm restarts, and the retry after a failed homotopy), cap columns may enter
while arcs still can, but at most this many before the arcs are optimal again. Unlimited, every cap
the uncapped optimum violates enters early; when most of them end up slack (one stage 10% slower than
the rest) the simplex then stalled in degenerate pivots (35x longer at 16k actions). One at a time
needed 1.8x the pivots of unlimited at 65k actions where 37 caps bind (bench/RESULTS.md)."""


_RELAX_ROUNDS = 4


def _longest_path(net: TensionNetwork, durations: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ptr, pnode, parc = net.prec
    topo = np.ascontiguousarray(net.problem.dag.topo, dtype=np.int64)
    return longest_path_tree(topo, ptr, pnode, parc, np.ascontiguousarray(durations, dtype=np.float64))


@dataclass(frozen=True)
class FlowStats:
    """What :meth:`FlowProblem.optimize` did (summed over its runs)."""

    pivots: int
    side_pivots: int
    """Pivots through the cap columns (a cap column or an arc between two trees entered)."""
    refreshes: int
    """Flows and potentials recomputed from scratch."""
    basic_sides: int
    """Cap columns in the final basis."""
    touched: int
    """Nodes whose subtree sums the pivots through the cap columns took."""
    priced: int
    """Reduced costs computed to choose entering variables."""
    degenerate: int
    """Pivots with a step of 0 in the first two components."""
    swapped: int
    """Basic variables swapped for their reverses (warm starts)."""
    homotopy: int
    """Pivots of the homotopy (all among ``side_pivots``)."""
    moved: int
    """Nodes whose potentials or trees the pivots changed."""
    lifted: int
    """Arcs entering on homotopy pivots degenerate in the first two components whose third component
    was raised above the perturbation's values (else they leave again on the next such pivot)."""

    @classmethod
    def from_array(cls, values: np.ndarray) -> FlowStats:
        return cls(*(int(v) for v in values[: len(fields(cls))]))


_NUM_STATS = len(fields(FlowStats))


class FlowSolveError(RuntimeError):
    """The side-column simplex did not reach a verified optimum (``status`` says why)."""

    def __init__(self, message: str, status: int, stats: FlowStats | None = None):
        super().__init__(message)
        self.status = status
        self.stats = stats


_STATUS = {
    1: "unbounded",
    2: "iteration limit",
    3: "start not feasible",
    4: "singular side-column matrix",
    5: "flows turned infeasible",
    6: "inconsistent forest",
    7: "invalid start basis",
}


@dataclass(eq=False)
class FlowProblem:
    """Arrays of the flow problem of one :class:`PlanProblem`."""

    problem: PlanProblem
    net: TensionNetwork
    tail: np.ndarray
    head: np.ndarray
    cost: np.ndarray
    partner: np.ndarray
    """int64 [m]: the reverse arc of each arc (-1: none)."""
    m_price: int
    """Arcs ``[0, m_price)`` may enter; the rest are the artificial reverses (see :meth:`build`)."""
    art_relaxed: np.ndarray
    """float64 [m - m_price]: relaxed cost of each artificial arc (see :meth:`build`)."""
    side_stage: np.ndarray
    """int64 [S]: the stage of each side column (stages whose cap can bind)."""
    sptr: np.ndarray
    snode: np.ndarray
    scoef: np.ndarray
    snorm: np.ndarray
    scost: np.ndarray
    salt: np.ndarray
    """float64 [S]: relaxed cost of each side column's negation (see :meth:`optimize`)."""
    node_side: np.ndarray
    node_coef: np.ndarray
    b1: np.ndarray
    b2: np.ndarray

    @property
    def num_nodes(self) -> int:
        return self.net.num_nodes

    @classmethod
    def build(cls, problem: PlanProblem) -> FlowProblem:
        net = TensionNetwork.build(problem)
        n = problem.num_actions
        fidx = net.ratio_actions
        k = len(fidx)
        N = net.num_nodes
        m = len(net.tail)
        # Artificial reverse of every precedence, source and end arc (y -> x): the constraint
        # t_y - t_x <= l, with cost -cost = l, or relaxed to l + M (cost M - cost), which no
        # solution with times in [0, T] can bind. They only start warm bases (a forest arc whose
        # flow turned negative swaps to its reverse) and never enter; duration arcs have real
        # reverses.
        fwd = net.fwd
        big = 2.0 * float(_longest_path(net, problem.unfrozen)[0].max()) + 1.0
        tail = np.concatenate([net.tail[:m], net.head[:fwd]])
        head = np.concatenate([net.head[:m], net.tail[:fwd]])
        cost = np.concatenate([net.cost[:m], -net.cost[:fwd]])
        partner = np.concatenate(
            [m + np.arange(fwd), fwd + k + np.arange(k), fwd + np.arange(k), np.arange(fwd)]
        )
        delta = problem.delta[fidx]
        weight = problem.weight[fidx]
        stage_f = problem.dag.stage[fidx].astype(np.int64)
        S_all = problem.dag.num_stages
        total, budget = problem.stage_budget()
        can = np.bincount(stage_f, weights=weight * problem.cap[fidx], minlength=S_all)
        side_stage = np.flatnonzero(can > budget * (1 + 1e-12) + 1e-300)
        col_of = np.full(S_all, -1, dtype=np.int64)
        col_of[side_stage] = np.arange(len(side_stage))
        col = col_of[stage_f]
        sel = np.flatnonzero(col >= 0)
        order = sel[np.argsort(col[sel], kind="stable")]
        w = weight[order] / delta[order]
        cnt = np.bincount(col[order], minlength=len(side_stage))
        sptr = np.zeros(len(side_stage) + 1, dtype=np.int64)
        np.cumsum(2 * cnt, out=sptr[1:])
        snode = np.empty(2 * len(order), dtype=np.int64)
        scoef = np.empty(2 * len(order))
        # entries of one column: S nodes (+w) then E nodes (-w), columns back to back
        starts = sptr[:-1]
        rank_in = np.arange(len(order)) - np.repeat(np.cumsum(cnt) - cnt, cnt)
        c_of = col[order]
        snode[starts[c_of] + rank_in] = 1 + fidx[order]
        scoef[starts[c_of] + rank_in] = w
        snode[starts[c_of] + cnt[c_of] + rank_in] = 1 + n + order
        scoef[starts[c_of] + cnt[c_of] + rank_in] = -w
        snorm = np.sqrt(np.bincount(c_of, weights=2 * w * w, minlength=len(side_stage)))
        snorm = np.where(snorm > 0, snorm, 1.0)
        h = np.bincount(c_of, weights=w * problem.unfrozen[fidx[order]], minlength=len(side_stage))
        scost = -(h - budget[side_stage])
        salt = h + 1.0  # sum_v w_v (E_v - S_v) <= sum_v w_v U_v + 1: never binds
        node_side = np.full(N, -1, dtype=np.int64)
        node_coef = np.zeros(N)
        node_side[snode] = np.repeat(np.arange(len(side_stage)), 2 * cnt)
        node_coef[snode] = scoef
        b1 = np.zeros(N)
        b1[0], b1[N - 1] = 1.0, -1.0
        b2 = np.zeros(N)
        b2[1 + fidx] = -1.0 / delta
        b2[1 + n + np.arange(k)] = 1.0 / delta
        return cls(
            problem,
            net,
            tail,
            head,
            cost,
            partner.astype(np.int64),
            m,
            big - net.cost[:fwd],
            side_stage,
            sptr,
            snode,
            scoef,
            snorm,
            scost,
            salt,
            node_side,
            node_coef,
            b1,
            b2,
        )

    def cold_basis(self, durations: np.ndarray | None = None) -> FlowBasis:
        """The longest-path tree under ``durations`` (default: every ratio at its cap), with each
        E node below its S node on the arc that carries its subtree's flow: lexicographically
        feasible by construction (every action's supplies cancel within its subtree)."""
        p, net = self.problem, self.net
        n = p.num_actions
        fidx = net.ratio_actions
        k = len(fidx)
        N = net.num_nodes
        omega = N - 1
        if durations is None:
            durations = p.durations(p.cap)
        end, best_arc = _longest_path(net, durations)
        parent = np.full(N, -1, dtype=np.int64)
        pred = np.full(N, -1, dtype=np.int64)
        arc_s = np.where(best_arc >= 0, best_arc, net.source_arc)
        pred[1 : n + 1] = arc_s
        parent[1 : n + 1] = net.tail[arc_s]
        j = int(np.argmax(end[net.ends]))
        pred[omega] = net.end_arc[j]
        parent[omega] = net.tail[net.end_arc[j]]
        E = 1 + n + np.arange(k)
        parent[E] = 1 + fidx
        on_path = np.zeros(N, dtype=bool)
        u = omega
        while u != 0:
            on_path[u] = True
            u = parent[u]
        # the finish is below E_v: its subtree needs the unit b1 flow (forward arc), else it
        # has the surplus 1/delta_v of b2 (reverse arc)
        pred[E] = np.where(on_path[E], net.fwd + np.arange(k), net.fwd + k + np.arange(k))
        S = len(self.scost)
        return FlowBasis(parent, pred, np.zeros(S, dtype=np.bool_), np.zeros(S, dtype=np.bool_))

    def tolerances(self) -> np.ndarray:
        """(reduced cost, b1 flow, b2 flow) tolerances scaled to the data, and how many cap columns
        may enter before the arcs are optimal again (:data:`SIDE_ENTRIES`)."""
        scale = max(1.0, float(np.max(np.abs(self.cost), initial=0.0)))
        return np.array([1e-11 * scale, 1e-9, 1e-12 * max(1.0, float(np.abs(self.b2).sum())), SIDE_ENTRIES])

    def optimize(
        self,
        basis: FlowBasis,
        *,
        price_sides: bool = True,
        max_iter: int | None = None,
        max_side_pivots: int | None = None,
        block: int = 0,
        start: np.ndarray | None = None,
    ) -> tuple[np.ndarray, FlowStats]:
        """Run the simplex from ``basis`` (updated in place) to the lexicographic optimum.

        ``price_sides=False`` keeps the side columns out (the uncapped problem). ``max_iter`` and
        ``max_side_pivots`` bound the pivots and the pivots through the cap columns (the costly ones),
        else :class:`FlowSolveError` (status 2). ``start``: cap
        column costs at which ``basis`` (with no basic cap column) is optimal, from
        :meth:`capped_start`: the costs then move to their real values along a homotopy before the
        plain simplex checks and finishes. A basis whose values turned negative (a warm start)
        swaps those arcs and cap columns for their reverses: at first as equalities (the
        constraint stays tight, so the potentials stay where they were), and any that still
        carries flow at the optimum is relaxed to its never-binding bound and the simplex goes on,
        until none does. Returns (potentials float [N], stats); raises :class:`FlowSolveError` when
        it does not finish.
        """
        N = self.num_nodes
        m = len(self.tail)
        S = len(self.scost)
        if (
            basis.parent.shape != (N,)
            or basis.pred.shape != (N,)
            or basis.side_basic.shape != (S,)
            or basis.side_flip.shape != (S,)
        ):
            raise ValueError("basis does not belong to this flow problem")
        if max_iter is None:
            max_iter = 20 * (N + m) + 1000
        if max_side_pivots is None:
            max_side_pivots = max_iter
        cost = self.cost.copy()
        salt = -self.scost  # the negated cap column as an equality
        tol = self.tolerances()
        total = np.zeros(_NUM_STATS, dtype=np.int64)
        for _ in range(_RELAX_ROUNDS):
            b = np.stack([self.b1, self.b2], axis=1)
            X = np.zeros((m, 3))
            MU = np.zeros((S, 3))
            pi = np.zeros(N)
            stats = np.zeros(_NUM_STATS, dtype=np.int64)
            status = side_simplex(
                self.tail,
                self.head,
                cost,
                self.partner,
                self.m_price,
                self.sptr,
                self.snode,
                self.scoef.copy(),
                self.snorm,
                self.scost.copy(),
                salt.copy(),
                self.node_side,
                self.node_coef.copy(),
                b,
                basis.parent,
                basis.pred,
                basis.side_basic,
                basis.side_flip,
                bool(price_sides),
                tol,
                int(max_iter),
                int(max_side_pivots),
                int(block) if block > 0 else max(int(np.sqrt(self.m_price)), 64),
                X,
                MU,
                pi,
                stats,
                start,
            )
            start = None  # a relaxed rerun starts from a basis with cap columns: no homotopy
            total[:3] += stats[:3]
            total[3] = stats[3]
            total[4:] += stats[4:]
            relaxed = np.array_equal(cost[self.m_price :], self.art_relaxed) and np.array_equal(
                salt, self.salt
            )
            if status == 1 and not relaxed:
                # the equalities together admit no solution: relax all of them, go on
                cost[self.m_price :] = self.art_relaxed
                salt = self.salt.copy()
                continue
            if status != 0:
                message = f"side-column simplex stopped: {_STATUS.get(status, status)}"
                raise FlowSolveError(message, status, FlowStats.from_array(total))
            # artificial arcs and negated cap columns that still carry flow: relax, go on
            in_forest = basis.pred[basis.parent >= 0]
            art = in_forest[in_forest >= self.m_price]
            carry = (X[art, 0] > tol[1]) | ((X[art, 0] > -tol[1]) & (X[art, 1] > tol[2]))
            art = art[carry]
            sides = np.flatnonzero(basis.side_flip & basis.side_basic)
            carry = (MU[sides, 0] > tol[1]) | ((MU[sides, 0] > -tol[1]) & (MU[sides, 1] > tol[2]))
            sides = sides[carry]
            if len(art) == 0 and len(sides) == 0:
                return pi, FlowStats.from_array(total)
            if np.any(cost[art] == self.art_relaxed[art - self.m_price]) or np.any(
                salt[sides] == self.salt[sides]
            ):
                break  # a bound that cannot bind at an optimum binds: numerical trouble
            cost[art] = self.art_relaxed[art - self.m_price]
            salt[sides] = self.salt[sides]
        message = "side-column simplex stopped: artificial bounds kept binding"
        raise FlowSolveError(message, 8, FlowStats.from_array(total))

    def capped_start(self, pi: np.ndarray) -> np.ndarray | None:
        """Cap-column costs at which the uncapped optimum (potentials ``pi``) is optimal: every
        stage's cap raised to the largest stage mean it has (a cap column's cost is ``-(h_s -
        cap * total_s)``); None when no cap is violated.

        From there to the real costs (:meth:`optimize` with ``start``) all caps descend together,
        so the most frozen stage binds first. Measured against starting each cap at its own stage's
        mean (all bind at once, then most come loose again) and against the plain simplex with
        :data:`SIDE_ENTRIES`: 12k-16k actions of every schedule 1.3-5x faster capped stages
        (bench/RESULTS.md).
        """
        p = self.problem
        r, _ = self.ratios(pi)
        total, budget = p.stage_budget()
        usage = np.bincount(p.dag.stage, weights=p.weight * r, minlength=p.dag.num_stages)[self.side_stage]
        total, budget = total[self.side_stage], budget[self.side_stage]
        if not np.any(usage > budget):
            return None
        highest = float(np.max(usage / total)) * (1 + 1e-9)
        return self.scost + total * (highest - p.max_freeze_ratio)

    def ratios(self, pi: np.ndarray) -> tuple[np.ndarray, float]:
        """Ratios [n] and makespan T from potentials."""
        p = self.problem
        n = p.num_actions
        fidx = self.net.ratio_actions
        dur = pi[1 + n + np.arange(len(fidx))] - pi[1 + fidx]
        r = np.zeros(n)
        r[fidx] = np.clip((p.unfrozen[fidx] - dur) / p.delta[fidx], 0.0, p.cap[fidx])
        return r, float(pi[-1] - pi[0])
