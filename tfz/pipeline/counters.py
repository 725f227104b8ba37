"""Per-step counters of a freeze-aware stage: actions run, W FLOPs computed and skipped, frozen fractions."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["MicrobatchStats", "StageStats"]


@dataclass
class MicrobatchStats:
    """What freezing did to one (stage, microbatch) in one step."""

    frozen_fraction: float = 0.0
    """Realised frozen fraction of the masks applied (``StageMasks.frozen_fraction``; 0 without masks)."""
    w_flops: int = 0
    """Weight-gradient GEMM FLOPs of FreezableLinear layers computed (2 * tokens * active rows * in)."""
    w_flops_skipped: int = 0
    """The same for frozen rows: work that was not done."""
    frozen_tensors: int = 0
    """Whole parameter tensors (norms, embeddings) left out of the backward."""
    masked: bool = False
    """A StageMasks was applied (False: the provider returned None, or there is no provider)."""


@dataclass
class StageStats:
    """Counters of one stage for one step (reset when the schedule starts a step)."""

    stage: int
    actions: list[str] = field(default_factory=list)
    """Compute actions in the order they ran: ``"2F0"``, ``"3I1"``, ``"0W3"``, ``"1B2"``."""
    microbatches: dict[int, MicrobatchStats] = field(default_factory=dict)

    def microbatch(self, mb: int) -> MicrobatchStats:
        stats = self.microbatches.get(mb)
        if stats is None:
            stats = self.microbatches[mb] = MicrobatchStats()
        return stats

    @property
    def w_flops(self) -> int:
        return sum(m.w_flops for m in self.microbatches.values())

    @property
    def w_flops_skipped(self) -> int:
        return sum(m.w_flops_skipped for m in self.microbatches.values())

    @property
    def skipped_fraction(self) -> float:
        """Skipped / total weight-gradient FLOPs of the step (0 when none were counted)."""
        total = self.w_flops + self.w_flops_skipped
        return self.w_flops_skipped / total if total else 0.0

    def to_dict(self) -> dict:
        return {
            "stage": self.stage,
            "actions": list(self.actions),
            "w_flops": self.w_flops,
            "w_flops_skipped": self.w_flops_skipped,
            "microbatches": {
                str(mb): {
                    "frozen_fraction": m.frozen_fraction,
                    "w_flops": m.w_flops,
                    "w_flops_skipped": m.w_flops_skipped,
                    "frozen_tensors": m.frozen_tensors,
                    "masked": m.masked,
                }
                for mb, m in sorted(self.microbatches.items())
            },
        }
