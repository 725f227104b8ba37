"""The LP's event times as potentials of a network: nodes, arcs, costs (project crashing).

Nodes are the origin (0), the start ``S_v = 1 + v`` of every action, the end ``E_v = 1 + n + j`` of
the j-th freezable action and the finish (last). Every constraint of the LP without its stage caps
bounds a difference of two potentials: an arc ``x -> y`` of cost ``-l`` stands for ``pi_y - pi_x >= l``
and an arc ``y -> x`` of cost ``u`` for ``pi_y - pi_x <= u``. So precedence ``u -> v`` is an arc from
u's exit node (``E_u`` when u is freezable, else ``S_u``, then with cost ``-U_u``) to ``S_v``, every
action without predecessors has an arc from the origin, every rank's last action one to the finish,
and a freezable action has the duration arcs ``S_v -> E_v`` (cost ``-(U_v - c_v delta_v)``: at most
its cap frozen) and ``E_v -> S_v`` (cost ``U_v``). The dual of the LP is a transshipment problem on
these arcs (:mod:`tfz.plan.flow` adds the cap columns and the supplies); its potentials are the event
times, hence the ratios ``r_v = (U_v - (E_v - S_v)) / delta_v``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tfz.plan.problem import PlanProblem, reduced_edges

__all__ = ["TensionNetwork"]


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
    """int64 [P]: each rank's last action."""
    fwd: int
    """Index of the first forward duration arc (S_v -> E_v); the k reverse arcs follow the k forward
    ones and end the arc list."""

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
        parts_t = [X[src], np.zeros(len(sources), np.int64), X[ends], S[fidx], E[fidx]]
        parts_h = [S[dst], S[sources], np.full(len(ends), omega), E[fidx], S[fidx]]
        parts_c = [-fixed_len[src], np.zeros(len(sources)), -fixed_len[ends], -lo[fidx], up[fidx]]
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
        return cls(problem, tail, head, cost, fidx, n + k + 2, prec, source_arc, end_arc, ends, fwd)
