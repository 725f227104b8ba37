"""A training step as a DAG of actions: build, validate, simulate (``tfz.dag``).

Nodes are the schedule's actions. An edge u -> v means v cannot start before u ends:

- program order: consecutive actions of one rank;
- forward chain: ``sF m`` -> ``(s+1)F m``;
- forward to backward: ``sF m`` -> ``sB m`` or ``sI m``;
- backward chain: ``(s+1)B|I m`` -> ``sB|I m``;
- split backward: ``sI m`` -> ``sW m``.

Communication is not modelled (edges carry no latency; ``tfz.controller`` adds a gap fitted to
measured batches to every action's duration). Simulation is list scheduling: an action
starts when its rank is free and its dependencies are done, which is the longest path through the
DAG because program order is an edge. Everything is linear in the number of actions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from tfz._validate import float_array
from tfz.schedule import KINDS, Action, Schedule
from tfz.schedule.limits import check_actions

__all__ = ["DAG", "Simulation", "build_dag", "simulate"]

_F, _B, _I, _W = (KINDS.index(k) for k in "FBIW")


@dataclass(frozen=True, eq=False)
class DAG:
    """Actions of one step and their dependencies, as flat arrays (node i = ``actions[i]``)."""

    schedule: Schedule
    actions: tuple[Action, ...]
    rank: np.ndarray
    """int32 [n]: rank that runs each action."""
    stage: np.ndarray
    """int32 [n]."""
    kind: np.ndarray
    """int8 [n]: index into ``tfz.schedule.KINDS`` ("F", "B", "I", "W")."""
    microbatch: np.ndarray
    """int32 [n]."""
    src: np.ndarray
    """int64 [e]: edge sources (deduplicated)."""
    dst: np.ndarray
    """int64 [e]: edge destinations."""
    topo: np.ndarray
    """int64 [n]: a topological order."""

    @property
    def num_actions(self) -> int:
        return len(self.actions)

    @property
    def num_edges(self) -> int:
        return len(self.src)

    @property
    def num_ranks(self) -> int:
        return self.schedule.num_ranks

    @property
    def num_stages(self) -> int:
        return self.schedule.num_stages

    @cached_property
    def names(self) -> tuple[str, ...]:
        """``str(action)`` per node."""
        return tuple(map(str, self.actions))

    @cached_property
    def index(self) -> dict[str, int]:
        """Node index by action name (``"2W3"``)."""
        return {name: i for i, name in enumerate(self.names)}

    @cached_property
    def preds(self) -> tuple[np.ndarray, np.ndarray]:
        """CSR of predecessors: node v's predecessors are ``idx[ptr[v]:ptr[v+1]]``."""
        return _csr(self.dst, self.src, self.num_actions)

    @cached_property
    def succs(self) -> tuple[np.ndarray, np.ndarray]:
        """CSR of successors."""
        return _csr(self.src, self.dst, self.num_actions)

    def kind_mask(self, *kinds: str) -> np.ndarray:
        """Boolean [n]: actions whose kind is one of ``kinds``."""
        return np.isin(self.kind, [KINDS.index(k) for k in kinds])


@dataclass(frozen=True, eq=False)
class Simulation:
    """Start and end time of every action under given durations."""

    dag: DAG
    durations: np.ndarray
    start: np.ndarray
    end: np.ndarray

    @property
    def makespan(self) -> float:
        return float(self.end.max()) if len(self.end) else 0.0

    @cached_property
    def busy(self) -> np.ndarray:
        """float64 [ranks]: summed action time per rank."""
        return np.bincount(self.dag.rank, weights=self.durations, minlength=self.dag.num_ranks)

    @cached_property
    def bubble_ratio(self) -> np.ndarray:
        """float64 [ranks]: idle fraction of the makespan per rank."""
        span = self.makespan
        if span <= 0:
            return np.zeros(self.dag.num_ranks)
        return (span - self.busy) / span

    @cached_property
    def critical_path(self) -> list[Action]:
        """A longest chain of actions, each starting exactly when its predecessor ends."""
        dag = self.dag
        if dag.num_actions == 0:
            return []
        ptr, idx = dag.preds
        end, start = self.end, self.start
        tol = 1e-9 * self.makespan  # relative: times of 1e-320 or 1e300 ms have their whole path
        v = int(np.argmax(end))
        path = [v]
        while start[v] > tol:
            cand = idx[ptr[v] : ptr[v + 1]]
            # the predecessor that ends last is the binding one
            best = cand[np.argmax(end[cand])]
            if abs(end[best] - start[v]) > tol:  # only happens with inconsistent inputs
                break
            v = int(best)
            path.append(v)
        return [dag.actions[i] for i in reversed(path)]


def _csr(keys: np.ndarray, values: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(keys, kind="stable")
    ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(keys, minlength=n), out=ptr[1:])
    return ptr, values[order]


