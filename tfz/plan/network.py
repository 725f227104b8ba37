"""The LP without its stage caps, as a min-cost flow (project crashing), solved by network simplex.

With per-unit prices ``kappa_v`` on the ratios, the uncapped problem

    min  alpha * T + sum_v kappa_v r_v   s.t.  precedence, T >= ends, (T <= D),  0 <= r_v <= c_v

is a problem on event times (potentials): nodes are the origin, the start ``S_v`` of every action,
the end ``E_v`` of every freezable action and the finish; every constraint bounds a difference of two
potentials and the objective is linear in them (``r_v = (U_v - (E_v - S_v)) / delta_v``). Its dual is
an uncapacitated transshipment problem: an arc ``x -> y`` of cost ``-l`` for each bound
``pi_y - pi_x >= l`` and an arc ``y -> x`` of cost ``u`` for each ``pi_y - pi_x <= u``; node supplies
come from the objective (``kappa_v / delta_v`` from ``E_v`` to ``S_v``, ``alpha`` from the origin to
the finish). The network simplex's potentials are the event times, hence the ratios.

The start tree is the longest-path tree of the precedence graph under durations given by the caller
(the previous solution when re-solving), which is always flow-feasible: every action's supply and
demand cancel within its subtree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from tfz.plan._netsimplex import dual_network_simplex, network_simplex, tree_potentials
from tfz.plan.problem import PlanProblem, reduced_edges

__all__ = ["TensionNetwork", "network_basis"]


@njit(cache=True, nogil=True)
def _longest_path_tree(topo, pptr, pidx, parc, dur, n):
    """end times [n] and, per action, the arc from its latest-ending predecessor (-1: none)."""
    end = np.zeros(n)
    best_arc = np.full(n, -1, np.int64)
    for v in topo:
        t = 0.0
        b = -1
        for j in range(pptr[v], pptr[v + 1]):
            e = end[pidx[j]]
            if b < 0 or e > t:
                t = e
                b = parc[j]
        end[v] = t + dur[v]
        best_arc[v] = b
    return end, best_arc


@dataclass(eq=False)
class TensionNetwork:
    """Arcs of the transshipment problem of one :class:`PlanProblem` (see the module docstring)."""

    problem: PlanProblem
    tail: np.ndarray
    head: np.ndarray
    cost: np.ndarray
    ratio_actions: np.ndarray
    """int64 [k]: freezable actions (E node of ratio_actions[j] is 1 + n + j)."""
    num_nodes: int
    prec: tuple
    """(ptr, pred node action, arc) CSR of reduced precedence predecessors per action."""
    source_arc: np.ndarray
    """int64 [n]: arc origin -> S_v, -1 where v has predecessors."""
    end_arc: np.ndarray
    """int64 [P]: arc from each rank's last action to the finish."""
    ends: np.ndarray
    fwd: int
    """Index of the first forward duration arc (S_v -> E_v); reverse arcs follow them."""
    mk_arc: int
    """Index of the finish -> origin arc (cost D), the last arc."""

    @classmethod
    def build(cls, problem: PlanProblem) -> TensionNetwork:
        dag = problem.dag
        n = dag.num_actions
        fr = problem.freezable
        fidx = np.flatnonzero(fr)
        k = len(fidx)
        S = 1 + np.arange(n)
        E = np.full(n, -1, dtype=np.int64)
        E[fidx] = 1 + n + np.arange(k)
        X = np.where(fr, E, S)
        omega = 1 + n + k
        up = problem.unfrozen
        lo = up - problem.cap * problem.delta
        fixed_len = np.where(fr, 0.0, up)
        src, dst = reduced_edges(dag)
        ends = np.r_[np.flatnonzero(np.diff(dag.rank)), n - 1]
        has_pred = np.zeros(n, dtype=bool)
        has_pred[dst] = True
        sources = np.flatnonzero(~has_pred)
        parts_t = [X[src], np.zeros(len(sources), np.int64), X[ends], S[fidx], E[fidx], [omega]]
        parts_h = [S[dst], S[sources], np.full(len(ends), omega), E[fidx], S[fidx], [0]]
        parts_c = [-fixed_len[src], np.zeros(len(sources)), -fixed_len[ends], -lo[fidx], up[fidx], [0.0]]
        tail = np.concatenate(parts_t).astype(np.int64)
        head = np.concatenate(parts_h).astype(np.int64)
        cost = np.concatenate(parts_c).astype(np.float64)
        E_, nS = len(src), len(sources)
        source_arc = np.full(n, -1, dtype=np.int64)
        source_arc[sources] = E_ + np.arange(nS)
        end_arc = E_ + nS + np.arange(len(ends))
        order = np.argsort(dst, kind="stable")
        ptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(dst, minlength=n), out=ptr[1:])
        prec = (ptr, src[order].astype(np.int64), order.astype(np.int64))
        fwd = E_ + nS + len(ends)
        return cls(
            problem, tail, head, cost, fidx, n + k + 2, prec, source_arc, end_arc, ends, fwd, len(tail) - 1
        )

    def solve(
        self,
        kappa: np.ndarray,
        alpha: float,
        deadline: float | None,
        durations: np.ndarray | None = None,
        tree: tuple | None = None,
    ):
        """Optimal ratios [n] and T of the uncapped problem.

        ``kappa``: float [k] price per unit ratio of each freezable action; ``alpha``: weight of T;
        ``deadline``: D (T <= D) or None; ``durations``: float [n] used to pick the start tree, or
        ``tree``: the tree returned by an earlier solve of this network, re-used by dual simplex
        (it stays dual feasible when only ``kappa`` and ``alpha`` change, or the deadline is at
        least the earlier T). Returns (ratios [n], T, iterations, tree). Raises RuntimeError if the
        flow problem is unbounded (the deadline is below the all-frozen makespan) or the iteration
        limit is hit.
        """
        p = self.problem
        n = p.num_actions
        fidx = self.ratio_actions
        k = len(fidx)
        N = self.num_nodes
        omega = N - 1
        delta = p.delta[fidx]
        q = np.asarray(kappa, dtype=np.float64) / delta
        cost = self.cost.copy()
        if deadline is None:
            cost[self.mk_arc] = np.inf  # never enters
        else:
            cost[self.mk_arc] = float(deadline)

        E = 1 + n + np.arange(k)
        if tree is not None:
            parent, pred = tree[0].copy(), tree[1].copy()
            supply = np.zeros(N)
            supply[1 + fidx] = -q
            supply[E] = q
            supply[omega] -= alpha
            supply[0] += alpha
            flow = np.zeros(len(cost))
            pi = np.zeros(N)
            status, iters = dual_network_simplex(
                self.tail,
                self.head,
                cost,
                supply,
                0,
                parent,
                pred,
                flow,
                pi,
                1e-13 * max(1.0, float(q.max(initial=0)), alpha),
                50 * N + 1000,
            )
            if status != 0:
                raise RuntimeError(
                    f"dual network simplex stopped with status {'infeasible' if status == 1 else 'limit'}"
                )
            np.maximum(flow, 0.0, out=flow)
            return self._finish(cost, parent, pred, flow, pi, iters)
        ptr, pnode, parc = self.prec
        end, best_arc = _longest_path_tree(p.dag.topo, ptr, pnode, parc, durations, n)
        parent = np.zeros(N, dtype=np.int64)
        pred = np.zeros(N, dtype=np.int64)
        # S_v: from its latest predecessor's exit node, or from the origin
        arc_s = np.where(best_arc >= 0, best_arc, self.source_arc)
        pred[1 : n + 1] = arc_s
        parent[1 : n + 1] = self.tail[arc_s]
        # finish: from the rank end that finishes last
        j = int(np.argmax(end[self.ends]))
        pred[omega] = self.end_arc[j]
        parent[omega] = self.tail[self.end_arc[j]]
        # E_v below S_v; arc direction chosen by the sign of its flow
        parent[E] = 1 + fidx
        on_path = np.zeros(N, dtype=bool)
        u = omega
        while u != 0:
            on_path[u] = True
            u = parent[u]
        net = q - alpha * on_path[E]  # supply of E_v's subtree
        use_rev = net >= 0
        pred[E] = np.where(use_rev, self.fwd + k + np.arange(k), self.fwd + np.arange(k))
        flow = np.zeros(len(cost))
        flow[pred[E]] = np.abs(net)
        flow[arc_s[on_path[1 : n + 1]]] = alpha
        flow[pred[omega]] = alpha
        # potentials in DAG order: origin, S/E of each action in topological order, finish
        order = np.empty(N, dtype=np.int64)
        order[0] = 0
        topo = p.dag.topo
        e_of = np.full(n, -1, dtype=np.int64)
        e_of[fidx] = E
        seq = np.stack([1 + topo, e_of[topo]], axis=1).ravel()
        seq = seq[seq >= 0]
        order[1 : 1 + len(seq)] = seq
        order[-1] = omega
        pi = np.zeros(N)
        tree_potentials(self.tail, self.head, cost, parent, pred, order, pi)
        return self._finish(cost, parent, pred, flow, pi, 0)

    def _finish(self, cost, parent, pred, flow, pi, iters):
        """Primal network simplex to optimality (a check after dual simplex), then the ratios."""
        p = self.problem
        n = p.num_actions
        fidx = self.ratio_actions
        E = 1 + n + np.arange(len(fidx))
        scale = max(1.0, float(np.max(np.abs(self.cost[:-1]))), float(np.abs(pi).max()))
        status, more = network_simplex(
            self.tail, self.head, cost, 0, parent, pred, flow, pi, 1e-12 * scale, 50 * len(cost) + 1000
        )
        if status != 0:
            raise RuntimeError(
                f"network simplex stopped with status {'unbounded' if status == 1 else 'limit'}"
            )
        dur = pi[E] - pi[1 + fidx]
        r = np.zeros(n)
        r[fidx] = np.clip((p.unfrozen[fidx] - dur) / p.delta[fidx], 0.0, p.cap[fidx])
        return r, float(pi[-1]), iters + more, (parent, pred)


