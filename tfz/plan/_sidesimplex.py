"""Primal network simplex with side columns and lexicographic supplies (compiled with numba).

Problem (the dual of the freeze-ratio LP, see :mod:`tfz.plan.flow`)::

    min  cost @ x + scost @ mu   s.t.  A x + G mu = b1 + eps * b2 + eps^2 * b3,   x >= 0, mu >= 0

for an infinitesimal ``eps > 0``: ``A`` is the node-arc incidence matrix of a network (row = node,
+1 at the tail, -1 at the head; the root node's row is dropped) and each side column ``g_s`` of ``G``
has a few nonzeros (``node_coef``) on nodes that belong to it (``node_side``), at most one side
column per node. Flows are triples (the coefficients of 1, eps, eps^2) compared lexicographically,
so the final basis is optimal for every small enough eps: its potentials are the lexicographic
optimum of the primal (minimise the b1 objective, then the b2 one). ``b3`` is a perturbation chosen
so that every basic variable of the start basis has a positive third component; with it, no pivot
is degenerate in all three components and the simplex cannot cycle (the network simplex's strongly
feasible trees are the special case of this for a single tree).

Basis: ``K`` basic side columns and a forest of ``N - 1 - K`` arcs with ``K + 1`` trees; the tree
holding the root node is tree 0. Node potentials are ``pi = pi_rel + theta[tree]``: ``pi_rel`` makes
every forest arc's reduced cost 0 and the K tree offsets ``theta`` (``theta[0] = 0``) make the basic
side columns' reduced costs 0, a K x K system with matrix ``Q[j, i] = sum of g_{side i} over tree
j``. Flows solve ``Q mu = tree sums of b`` and then subtree sums of ``b - G mu``.

A pivot whose entering arc joins two nodes of one tree leaves the side columns unchanged and costs
O(cycle + moved subtree), as in a plain network simplex. Any other pivot changes ``mu`` and with it
flows on arcs anywhere; its direction takes one pass over a topological order of the forest that
is kept valid by appending moved subtrees (rebuilt when the holes reach a quarter of it).
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["side_simplex"]

_NONE = -(1 << 40)


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
def _collect(r, first_child, next_sib, stack, out):
    """Preorder of the subtree of r into out; returns its size."""
    top = 1
    stack[0] = r
    cnt = 0
    while top > 0:
        top -= 1
        u = stack[top]
        out[cnt] = u
        cnt += 1
        c = first_child[u]
        while c >= 0:
            stack[top] = c
            top += 1
            c = next_sib[c]
    return cnt


@njit(cache=True, nogil=True)
def _rebuild_order(parent, pred, up, first_child, next_sib, stack, order, pos, ppar, parc, pup):
    """A fresh preorder of every tree (node 0's first) with, per position, the parent's position,
    the arc to the parent and its direction; returns its length (N)."""
    n = _collect(0, first_child, next_sib, stack, order)
    for r in range(1, len(parent)):
        if parent[r] < 0:
            n += _collect(r, first_child, next_sib, stack, order[n:])
    for i in range(n):
        pos[order[i]] = i
    for i in range(n):
        u = order[i]
        p = parent[u]
        ppar[i] = pos[p] if p >= 0 else -1
        parc[i] = pred[u]
        pup[i] = up[u]
    return n


@njit(cache=True, nogil=True)
def _append(buf, cnt, parent, pred, up, order, pos, ppar, parc, pup, ord_len):
    """Move the nodes buf[:cnt] (a re-hung subtree in preorder) to the end of the order."""
    for idx in range(cnt):
        u = buf[idx]
        order[pos[u]] = -1
        ppar[pos[u]] = -1
        order[ord_len] = u
        pos[u] = ord_len
        p = parent[u]
        ppar[ord_len] = pos[p] if p >= 0 else -1
        parc[ord_len] = pred[u]
        pup[ord_len] = up[u]
        ord_len += 1
    return ord_len


@njit(cache=True, nogil=True)
def _flip_side(s, sptr, snode, scoef, node_coef, scost, salt, Qfull, c0, MU, sflip):
    """Swap side column s for its negation (cost ``salt[s]``) or back."""
    for e in range(sptr[s], sptr[s + 1]):
        scoef[e] = -scoef[e]
        node_coef[snode[e]] = -node_coef[snode[e]]
    for j in range(Qfull.shape[0]):
        Qfull[j, s] = -Qfull[j, s]
    c0[s] = -c0[s]
    c = scost[s]
    scost[s] = salt[s]
    salt[s] = c
    for q in range(3):
        MU[s, q] = -MU[s, q]
    sflip[s] = not sflip[s]


@njit(cache=True, nogil=True)
def _ratio(v1, v2, v3, dd, f1, f2):
    """Lexicographic step (r1, r2, r3) at which a value (v1, v2, v3) falling at rate dd > 0 hits 0;
    components within the tolerances f1, f2 of 0 count as 0 (and clamp what follows)."""
    if v1 > f1:
        return v1 / dd, v2 / dd, v3 / dd
    if v2 > f2:
        return 0.0, v2 / dd, v3 / dd
    return 0.0, 0.0, max(v3, 0.0) / dd


@njit(cache=True, nogil=True)
def _cmp(a, b):
    """-1, 0, 1: a below, within a relative 1e-11 of, or above b (steps are >= 0)."""
    if b == np.inf:
        return -1 if a < b else 0
    e = 1e-11 * max(a, b)
    if a < b - e:
        return -1
    if a > b + e:
        return 1
    return 0


@njit(cache=True, nogil=True)
def _lex_cmp(a1, a2, a3, b1, b2, b3):
    """Lexicographic comparison of two steps; near-ties in a component defer to the next one, so
    that of two values reaching 0 together the one that stays lexicographically >= 0 remains."""
    c = _cmp(a1, b1)
    if c != 0:
        return c
    c = _cmp(a2, b2)
    if c != 0:
        return c
    return _cmp(a3, b3)


@njit(cache=True, nogil=True)
def _lex_negative(v1, v2, f1, f2):
    return v1 < -f1 or (v1 <= f1 and v2 < -f2)


@njit(cache=True, nogil=True)
def _compact(basic, K, slots, Qfull, Q):
    """Q[j, i] = Qfull[slots[j], basic[i]] (K x K) and its inverse; ok False when singular."""
    for j in range(K):
        for i in range(K):
            Q[j, i] = Qfull[slots[j], basic[i]]
    if K == 0:
        return np.zeros((0, 0)), True
    Qk = Q[:K, :K].copy()
    for j in range(K):
        for i in range(K):
            if not np.isfinite(Qk[j, i]):
                return np.zeros((K, K)), False
    inv = np.linalg.inv(Qk)  # raises LinAlgError when exactly singular
    for j in range(K):
        for i in range(K):
            if not abs(inv[j, i]) < 1e12:
                return inv, False
    return inv, True


@njit(cache=True, nogil=True)
def _perturbation(N, tail, head, parent, pred, sptr, snode, scoef, side_pos, b):
    """b[:, 2] = B x3 for x3 in [1, 2) on every basic arc and side column (a fixed pattern)."""
    for u in range(N):
        b[u, 2] = 0.0
    for u in range(N):
        if parent[u] >= 0:
            a = pred[u]
            v = 1.0 + (a * 0.6180339887498949) % 1.0
            b[tail[a], 2] += v
            b[head[a], 2] -= v
    for s in range(len(side_pos)):
        if side_pos[s] >= 0:
            v = 1.0 + (s * 0.7548776662466927) % 1.0
            for e in range(sptr[s], sptr[s + 1]):
                b[snode[e], 2] += v * scoef[e]


@njit(cache=True, nogil=True)
def side_simplex(
    tail,
    head,
    cost,
    partner,
    m_price,
    sptr,
    snode,
    scoef,
    snorm,
    scost,
    salt,
    node_side,
    node_coef,
    b,
    parent,
    pred,
    side_basic,
    side_flip,
    price_sides,
    tol,
    max_iter,
    block,
    X,
    MU,
    pi,
    stats,
):
    """Run to lexicographic optimality from the basis (parent, pred, side_basic), updated in place.

    ``b``: float [N, 3] supplies; its last column is overwritten with the perturbation. ``parent[u]``
    is -1 for tree roots (node 0 must be one), ``pred[u]`` the forest arc to the parent. Arcs
    ``[0, m_price)`` may enter; ``partner[a]`` is the reverse of arc a (or -1): a forest arc whose
    refreshed flow is negative is replaced by it (warm starts after the data changed). ``scoef``,
    ``node_coef``, ``scost`` and ``salt`` are modified: a basic side column whose refreshed value is
    negative is swapped for its negation with cost ``salt`` and back when it leaves;
    ``side_flip`` [S] gives the start's negated columns and returns the final ones.
    ``price_sides``: whether nonbasic side columns may enter. ``tol`` = (reduced cost, first flow,
    second flow tolerances, side columns that may enter before the arcs are optimal again).
    ``block``: arcs priced per block (the best of the first block with a candidate enters).
    On return ``X`` [m, 3] and ``MU`` [S, 3] hold the basic solution and ``pi`` [N] the potentials.
    ``stats``: pivots, pivots through side columns, refreshes, basic side columns, touched nodes,
    priced arcs, pivots degenerate in the first two components, swapped basic variables.
    Returns the status: 0 optimal, 1 unbounded, 2 iteration limit, 3 infeasible start, 4 singular
    side-column matrix, 5 flows infeasible after a refresh, 6 inconsistent forest, 7 invalid start
    basis.
    """
    m = len(tail)
    N = len(parent)
    S = len(scost)
    rc_tol, f1, f2 = tol[0], tol[1], tol[2]
    max_side_entries = int(tol[3])

    # ---- forest structures
    first_child = np.full(N, -1, np.int64)
    next_sib = np.full(N, -1, np.int64)
    prev_sib = np.full(N, -1, np.int64)
    up = np.zeros(N, np.bool_)
    in_tree = np.zeros(m, np.bool_)
    depth = np.zeros(N, np.int64)
    tid = np.zeros(N, np.int64)
    pi_rel = np.zeros(N)
    if parent[0] >= 0:
        return 7
    for u in range(N):
        if parent[u] >= 0:
            a = pred[u]
            if (
                a < 0
                or a >= m
                or in_tree[a]
                or not ((tail[a] == u and head[a] == parent[u]) or (head[a] == u and tail[a] == parent[u]))
            ):
                return 7
            _link(u, parent[u], first_child, next_sib, prev_sib)
            in_tree[a] = True
            up[u] = tail[a] == u
    # tree slots: 0 is the root tree, 1 .. S + 1 the others (a pivot may cut before it links)
    slot_root = np.full(S + 2, -1, np.int64)
    slot_size = np.zeros(S + 2, np.int64)
    free_slots = np.empty(S + 2, np.int64)
    n_free = 0
    stack = np.empty(N, np.int64)
    buf = np.empty(N, np.int64)
    seen = 0
    nslot = 1
    slot_root[0] = 0
    for r in range(N):
        if parent[r] >= 0:
            continue
        if r == 0:
            slot = 0
        else:
            if nslot > S:
                return 7
            slot = nslot
            nslot += 1
            slot_root[slot] = r
        cnt = _collect(r, first_child, next_sib, stack, buf)
        seen += cnt
        slot_size[slot] = cnt
        for idx in range(cnt):
            u = buf[idx]
            tid[u] = slot
            if u != r:
                p = parent[u]
                depth[u] = depth[p] + 1
                a = pred[u]
                if up[u]:
                    pi_rel[u] = cost[a] + pi_rel[p]
                else:
                    pi_rel[u] = pi_rel[p] - cost[a]
    if seen != N:  # a cycle in the parent pointers
        return 7
    for s in range(nslot, S + 2):
        free_slots[n_free] = s
        n_free += 1
    # topological order of the forest with per-position parent, arc and direction
    cap_ord = N + max(N // 4, 1024)
    order = np.empty(cap_ord, np.int64)
    pos = np.full(N, -1, np.int64)
    ppar = np.full(cap_ord, -1, np.int64)
    parc = np.full(cap_ord, -1, np.int64)
    pup = np.zeros(cap_ord, np.bool_)
    ord_len = _rebuild_order(parent, pred, up, first_child, next_sib, stack, order, pos, ppar, parc, pup)
    order_valid = True
    # active non-root slots and basic side columns, both compact
    slots = np.empty(S + 2, np.int64)
    slot_pos = np.full(S + 2, -1, np.int64)
    K = 0
    for s in range(1, nslot):
        slots[K] = s
        slot_pos[s] = K
        K += 1
    basic = np.empty(S + 2, np.int64)
    side_pos = np.full(S, -1, np.int64)
    nb = 0
    for s in range(S):
        if side_basic[s]:
            basic[nb] = s
            side_pos[s] = nb
            nb += 1
    if nb != K:
        return 7
    Qfull = np.zeros((S + 2, S))
    c0 = np.zeros(S)
    for u in range(N):
        s = node_side[u]
        if s >= 0:
            Qfull[tid[u], s] += node_coef[u]
            c0[s] += node_coef[u] * pi_rel[u]
    Q = np.zeros((S + 2, S + 2))
    Qinv, ok = _compact(basic, K, slots, Qfull, Q)
    if not ok:
        return 4
    theta = np.zeros(S + 2)
    sflip = np.zeros(S, np.bool_)
    for s in range(S):
        if side_flip[s]:
            if not side_basic[s]:
                return 7
            _flip_side(s, sptr, snode, scoef, node_coef, scost, salt, Qfull, c0, MU, sflip)
    Qinv, ok = _compact(basic, K, slots, Qfull, Q)
    if not ok:
        return 4
    vec = np.zeros((N, 3))
    dpos = np.zeros(cap_ord)
    agg = np.zeros((S + 2, 3))
    dmu = np.zeros(S + 2)
    _perturbation(N, tail, head, parent, pred, sptr, snode, scoef, side_pos, b)

    it = 0
    status = -1
    reperturb = False
    perturbed = False
    since_opt = 0
    flip_rounds = 0
    fresh = False
    need_refresh = True
    next_arc = 0
    while True:
        if need_refresh:
            # flows from scratch: tree sums, mu = Q^-1 agg, subtree sums of b - G mu
            stats[2] += 1
            if reperturb:
                _perturbation(N, tail, head, parent, pred, sptr, snode, scoef, side_pos, b)
                reperturb = False
                perturbed = True
            if not order_valid:
                ord_len = _rebuild_order(
                    parent, pred, up, first_child, next_sib, stack, order, pos, ppar, parc, pup
                )
                order_valid = True
            vec[:, :] = b
            agg[:, :] = 0.0
            for u in range(N):
                t = tid[u]
                if t > 0:
                    for q in range(3):
                        agg[slot_pos[t], q] += b[u, q]
            MU[:, :] = 0.0
            for i in range(K):
                s = basic[i]
                for q in range(3):
                    acc = 0.0
                    for j in range(K):
                        acc += Qinv[i, j] * agg[j, q]
                    MU[s, q] = acc
                    for e in range(sptr[s], sptr[s + 1]):
                        vec[snode[e], q] -= acc * scoef[e]
            X[:, :] = 0.0
            for p_ in range(ord_len - 1, -1, -1):
                u = order[p_]
                if u < 0 or parent[u] < 0:
                    continue
                p = parent[u]
                a = pred[u]
                sg = 1.0 if up[u] else -1.0
                for q in range(3):
                    vec[p, q] += vec[u, q]
                    X[a, q] = sg * vec[u, q]
            # potentials from scratch
            c0[:] = 0.0
            for p_ in range(ord_len):
                u = order[p_]
                if u < 0:
                    continue
                p = parent[u]
                if p < 0:
                    pi_rel[u] = 0.0
                else:
                    a = pred[u]
                    if up[u]:
                        pi_rel[u] = cost[a] + pi_rel[p]
                    else:
                        pi_rel[u] = pi_rel[p] - cost[a]
                s = node_side[u]
                if s >= 0:
                    c0[s] += node_coef[u] * pi_rel[u]
            # feasibility of the refreshed flows: a forest arc or side column with a negative
            # value is swapped for its partner (same position in the basis, value negated)
            infeas = False
            nflip = 0
            for u in range(N):
                if parent[u] >= 0:
                    a = pred[u]
                    if _lex_negative(X[a, 0], X[a, 1], f1, f2):
                        c = partner[a]
                        if c < 0 or flip_rounds >= 3:
                            infeas = True
                            continue
                        in_tree[a] = False
                        in_tree[c] = True
                        pred[u] = c
                        up[u] = not up[u]
                        for q in range(3):
                            X[c, q] = -X[a, q]
                            X[a, q] = 0.0
                        parc[pos[u]] = c
                        pup[pos[u]] = up[u]
                        nflip += 1
            for i in range(K):
                s = basic[i]
                if _lex_negative(MU[s, 0], MU[s, 1], f1, f2):
                    if sflip[s] or flip_rounds >= 3:
                        infeas = True
                        continue
                    _flip_side(s, sptr, snode, scoef, node_coef, scost, salt, Qfull, c0, MU, sflip)
                    nflip += 1
            if infeas:
                status = 3 if it == 0 else 5
                break
            if nflip > 0:
                # new basis: new potentials, and a perturbation that is positive on it again
                stats[7] += nflip
                flip_rounds += 1
                Qinv, ok = _compact(basic, K, slots, Qfull, Q)
                if not ok:
                    status = 4
                    break
                _perturbation(N, tail, head, parent, pred, sptr, snode, scoef, side_pos, b)
                continue
            need_refresh = False
            fresh = True
        # theta: Q^T theta = scost - c0 over the basic side columns
        for j in range(K):
            acc = 0.0
            for i in range(K):
                s = basic[i]
                acc += Qinv[i, j] * (scost[s] - c0[s])
            theta[slots[j]] = acc
        theta[0] = 0.0
        if it >= max_iter:
            break
        # ---- pricing: side columns (reduced cost over their norm) compete with a block of arcs,
        # but at most max_side_entries of them enter between two points where no arc can
        enter = -1
        best = -rc_tol
        if price_sides and since_opt < max_side_entries:
            for s in range(S):
                if side_pos[s] >= 0:
                    continue
                rc = scost[s] - c0[s]
                for j in range(K):
                    rc -= Qfull[slots[j], s] * theta[slots[j]]
                rc /= snorm[s]
                if rc < best:
                    best = rc
                    enter = m + s
        a = next_arc
        cnt = 0
        checked = 0
        while checked < m_price:
            if not in_tree[a]:
                t = tail[a]
                h = head[a]
                rc = cost[a] - pi_rel[t] - theta[tid[t]] + pi_rel[h] + theta[tid[h]]
                if rc < best:
                    best = rc
                    enter = a
            a += 1
            if a == m_price:
                a = 0
            checked += 1
            cnt += 1
            if cnt == block:
                if enter >= 0:
                    break
                cnt = 0
        if price_sides and enter < 0:
            since_opt = 0
            for s in range(S):
                if side_pos[s] >= 0:
                    continue
                rc = scost[s] - c0[s]
                for j in range(K):
                    rc -= Qfull[slots[j], s] * theta[slots[j]]
                rc /= snorm[s]
                if rc < best:
                    best = rc
                    enter = m + s
        next_arc = a
        stats[5] += checked
        if enter >= m:
            since_opt += 1
        if enter < 0:
            if fresh:
                break
            need_refresh = True
            continue
        fresh = False
        flip_rounds = 0
        it += 1
        stats[0] += 1

        if enter < m and tid[tail[enter]] == tid[head[enter]]:
            # ---- pivot inside one tree: the cycle of the entering arc
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
            t1 = np.inf
            t2 = np.inf
            t3 = np.inf
            u_out = -1
            side_first = True
            # flow decreases on arcs against the cycle (entering arc: first -> second)
            u = first
            while u != join:
                if up[u]:
                    e = pred[u]
                    r1, r2, r3 = _ratio(X[e, 0], X[e, 1], X[e, 2], 1.0, f1, f2)
                    if _lex_cmp(r1, r2, r3, t1, t2, t3) < 0:
                        t1, t2, t3, u_out, side_first = r1, r2, r3, u, True
                u = parent[u]
            u = second
            while u != join:
                if not up[u]:
                    e = pred[u]
                    r1, r2, r3 = _ratio(X[e, 0], X[e, 1], X[e, 2], 1.0, f1, f2)
                    if _lex_cmp(r1, r2, r3, t1, t2, t3) <= 0:
                        t1, t2, t3, u_out, side_first = r1, r2, r3, u, False
                u = parent[u]
            if u_out < 0:
                status = 1
                break
            if t1 == 0.0 and t2 == 0.0:
                stats[6] += 1
                if t3 == 0.0 and not perturbed:
                    # a value within the tolerances of 0 with a negative third component: renew
                    # the perturbation on the current basis instead of a fully degenerate pivot
                    it -= 1
                    stats[0] -= 1
                    need_refresh = True
                    reperturb = True
                    continue
            perturbed = False
            X[enter, 0] += t1
            X[enter, 1] += t2
            X[enter, 2] += t3
            u = first
            while u != join:
                e = pred[u]
                sg = -1.0 if up[u] else 1.0
                X[e, 0] += sg * t1
                X[e, 1] += sg * t2
                X[e, 2] += sg * t3
                u = parent[u]
            u = second
            while u != join:
                e = pred[u]
                sg = 1.0 if up[u] else -1.0
                X[e, 0] += sg * t1
                X[e, 1] += sg * t2
                X[e, 2] += sg * t3
                u = parent[u]
            if side_first:
                u_in = first
                v_in = second
            else:
                u_in = second
                v_in = first
            leave = pred[u_out]
            in_tree[leave] = False
            in_tree[enter] = True
            for q in range(3):
                X[leave, q] = 0.0
            if tail[enter] == u_in:
                sigma = cost[enter] + pi_rel[head[enter]] - pi_rel[u_in]
            else:
                sigma = pi_rel[tail[enter]] - cost[enter] - pi_rel[u_in]
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
            cnt = _collect(u_in, first_child, next_sib, stack, buf)
            for idx in range(cnt):
                u = buf[idx]
                depth[u] = depth[parent[u]] + 1
                pi_rel[u] += sigma
                s = node_side[u]
                if s >= 0:
                    c0[s] += node_coef[u] * sigma
            if not (price_sides or K > 0):
                order_valid = False  # no pivot will need it before the next refresh
            elif ord_len + cnt > cap_ord:
                ord_len = _rebuild_order(
                    parent, pred, up, first_child, next_sib, stack, order, pos, ppar, parc, pup
                )
            else:
                ord_len = _append(buf, cnt, parent, pred, up, order, pos, ppar, parc, pup, ord_len)
            continue

        # ---- pivot through the side columns: the direction needs one pass over the forest
        stats[1] += 1
        if not order_valid:
            ord_len = _rebuild_order(
                parent, pred, up, first_child, next_sib, stack, order, pos, ppar, parc, pup
            )
            order_valid = True
        for j in range(K):
            agg[j, 0] = 0.0
        if enter < m:
            t = tid[tail[enter]]
            if t > 0:
                agg[slot_pos[t], 0] += 1.0
            t = tid[head[enter]]
            if t > 0:
                agg[slot_pos[t], 0] -= 1.0
            dpos[pos[tail[enter]]] -= 1.0
            dpos[pos[head[enter]]] += 1.0
        else:
            s = enter - m
            for e in range(sptr[s], sptr[s + 1]):
                t = tid[snode[e]]
                if t > 0:
                    agg[slot_pos[t], 0] += scoef[e]
                dpos[pos[snode[e]]] -= scoef[e]
        for i in range(K):
            acc = 0.0
            for j in range(K):
                acc -= Qinv[i, j] * agg[j, 0]
            dmu[i] = acc
            if acc != 0.0:
                s = basic[i]
                for e in range(sptr[s], sptr[s + 1]):
                    dpos[pos[snode[e]]] -= acc * scoef[e]
        # subtree sums in reverse topological order, fused with the ratio test
        t1 = np.inf
        t2 = np.inf
        t3 = np.inf
        leave_node = _NONE
        leave_d = 0.0
        nnz = 0
        for p_ in range(ord_len - 1, -1, -1):
            d = dpos[p_]
            if d == 0.0:
                continue
            buf[nnz] = p_
            nnz += 1
            qq = ppar[p_]
            if qq < 0:
                continue
            dpos[qq] += d
            if pup[p_]:
                d = -d
            if d > 1e-7:  # the arc's flow falls at rate d
                a = parc[p_]
                if t1 == 0.0 and (X[a, 0] > f1 or (t2 == 0.0 and X[a, 1] > f2)):
                    continue  # cannot beat a step that is already 0 in those components
                r1, r2, r3 = _ratio(X[a, 0], X[a, 1], X[a, 2], d, f1, f2)
                c = _lex_cmp(r1, r2, r3, t1, t2, t3)
                if c < 0 or (c == 0 and d > leave_d):
                    t1, t2, t3, leave_node, leave_d = r1, r2, r3, order[p_], d
        for i in range(K):
            d = -dmu[i]
            if d > 1e-7:
                s = basic[i]
                r1, r2, r3 = _ratio(MU[s, 0], MU[s, 1], MU[s, 2], d, f1, f2)
                c = _lex_cmp(r1, r2, r3, t1, t2, t3)
                if c < 0 or (c == 0 and d > leave_d):
                    t1, t2, t3, leave_node, leave_d = r1, r2, r3, -(i + 1), d
        if leave_node == _NONE:
            status = 1
            break
        if t1 == 0.0 and t2 == 0.0:
            stats[6] += 1
            if t3 == 0.0 and not perturbed:
                for idx in range(nnz):
                    dpos[buf[idx]] = 0.0
                it -= 1
                stats[0] -= 1
                stats[1] -= 1
                need_refresh = True
                reperturb = True
                continue
        perturbed = False
        stats[4] += nnz
        # apply the step to the arcs with a nonzero direction
        for idx in range(nnz):
            p_ = buf[idx]
            d = dpos[p_]
            dpos[p_] = 0.0
            if ppar[p_] < 0:
                continue
            a = parc[p_]
            if not pup[p_]:
                d = -d
            X[a, 0] += t1 * d
            X[a, 1] += t2 * d
            X[a, 2] += t3 * d
        for i in range(K):
            s = basic[i]
            MU[s, 0] += t1 * dmu[i]
            MU[s, 1] += t2 * dmu[i]
            MU[s, 2] += t3 * dmu[i]
        if enter < m:
            X[enter, 0] = t1
            X[enter, 1] = t2
            X[enter, 2] = t3
            s_in = -1
        else:
            s_in = enter - m
            MU[s_in, 0] = t1
            MU[s_in, 1] = t2
            MU[s_in, 2] = t3
        # ---- basis change
        if leave_node >= 0:
            # cut the arc above leave_node: its subtree becomes a new tree
            u = leave_node
            a = pred[u]
            for q in range(3):
                X[a, q] = 0.0
            in_tree[a] = False
            old = tid[u]
            _unlink(u, parent[u], first_child, next_sib, prev_sib)
            parent[u] = -1
            pred[u] = -1
            ppar[pos[u]] = -1
            n_free -= 1
            ns = free_slots[n_free]
            slot_root[ns] = u
            cnt = _collect(u, first_child, next_sib, stack, buf)
            slot_size[ns] = cnt
            slot_size[old] -= cnt
            for idx in range(cnt):
                z = buf[idx]
                tid[z] = ns
                s = node_side[z]
                if s >= 0:
                    Qfull[old, s] -= node_coef[z]
                    Qfull[ns, s] += node_coef[z]
            slots[K] = ns
            slot_pos[ns] = K
            if s_in >= 0:
                basic[K] = s_in
                side_pos[s_in] = K
            K += 1
        else:
            # a side column leaves: the entering one takes its place, or the last one does
            i = -leave_node - 1
            s_out = basic[i]
            for q in range(3):
                MU[s_out, q] = 0.0
            side_pos[s_out] = -1
            if sflip[s_out]:
                _flip_side(s_out, sptr, snode, scoef, node_coef, scost, salt, Qfull, c0, MU, sflip)
            if s_in >= 0:
                basic[i] = s_in
                side_pos[s_in] = i
            else:
                last = basic[K - 1]
                basic[i] = last
                if last != s_out:
                    side_pos[last] = i
        if enter < m:
            # link the entering arc: reroot the smaller of its trees (never the root tree) at its
            # endpoint and hang it below the other endpoint; it takes the place of that tree
            x = tail[enter]
            y = head[enter]
            tx = tid[x]
            ty = tid[y]
            if tx == ty:
                status = 6
                break
            if ty == 0 or (tx != 0 and slot_size[tx] <= slot_size[ty]):
                z, w, tz = x, y, tx
            else:
                z, w, tz = y, x, ty
            u = z
            np_ = w
            npred = enter
            while u >= 0:
                p = parent[u]
                a = pred[u]
                if p >= 0:
                    _unlink(u, p, first_child, next_sib, prev_sib)
                parent[u] = np_
                pred[u] = npred
                up[u] = tail[npred] == u
                _link(u, np_, first_child, next_sib, prev_sib)
                np_ = u
                npred = a
                u = p
            in_tree[enter] = True
            if up[z]:
                sigma = cost[enter] + pi_rel[w] - pi_rel[z]
            else:
                sigma = pi_rel[w] - cost[enter] - pi_rel[z]
            tw = tid[w]
            cnt = _collect(z, first_child, next_sib, stack, buf)
            if ord_len + cnt > cap_ord:
                ord_len = _rebuild_order(
                    parent, pred, up, first_child, next_sib, stack, order, pos, ppar, parc, pup
                )
            else:
                ord_len = _append(buf, cnt, parent, pred, up, order, pos, ppar, parc, pup, ord_len)
            for idx in range(cnt):
                u = buf[idx]
                depth[u] = depth[parent[u]] + 1
                pi_rel[u] += sigma
                tid[u] = tw
                s = node_side[u]
                if s >= 0:
                    c0[s] += node_coef[u] * sigma
                    Qfull[tz, s] -= node_coef[u]
                    Qfull[tw, s] += node_coef[u]
            slot_size[tw] += cnt
            slot_size[tz] = 0
            j = slot_pos[tz]
            K -= 1
            slots[j] = slots[K]
            slot_pos[slots[j]] = j
            slot_pos[tz] = -1
            slot_root[tz] = -1
            free_slots[n_free] = tz
            n_free += 1
        Qinv, ok = _compact(basic, K, slots, Qfull, Q)
        if not ok:
            status = 4
            break
    # ---- potentials and the basic side columns (also after a failure: the basis is valid)
    if status < 0:
        status = 0 if it < max_iter else 2
    for u in range(N):
        pi[u] = pi_rel[u] + theta[tid[u]]
    for s in range(S):
        side_basic[s] = side_pos[s] >= 0
        side_flip[s] = sflip[s]
    stats[3] = K
    return status