def build_dag(schedule: Schedule) -> DAG:
    """Build and validate the DAG of ``schedule``.

    Raises ValueError naming the actions involved for: unknown actions (bad stage, microbatch or
    rank), duplicates, a (stage, microbatch) missing its forward or backward, and cycles (e.g. a
    cross-rank deadlock where ranks wait on each other).
    """
    S, M, P = schedule.num_stages, schedule.num_microbatches, schedule.num_ranks
    n = schedule.num_actions
    if n == 0:
        raise ValueError("empty schedule: no actions")
    check_actions(n, f"schedule {schedule.name!r}", limit_name="tfz.schedule.MAX_ACTIONS")
    actions = tuple(a for order in schedule.orders for a in order)
    ranks = np.repeat(np.arange(P, dtype=np.int32), [len(o) for o in schedule.orders])

    for r, order in enumerate(schedule.orders):
        for a in order:
            if not isinstance(a, Action) or a.kind not in KINDS:
                raise ValueError(f"unknown action {a!r} on rank {r}")
            if not 0 <= a.stage < S:
                raise ValueError(f"unknown action {a} on rank {r}: stage {a.stage} not in [0, {S})")
            if not 0 <= a.microbatch < M:
                raise ValueError(f"unknown action {a} on rank {r}: microbatch {a.microbatch} not in [0, {M})")
            home = schedule.stage_to_rank[a.stage]
            if home != r:
                raise ValueError(f"action {a} is on rank {r}, but stage {a.stage} lives on rank {home}")

    if S * M > n:  # fewer actions than (stage, microbatch) pairs: some forward is missing
        _check_complete_sparse(actions, S, M)  # raises, without a dense S x M table

    stage = np.fromiter((a.stage for a in actions), dtype=np.int32, count=n)
    kind = np.fromiter((KINDS.index(a.kind) for a in actions), dtype=np.int8, count=n)
    mb = np.fromiter((a.microbatch for a in actions), dtype=np.int32, count=n)

    table = np.full((len(KINDS), S, M), -1, dtype=np.int64)
    flat = (kind.astype(np.int64) * S + stage) * M + mb
    counts = np.bincount(flat, minlength=table.size)
    if counts.max() > 1:
        dup = int(np.argmax(counts > 1))
        k, rest = divmod(dup, S * M)
        raise ValueError(f"duplicate action {Action(rest // M, KINDS[k], rest % M)}")
    table.reshape(-1)[flat] = np.arange(n)
    _check_complete(table, S, M)

    # backward "entry" per (stage, mb): B if present, else I
    bwd = np.where(table[_B] >= 0, table[_B], table[_I])

    src_parts, dst_parts = [], []

    def add(u: np.ndarray, v: np.ndarray) -> None:
        keep = (u >= 0) & (v >= 0)
        src_parts.append(u[keep].ravel())
        dst_parts.append(v[keep].ravel())

    # program order
    starts = np.cumsum([0] + [len(o) for o in schedule.orders])
    prog = np.arange(n - 1)
    last_of_rank = np.zeros(n, dtype=bool)
    last_of_rank[starts[1:] - 1] = True
    prog = prog[~last_of_rank[:-1]]
    add(prog, prog + 1)
    add(table[_F, :-1, :], table[_F, 1:, :])  # forward chain
    add(table[_F], bwd)  # forward -> own backward
    add(bwd[1:, :], bwd[:-1, :])  # backward chain
    add(table[_I], table[_W])  # I -> W

    src = np.concatenate(src_parts)
    dst = np.concatenate(dst_parts)
    key = np.unique(src * n + dst)
    src, dst = key // n, key % n

    topo = _toposort(actions, src, dst, n)
    return DAG(schedule, actions, ranks, stage, kind, mb, src, dst, topo)


def _check_complete(table: np.ndarray, S: int, M: int) -> None:
    has = table >= 0
    missing_f = ~has[_F]
    if missing_f.any():
        s, m = map(int, np.argwhere(missing_f)[0])
        raise ValueError(f"stage {s} is missing microbatch {m}: no forward {Action(s, 'F', m)}")
    both = has[_B] & (has[_I] | has[_W])
    if both.any():
        s, m = map(int, np.argwhere(both)[0])
        raise ValueError(
            f"stage {s} microbatch {m} has both a full backward {Action(s, 'B', m)} and a split one"
        )
    lone = has[_I] ^ has[_W]
    if lone.any():
        s, m = map(int, np.argwhere(lone)[0])
        k, other = ("I", "W") if has[_I][s, m] else ("W", "I")
        raise ValueError(f"{Action(s, k, m)} has no matching {Action(s, other, m)}")
    no_bwd = ~(has[_B] | has[_I])
    if no_bwd.any():
        s, m = map(int, np.argwhere(no_bwd)[0])
        raise ValueError(f"stage {s} is missing microbatch {m}: no backward ({Action(s, 'B', m)} or I/W)")


