"""Per-rank action orders of one training step."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from tfz.schedule.action import Action


def stage_ranks(num_ranks: int, stages_per_rank: int, placement: str) -> tuple[int, ...]:
    """Rank of every stage. ``loop``: stage s on rank s % P. ``v``: chunks alternate direction,
    so with 2 stages per rank rank r holds stages r and 2P-1-r (torch's ``style="v"``)."""
    if placement not in ("loop", "v"):
        raise ValueError(f"unknown stage placement {placement!r}; choose 'loop' or 'v'")
    ranks = []
    for s in range(num_ranks * stages_per_rank):
        chunk, pos = divmod(s, num_ranks)
        ranks.append(pos if placement == "loop" or chunk % 2 == 0 else num_ranks - 1 - pos)
    return tuple(ranks)


@dataclass(frozen=True)
class Schedule:
    """What each pipeline rank computes, in order, during one step.

    ``orders[r]`` is rank r's program: compute actions only (no send/recv, no bubbles).
    ``stage_to_rank[s]`` is the rank that holds stage s.
    """

    name: str
    num_microbatches: int
    stage_to_rank: tuple[int, ...]
    orders: tuple[tuple[Action, ...], ...]
    placement: str = "loop"
    """``loop``, ``v`` or ``custom`` (imported from a file with its own placement)."""
    _rank_stages: tuple[tuple[int, ...], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "orders", tuple(tuple(o) for o in self.orders))
        object.__setattr__(self, "stage_to_rank", tuple(self.stage_to_rank))
        by_rank: list[list[int]] = [[] for _ in range(self.num_ranks)]
        for s, r in enumerate(self.stage_to_rank):
            if not 0 <= r < self.num_ranks:
                raise ValueError(f"stage {s} is placed on rank {r}, but there are {self.num_ranks} ranks")
            by_rank[r].append(s)
        object.__setattr__(self, "_rank_stages", tuple(tuple(s) for s in by_rank))

    @property
    def num_ranks(self) -> int:
        return len(self.orders)

    @property
    def num_stages(self) -> int:
        return len(self.stage_to_rank)

    @property
    def stages_per_rank(self) -> int:
        return self.num_stages // max(1, self.num_ranks)

    @property
    def num_actions(self) -> int:
        return sum(len(o) for o in self.orders)

    def stages_of(self, rank: int) -> tuple[int, ...]:
        """Stages held by ``rank``, ascending."""
        return self._rank_stages[rank]

    def actions(self) -> list[Action]:
        """All actions, rank by rank in program order."""
        return [a for order in self.orders for a in order]

    def format(self) -> str:
        """One line per rank: ``rank 0: 0F0 0F1 0B0 ...``."""
        return "\n".join(f"rank {r}: " + " ".join(map(str, o)) for r, o in enumerate(self.orders))


def make_schedule(
    name: str,
    orders: Sequence[Sequence[Action]],
    num_microbatches: int,
    stages_per_rank: int = 1,
    placement: str = "loop",
) -> Schedule:
    """A schedule whose stages are placed by ``placement`` over ``len(orders)`` ranks."""
    return Schedule(
        name=name,
        num_microbatches=num_microbatches,
        stage_to_rank=stage_ranks(len(orders), stages_per_rank, placement),
        orders=tuple(tuple(o) for o in orders),
        placement=placement,
    )