def network_basis(
    problem: PlanProblem, lp, kappa: np.ndarray, alpha: float = 1.0, deadline: float | None = None
):
    """A HiGHS basis of the reduced LP (:func:`tfz.plan.problem.build_lp`) that is optimal for
    ``min alpha T + kappa @ r`` (``T <= deadline``) without the stage caps: the network simplex tree.

    ``kappa``: float [k] price of each ratio column. Tree arcs are the tight constraints: a
    precedence or end arc makes its row nonbasic, a source arc puts ``t_v`` at 0, a forward
    (reverse) duration arc puts ``r_v`` at its cap (at 0), the deadline arc puts T at its bound;
    every other row and column is basic. With prices that include the caps' Lagrange multipliers
    the basis is close to optimal for the capped LP, so dual simplex has little left to repair.
    """
    import highspy

    net = TensionNetwork.build(problem)
    n, k = problem.num_actions, len(net.ratio_actions)
    _, _, _, (_, pred) = net.solve(kappa, alpha, deadline, problem.unfrozen)
    n_src = int(np.sum(net.source_arc >= 0))
    n_prec = len(net.tail) - (len(net.ends) + 2 * k + 1) - n_src
    bounds = np.array([n_prec, n_prec + n_src, net.fwd, net.fwd + k, net.fwd + 2 * k])
    arcs = pred[1:]
    cat = np.searchsorted(bounds, arcs, side="right")
    m, ncol = lp.A.shape
    col = np.ones(ncol, dtype=np.int8)  # 0 lower, 1 basic, 2 upper
    row = np.ones(m, dtype=np.int8)
    row[arcs[cat == 0]] = 0
    col[net.head[arcs[cat == 1]] - 1] = 0
    row[n_prec + arcs[cat == 2] - bounds[1]] = 0
    col[n + arcs[cat == 3] - net.fwd] = 2
    col[n + arcs[cat == 4] - net.fwd - k] = 0
    if np.any(cat == 5):
        col[ncol - 1] = 2
    status = (
        highspy.HighsBasisStatus.kLower,
        highspy.HighsBasisStatus.kBasic,
        highspy.HighsBasisStatus.kUpper,
    )
    basis = highspy.HighsBasis()
    basis.col_status = [status[x] for x in col.tolist()]
    basis.row_status = [status[x] for x in row.tolist()]
    basis.valid = True
    return basis