def _check_complete_sparse(actions: tuple[Action, ...], S: int, M: int) -> None:
    """The first error of the dense checks (a duplicate, else the first missing forward) for a schedule
    with fewer actions than (stage, microbatch) pairs, found from the actions alone: a schedule that
    claims 10^9 microbatches in a few actions allocates nothing."""
    seen: dict[tuple[int, int], set[str]] = {}
    for a in actions:
        kinds = seen.setdefault((a.stage, a.microbatch), set())
        if a.kind in kinds:
            raise ValueError(f"duplicate action {a}")
        kinds.add(a.kind)
    for s in range(S):
        # the first microbatch without a forward: at most (forwards of stage s) + 1 tries
        m = 0
        while m < M and "F" in seen.get((s, m), ()):
            m += 1
        if m < M:
            raise ValueError(f"stage {s} is missing microbatch {m}: no forward {Action(s, 'F', m)}")
    raise AssertionError("fewer actions than (stage, microbatch) pairs, yet every forward is there")


def _toposort(actions: tuple[Action, ...], src: np.ndarray, dst: np.ndarray, n: int) -> np.ndarray:
    """Kahn's algorithm; on a cycle, raise naming the actions on it."""
    ptr, idx = _csr(src, dst, n)
    indeg = np.bincount(dst, minlength=n).tolist()
    ptr_l, idx_l = ptr.tolist(), idx.tolist()
    stack = [v for v in range(n) if indeg[v] == 0]
    order = []
    append, pop = order.append, stack.pop
    while stack:
        u = pop()
        append(u)
        for j in range(ptr_l[u], ptr_l[u + 1]):
            v = idx_l[j]
            indeg[v] -= 1
            if indeg[v] == 0:
                stack.append(v)
    if len(order) < n:
        cycle = _find_cycle(src, dst, n, set(order))
        names = " -> ".join(str(actions[v]) for v in cycle)
        raise ValueError(f"deadlock: the schedule has a dependency cycle {names}")
    return np.asarray(order, dtype=np.int64)


def _find_cycle(src: np.ndarray, dst: np.ndarray, n: int, done: set[int]) -> list[int]:
    """A cycle among the nodes Kahn's algorithm could not order (walk predecessors until a repeat)."""
    pptr, pidx = _csr(dst, src, n)
    v = next(i for i in range(n) if i not in done)
    seen: dict[int, int] = {}
    walk = []
    while v not in seen:
        seen[v] = len(walk)
        walk.append(v)
        v = next(int(u) for u in pidx[pptr[v] : pptr[v + 1]] if int(u) not in done)
    cycle = walk[seen[v] :]
    cycle.reverse()  # predecessors were walked: reverse to follow the edges
    return cycle + [cycle[0]]


def _as_durations(dag: DAG, durations) -> np.ndarray:
    def label(i: int) -> str:
        return str(dag.actions[i])

    if isinstance(durations, Mapping):
        values = np.empty(dag.num_actions, dtype=object)
        given = np.zeros(dag.num_actions, dtype=bool)
        for key, value in durations.items():
            name = str(key)
            if name not in dag.index:
                raise ValueError(f"duration given for unknown action {name!r}")
            values[dag.index[name]] = value
            given[dag.index[name]] = True
        missing = np.flatnonzero(~given)
        if len(missing):
            raise ValueError(f"no duration for action {dag.actions[missing[0]]}")
        arr = float_array(values, "duration", label)
    else:
        arr = float_array(durations, "duration", label)
        if arr.shape != (dag.num_actions,):
            raise ValueError(f"durations must have shape ({dag.num_actions},), got {arr.shape}")
    bad = np.flatnonzero(~np.isfinite(arr) | (arr < 0))
    if len(bad):
        i = bad[0]
        raise ValueError(f"duration of {dag.actions[i]} must be finite and >= 0, got {arr[i]}")
    return arr


def simulate(dag: DAG, durations) -> Simulation:
    """List-schedule ``dag`` with ``durations`` (array aligned with ``dag.actions`` or a mapping
    from action name to time). Any time unit works; results use the same unit.

    ValueError when the durations are not finite and >= 0, or so large that the makespan overflows
    float64 (naming the largest duration)."""
    d = _as_durations(dag, durations)
    ptr, idx = dag.preds
    ptr_l, idx_l = ptr.tolist(), idx.tolist()
    d_l = d.tolist()
    end = [0.0] * dag.num_actions
    start = [0.0] * dag.num_actions
    for v in dag.topo.tolist():
        t = 0.0
        for j in range(ptr_l[v], ptr_l[v + 1]):
            e = end[idx_l[j]]
            if e > t:
                t = e
        start[v] = t
        end[v] = t + d_l[v]
    end_arr = np.asarray(end)
    if len(end_arr) and not np.isfinite(end_arr.max()):
        i = int(np.argmax(d))
        raise ValueError(
            f"durations too large: the makespan overflows float64 (largest duration {d[i]:.6g}, of "
            f"{dag.actions[i]}); give the times in a larger unit"
        )
    return Simulation(dag, d, np.asarray(start), end_arr)
