"""Simple mask providers for the freeze-aware stage (the :class:`tfz.masks.MaskProvider` protocol).

- :class:`FixedMasks`: a fixed ``{(stage, microbatch): StageMasks}`` table (tests, replaying a plan);
- :class:`RatioMasks`: freeze ratios per (stage, microbatch), turned into masks by
  :func:`tfz.masks.select` on first use and cached.

Both answer None (nothing frozen) for a (stage, microbatch) they do not list.
"""

from __future__ import annotations

from collections.abc import Mapping

from tfz._validate import check_int, check_ratio, is_int
from tfz.masks import SelectionPolicy, StageMasks, StageUnits, select

__all__ = ["FixedMasks", "RatioMasks"]


def _key(key) -> tuple[int, int]:
    if not isinstance(key, tuple) or len(key) != 2 or not all(is_int(v) and v >= 0 for v in key):
        raise ValueError(f"keys must be (stage, microbatch) pairs of integers >= 0, got {key!r}")
    return (int(key[0]), int(key[1]))


class FixedMasks:
    """``masks_for(stage, mb)`` from a table; (stage, mb) pairs not in it freeze nothing."""

    def __init__(self, masks: Mapping[tuple[int, int], StageMasks | None]):
        if not isinstance(masks, Mapping):
            raise TypeError(f"masks must be a mapping (stage, microbatch) -> StageMasks, got {masks!r}")
        table = {}
        for key, value in masks.items():
            if value is not None and not isinstance(value, StageMasks):
                raise TypeError(f"masks[{key!r}] must be StageMasks or None, got {type(value).__name__}")
            table[_key(key)] = value
        self._masks = table

    def masks_for(self, stage: int, microbatch: int) -> StageMasks | None:
        return self._masks.get((stage, microbatch))

    def __repr__(self) -> str:
        return f"FixedMasks({len(self._masks)} entries)"


class RatioMasks:
    """``masks_for(stage, mb)`` = ``select(units_by_stage[stage], ratios[(stage, mb)], ...)``, cached.

    Args:
        ratios: (stage, microbatch) -> freeze ratio in [0, 1]; unlisted pairs freeze nothing.
        units_by_stage: stage -> its :class:`StageUnits` (e.g. ``StageUnits.from_module(module)``).
            Every stage named in ``ratios`` needs an entry.
        policy, seed, step: passed to :func:`tfz.masks.select` (same on every rank, so ranks agree).
    """

    def __init__(
        self,
        ratios: Mapping[tuple[int, int], float],
        units_by_stage: Mapping[int, StageUnits],
        *,
        policy: SelectionPolicy | None = None,
        seed: int = 0,
        step: int = 0,
    ):
        if not isinstance(units_by_stage, Mapping):
            raise TypeError(f"units_by_stage must be a mapping stage -> StageUnits, got {units_by_stage!r}")
        for stage, units in units_by_stage.items():
            if not isinstance(units, StageUnits):
                raise TypeError(f"units_by_stage[{stage!r}] must be StageUnits, got {type(units).__name__}")
        if policy is not None and not isinstance(policy, SelectionPolicy):
            raise TypeError(
                f"policy must have a rank(units, *, stage, microbatch, rng) method, got {policy!r}"
            )
        self._units = dict(units_by_stage)
        self.policy, self.seed = policy, check_int("seed", seed, 0)
        self.step = check_int("step", step, 0)
        self._ratios: dict[tuple[int, int], float] = {}
        self._cache: dict[tuple[int, int], StageMasks] = {}
        self.update(ratios)

    def update(
        self, ratios: Mapping[tuple[int, int], float] | None = None, *, step: int | None = None
    ) -> None:
        """Replace the ratios and/or the step (e.g. a redraw); cached masks are dropped."""
        if ratios is not None:
            if not isinstance(ratios, Mapping):
                raise TypeError(f"ratios must be a mapping (stage, microbatch) -> ratio, got {ratios!r}")
            table = {}
            for key, r in ratios.items():
                key = _key(key)
                if key[0] not in self._units:
                    raise ValueError(f"ratio given for stage {key[0]}, which has no entry in units_by_stage")
                table[key] = check_ratio(f"ratio of {key!r}", r)
            self._ratios = table
        if step is not None:
            self.step = check_int("step", step, 0)
        self._cache = {}

    def masks_for(self, stage: int, microbatch: int) -> StageMasks | None:
        key = (stage, microbatch)
        masks = self._cache.get(key)
        if masks is None:
            ratio = self._ratios.get(key)
            if ratio is None:
                return None
            masks = self._cache[key] = select(
                self._units[stage],
                ratio,
                stage=stage,
                microbatch=microbatch,
                step=self.step,
                seed=self.seed,
                policy=self.policy,
            )
        return masks

    def __repr__(self) -> str:
        return f"RatioMasks({len(self._ratios)} ratios, seed={self.seed}, step={self.step})"
