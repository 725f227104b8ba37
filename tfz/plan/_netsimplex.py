"""Primal network simplex for uncapacitated transshipment problems (compiled with numba).

``min sum_a cost[a] x[a]  s.t.  outflow(i) - inflow(i) = supply[i] (i != root), x >= 0``, started from
a feasible spanning tree rooted at ``root``. Potentials ``pi`` satisfy ``cost[a] - pi[tail] + pi[head]
= 0`` on tree arcs and, at the optimum, ``>= -tol`` on all arcs; they are the dual solution.

The tree is kept as parent / predecessor-arc / direction arrays plus doubly linked child lists. The
leaving arc follows the strongly feasible tree rule (the last blocking arc of the cycle, counted from
the join node), which prevents cycling on degenerate pivots; entering arcs come from block search.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["network_simplex", "tree_potentials"]


@njit(cache=True, nogil=True)
def _link(u, p, first_child, next_sib, prev_sib):
    f = first_child[p]
    next_sib[u] = f
    prev_sib[u] = -1
    if f >= 0:
        prev_sib[f] = u
    first_child[p] = u


@njit(cache=True, nogil=True)
def _unlink(u, p, first_child, next_sib, prev_sib):
    a, b = prev_sib[u], next_sib[u]
    if a >= 0:
        next_sib[a] = b
    else:
        first_child[p] = b
    if b >= 0:
        prev_sib[b] = a


@njit(cache=True, nogil=True)
def tree_potentials(tail, head, cost, parent, pred, order, pi):
    """pi along ``order`` (parents before children; order[0] is the root, pi[root] kept)."""
    for idx in range(1, len(order)):
        u = order[idx]
        a = pred[u]
        if tail[a] == u:  # arc u -> parent: pi[u] = cost + pi[parent]
            pi[u] = cost[a] + pi[parent[u]]
        else:
            pi[u] = pi[parent[u]] - cost[a]


@njit(cache=True, nogil=True)
def network_simplex(tail, head, cost, root, parent, pred, flow, pi, tol, max_iter):
    """Run to optimality in place; returns (status, iterations): 0 optimal, 1 unbounded, 2 limit."""
    m = len(tail)
    N = len(parent)
    first_child = np.full(N, -1, np.int64)
    next_sib = np.full(N, -1, np.int64)
    prev_sib = np.full(N, -1, np.int64)
    depth = np.zeros(N, np.int64)
    in_tree = np.zeros(m, np.bool_)
    up = np.zeros(N, np.bool_)
    for u in range(N):
        if u != root:
            _link(u, parent[u], first_child, next_sib, prev_sib)
            in_tree[pred[u]] = True
            up[u] = tail[pred[u]] == u
    # depths by DFS from the root
    stack = np.empty(N, np.int64)
    top = 0
    stack[0] = root
    top = 1
    while top > 0:
        top -= 1
        u = stack[top]
        c = first_child[u]
        while c >= 0:
            depth[c] = depth[u] + 1
            stack[top] = c
            top += 1
            c = next_sib[c]

    block = max(int(np.sqrt(m)), 64)
    next_arc = 0
    it = 0
    fresh = False
    while it < max_iter:
        # entering arc: most negative reduced cost within the first block that has one
        best = -tol
        enter = -1
        a = next_arc
        cnt = 0
        checked = 0
        while checked < m:
            if not in_tree[a]:
                rc = cost[a] - pi[tail[a]] + pi[head[a]]
                if rc < best:
                    best = rc
                    enter = a
            a += 1
            if a == m:
                a = 0
            checked += 1
            cnt += 1
            if cnt == block:
                if enter >= 0:
                    break
                cnt = 0
        if enter < 0:
            if fresh:
                return 0, it
            # recompute potentials exactly from the tree (no drift), then price again
            top = 0
            c = first_child[root]
            while c >= 0:
                stack[top] = c
                top += 1
                c = next_sib[c]
            while top > 0:
                top -= 1
                u = stack[top]
                e = pred[u]
                if up[u]:
                    pi[u] = cost[e] + pi[parent[u]]
                else:
                    pi[u] = pi[parent[u]] - cost[e]
                c = first_child[u]
                while c >= 0:
                    stack[top] = c
                    top += 1
                    c = next_sib[c]
            fresh = True
            continue
        fresh = False
        next_arc = a

        first = tail[enter]
        second = head[enter]
        u = first
        v = second
        while u != v:
            if depth[u] > depth[v]:
                u = parent[u]
            elif depth[v] > depth[u]:
                v = parent[v]
            else:
                u = parent[u]
                v = parent[v]
        join = u
        # leaving arc: flow decreases on arcs traversed against the cycle (enter: first -> second)
        delta = np.inf
        u_out = -1
        result = 0
        u = first
        while u != join:
            if up[u]:
                d = flow[pred[u]]
                if d < delta:
                    delta = d
                    u_out = u
                    result = 1
            u = parent[u]
        u = second
        while u != join:
            if not up[u]:
                d = flow[pred[u]]
                if d <= delta:
                    delta = d
                    u_out = u
                    result = 2
            u = parent[u]
        if result == 0:
            return 1, it
        if delta > 0:
            flow[enter] += delta
            u = first
            while u != join:
                if up[u]:
                    flow[pred[u]] -= delta
                else:
                    flow[pred[u]] += delta
                u = parent[u]
            u = second
            while u != join:
                if up[u]:
                    flow[pred[u]] += delta
                else:
                    flow[pred[u]] -= delta
                u = parent[u]
        if result == 1:
            u_in = first
            v_in = second
        else:
            u_in = second
            v_in = first
        in_tree[pred[u_out]] = False
        in_tree[enter] = True
        flow[pred[u_out]] = 0.0
        if tail[enter] == u_in:
            sigma = cost[enter] + pi[head[enter]] - pi[u_in]
        else:
            sigma = pi[tail[enter]] - cost[enter] - pi[u_in]
        # re-hang the stem u_in .. u_out below v_in, reversing it
        new_par = v_in
        new_pred = enter
        new_up = tail[enter] == u_in
        u = u_in
        while True:
            old_par = parent[u]
            old_pred = pred[u]
            old_up = up[u]
            _unlink(u, old_par, first_child, next_sib, prev_sib)
            parent[u] = new_par
            pred[u] = new_pred
            up[u] = new_up
            _link(u, new_par, first_child, next_sib, prev_sib)
            if u == u_out:
                break
            new_par = u
            new_pred = old_pred
            new_up = not old_up
            u = old_par
        # depth and potentials of the re-hung subtree
        depth[u_in] = depth[v_in] + 1
        pi[u_in] += sigma
        top = 0
        c = first_child[u_in]
        while c >= 0:
            stack[top] = c
            top += 1
            c = next_sib[c]
        while top > 0:
            top -= 1
            u = stack[top]
            depth[u] = depth[parent[u]] + 1
            pi[u] += sigma
            c = first_child[u]
            while c >= 0:
                stack[top] = c
                top += 1
                c = next_sib[c]
        it += 1
    return 2, it


@njit(cache=True, nogil=True)
def dual_network_simplex(tail, head, cost, supply, root, parent, pred, flow, pi, ftol, max_iter):
    """Dual network simplex from a dual feasible tree (all reduced costs >= 0) and new supplies.

    Tree flows are recomputed from ``supply``; while a tree arc carries negative flow it leaves,
    and the crossing arc of least reduced cost (in the direction that can carry the flow) enters.
    Returns (status, iterations): 0 optimal, 1 infeasible (no arc can enter), 2 limit.
    """
    m = len(tail)
    N = len(parent)
    first_child = np.full(N, -1, np.int64)
    next_sib = np.full(N, -1, np.int64)
    prev_sib = np.full(N, -1, np.int64)
    depth = np.zeros(N, np.int64)
    in_tree = np.zeros(m, np.bool_)
    up = np.zeros(N, np.bool_)
    for u in range(N):
        if u != root:
            _link(u, parent[u], first_child, next_sib, prev_sib)
            in_tree[pred[u]] = True
            up[u] = tail[pred[u]] == u
    # preorder from the root: depths, potentials, then flows from subtree supplies (reverse order)
    order = np.empty(N, np.int64)
    stack = np.empty(N, np.int64)
    stack[0] = root
    top = 1
    cnt = 0
    while top > 0:
        top -= 1
        u = stack[top]
        order[cnt] = u
        cnt += 1
        if u != root:
            depth[u] = depth[parent[u]] + 1
            e = pred[u]
            if up[u]:
                pi[u] = cost[e] + pi[parent[u]]
            else:
                pi[u] = pi[parent[u]] - cost[e]
        c = first_child[u]
        while c >= 0:
            stack[top] = c
            top += 1
            c = next_sib[c]
    net = supply.copy()
    flow[:] = 0.0
    for idx in range(N - 1, 0, -1):
        u = order[idx]
        net[parent[u]] += net[u]
        flow[pred[u]] = net[u] if up[u] else -net[u]

    mark = np.zeros(N, np.int64)
    it = 0
    while it < max_iter:
        # leaving arc: most negative tree flow
        worst = -ftol
        u_out = -1
        for u in range(N):
            if u != root:
                f = flow[pred[u]]
                if f < worst:
                    worst = f
                    u_out = u
        if u_out < 0:
            return 0, it
        stamp = it + 1
        # mark the subtree X of u_out and remember its nodes
        top = 0
        stack[top] = u_out
        top = 1
        nx = 0
        while top > 0:
            top -= 1
            u = stack[top]
            mark[u] = stamp
            order[nx] = u
            nx += 1
            c = first_child[u]
            while c >= 0:
                stack[top] = c
                top += 1
                c = next_sib[c]
        into = up[u_out]  # X lacks flow: it must come in through an arc Y -> X; else leave X -> Y
        best = np.inf
        enter = -1
        for a in range(m):
            if in_tree[a]:
                continue
            tx = mark[tail[a]] == stamp
            hx = mark[head[a]] == stamp
            if tx == hx:
                continue
            if into != hx:
                continue
            rc = cost[a] - pi[tail[a]] + pi[head[a]]
            if rc < best:
                best = rc
                enter = a
        if enter < 0:
            return 1, it
        theta = best if best > 0 else 0.0
        shift = -theta if into else theta
        for idx in range(nx):
            pi[order[idx]] += shift
        # push -flow[leave] around the cycle of the entering arc
        delta = -flow[pred[u_out]]
        first = tail[enter]
        second = head[enter]
        u = first
        v = second
        while u != v:
            if depth[u] > depth[v]:
                u = parent[u]
            elif depth[v] > depth[u]:
                v = parent[v]
            else:
                u = parent[u]
                v = parent[v]
        join = u
        flow[enter] += delta
        u = first
        while u != join:
            if up[u]:
                flow[pred[u]] -= delta
            else:
                flow[pred[u]] += delta
            u = parent[u]
        u = second
        while u != join:
            if up[u]:
                flow[pred[u]] += delta
            else:
                flow[pred[u]] -= delta
            u = parent[u]
        if mark[head[enter]] == stamp:
            u_in = head[enter]
            v_in = tail[enter]
        else:
            u_in = tail[enter]
            v_in = head[enter]
        in_tree[pred[u_out]] = False
        in_tree[enter] = True
        flow[pred[u_out]] = 0.0
        new_par = v_in
        new_pred = enter
        new_up = tail[enter] == u_in
        u = u_in
        while True:
            old_par = parent[u]
            old_pred = pred[u]
            old_up = up[u]
            _unlink(u, old_par, first_child, next_sib, prev_sib)
            parent[u] = new_par
            pred[u] = new_pred
            up[u] = new_up
            _link(u, new_par, first_child, next_sib, prev_sib)
            if u == u_out:
                break
            new_par = u
            new_pred = old_pred
            new_up = not old_up
            u = old_par
        depth[u_in] = depth[v_in] + 1
        top = 0
        c = first_child[u_in]
        while c >= 0:
            stack[top] = c
            top += 1
            c = next_sib[c]
        while top > 0:
            top -= 1
            u = stack[top]
            depth[u] = depth[parent[u]] + 1
            c = first_child[u]
            while c >= 0:
                stack[top] = c
                top += 1
                c = next_sib[c]
        it += 1
    return 2, it
