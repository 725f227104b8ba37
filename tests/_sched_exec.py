"""An event-driven executor of per-rank programs, independent of ``tfz.dag``.

Each rank runs its next action as soon as the action's inputs exist; the inputs are re-derived here
from what the actions compute: ``sF m`` needs ``(s-1)F m``; ``sB m`` / ``sI m`` need ``sF m`` and the
input gradient from stage s+1 (its B or I of m); ``sW m`` needs ``sI m``.
"""

from __future__ import annotations


def execute(schedule, durations: dict) -> dict | None:
    """End time of every action, or None when the ranks deadlock (nobody can make progress)."""
    last = schedule.num_stages - 1
    done: dict = {}
    pos = [0] * schedule.num_ranks
    free = [0.0] * schedule.num_ranks

    def grad_from(stage, m):
        for kind in ("B", "I"):
            key = (stage, kind, m)
            if key in done:
                return done[key]
        return None

    def ready_time(a):
        s, k, m = a
        if k == "F":
            deps = [done.get((s - 1, "F", m))] if s > 0 else []
        elif k in "BI":
            deps = [done.get((s, "F", m))]
            if s < last:
                deps.append(grad_from(s + 1, m))
        else:
            deps = [done.get((s, "I", m))]
        if any(d is None for d in deps):
            return None
        return max(deps, default=0.0)

    remaining = schedule.num_actions
    while remaining:
        progressed = False
        for r, order in enumerate(schedule.orders):
            while pos[r] < len(order):
                a = order[pos[r]]
                t = ready_time(a)
                if t is None:
                    break
                start = max(t, free[r])
                done[tuple(a)] = free[r] = start + durations[a]
                pos[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            return None
    return done
