"""What a plan keeps for a warm re-plan (``solve(..., warm_start=plan)``): one type per solver path.

A warm start is used only when its ``signature`` matches the new problem's structure (same DAG, same
freezable actions, same cappable stages); otherwise the solve starts cold. ``Plan.to_dict`` does not
store it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

__all__ = ["FlowBasis", "FlowWarmState", "HighsWarmState", "WarmState"]


@dataclass(eq=False)
class FlowBasis:
    """A basis of the flow problem (:class:`tfz.plan.flow.FlowProblem`), updated in place by its
    ``optimize``."""

    parent: np.ndarray
    """int64 [N]: parent of each node in the forest, -1 at tree roots."""
    pred: np.ndarray
    """int64 [N]: the forest arc from each node to its parent, -1 at tree roots."""
    side_basic: np.ndarray
    """bool [S]: basic cap columns."""
    side_flip: np.ndarray
    """bool [S]: basic cap columns that are negated (warm starts)."""

    def copy(self) -> FlowBasis:
        return FlowBasis(self.parent.copy(), self.pred.copy(), self.side_basic.copy(), self.side_flip.copy())


@dataclass(frozen=True, eq=False)
class FlowWarmState:
    """The native side-column simplex's state after a solve."""

    signature: bytes
    """Digest of the flow problem's structure (arcs and cap columns)."""
    uncapped: FlowBasis
    """Optimal basis of the problem without the stage caps (the restart after a large drift)."""
    final: FlowBasis
    """Optimal basis of the whole problem (the restart after a small drift)."""
    capped_pivots: int
    """Pivots through the cap columns the capped stage of the last full solve took (the final
    restart's budget)."""
    unfrozen: np.ndarray
    """float64 [n]: the durations ``final`` is optimal for, in the caller's unit."""
    frozen: np.ndarray
    start: Literal["cold", "final", "uncapped"]
    """How this plan's solve started: cold, from the previous final basis or from its uncapped one."""


@dataclass(frozen=True, eq=False)
class HighsWarmState:
    """The HiGHS fallback's state after a solve."""

    signature: tuple
    """Shape, nonzeros, ratio columns and cap rows of the reduced LP."""
    eps: float
    """Weight of the total ratio in the start objective (kept, so the basis fits it)."""
    basis: Any
    """``highspy.HighsBasis`` after the start solve."""


WarmState = FlowWarmState | HighsWarmState
