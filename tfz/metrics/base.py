"""The metric protocol, the policy interface, and the bookkeeping shared by the metrics.

**Units.** A metric judges exactly the units that :func:`tfz.masks.select` freezes: the units of
``StageUnits.from_module(stage_module, block_rows=..., include_tensors=...)`` (a row block
``(layer, start:stop)`` of a FreezableLinear weight together with the same rows of its bias, or a whole
other tensor). Statistics are kept per unit in small numpy arrays; what a metric keeps per scalar (if
anything) is stated in its own docstring.

**Metric protocol** (:class:`FreezeMetric`):

- ``observe(step, stage_modules)``: called every optimizer step, after ``optimizer.step()`` and before
  ``zero_grad()`` (the step's gradients and the updated weights are both available), with the stage
  modules this rank holds (``{stage: module}``; a DDP wrapper is unwrapped). ``step`` increases by at
  least one per call. A stage is bound (its units built, its state created) the first time it is
  observed; the metric decides at its own check interval, counted in steps from that first call.
- ``units(stage)``: the stage's :class:`tfz.masks.StageUnits` (None before the stage is bound).
- ``candidates(stage)``: bool [n_units], the units the metric currently wants frozen.
- ``scores(stage)``: float [n_units], how strongly each unit is a candidate (higher: freeze first);
  only the order among candidates is used.
- ``state_dict()`` / ``load_state_dict(state)``: plain Python containers and torch tensors, loadable
  with ``torch.load(..., weights_only=True)``.

**Policy interface** (:class:`FreezePolicy`): a :class:`tfz.masks.SelectionPolicy` (``rank(units, *,
stage, microbatch, rng)``) plus ``observe`` / ``state_dict`` / ``load_state_dict`` as above.
``tfz.masks.select`` only calls ``rank``; the controller forwards ``observe`` every step and puts the
policy's ``state_dict`` into its own. Policies without these methods (``tfz.masks.RandomPolicy``) are
stateless and are taken as they are. The freezers of :mod:`tfz.metrics.freezers` are
:class:`tfz.masks.MaskProvider` objects with the same ``observe`` / state methods.

**Replicas.** The state of a stage lives on the rank that holds the stage, and every decision is a
function of that stage's weights and gradients, so pipeline ranks need no communication. Data-parallel
replicas of a stage each run their own copy of the metric; they take the same decisions because they
observe the same all-reduced gradients and the same updated weights (reductions run in the same order
on the same kind of device). This is not checked at run time. Sharded parameters (FSDP) are refused
(ValueError at ``observe``): a rank would see only its shard.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from tfz._validate import check_int
from tfz.masks import LayerSpec, SelectionPolicy, StageUnits, TensorSpec, Unit

__all__ = [
    "FreezeMetric",
    "FreezePolicy",
    "MetricBase",
    "StageBinding",
    "check_stage",
    "unit_positions",
]

STATE_VERSION = 1


@runtime_checkable
class FreezeMetric(Protocol):
    """Per-unit frozen-candidate flags of the stages a rank holds (see the module docstring)."""

    def observe(self, step: int, stage_modules: Mapping[int, Any]) -> None: ...

    def units(self, stage: int) -> StageUnits | None: ...

    def candidates(self, stage: int) -> np.ndarray: ...

    def scores(self, stage: int) -> np.ndarray: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


@runtime_checkable
class FreezePolicy(SelectionPolicy, Protocol):
    """A selection policy with metric state: what the controller takes (see the module docstring)."""

    def observe(self, step: int, stage_modules: Mapping[int, Any]) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


def check_stage(stage: Any) -> int:
    """``stage`` as an int >= 0, else ValueError naming it."""
    return check_int("stage", stage, 0)


def _unit_key(unit: Unit) -> tuple[str, str, int, int]:
    return (unit.name, unit.kind, unit.start, unit.stop)


def unit_positions(known: StageUnits, given: Sequence[Unit], *, stage: int) -> np.ndarray:
    """Positions in ``known`` of the units ``given`` (int [len(given)]); ValueError for an unknown one.

    ``given`` may be a subset of ``known`` (e.g. rows only, when the metric also judges whole tensors),
    but every unit must match one of ``known`` exactly (same name, kind and rows: same ``block_rows``).
    """
    index = {_unit_key(u): i for i, u in enumerate(known.units)}
    out = np.empty(len(given), dtype=np.int64)
    for j, unit in enumerate(given):
        if not isinstance(unit, Unit):
            raise TypeError(f"units must be tfz.masks.Unit objects, got {type(unit).__name__}")
        pos = index.get(_unit_key(unit))
        if pos is None:
            raise ValueError(
                f"unit {unit.name!r} rows [{unit.start}, {unit.stop}) ({unit.kind}) of stage {stage} is not "
                f"one of the metric's units (block_rows={known.block_rows}); build the masks' units with "
                "the same block_rows"
            )
        out[j] = pos
    return out


def _specs_to_state(units: StageUnits) -> list[list[Any]]:
    out = []
    for spec in units.specs:
        if isinstance(spec, LayerSpec):
            out.append(["rows", spec.name, spec.out_features, spec.in_features])
        else:
            out.append(["tensor", spec.name, spec.numel])
    return out


def _units_from_state(specs: Sequence[Sequence[Any]], block_rows: int) -> StageUnits:
    built = []
    for spec in specs:
        if spec[0] == "rows" and len(spec) == 4:
            built.append(LayerSpec(str(spec[1]), int(spec[2]), int(spec[3])))
        elif spec[0] == "tensor" and len(spec) == 3:
            built.append(TensorSpec(str(spec[1]), int(spec[2])))
        else:
            raise ValueError(f"malformed unit spec in state: {spec!r}")
    return StageUnits(tuple(built), block_rows=int(block_rows))


def unwrap(module: Any) -> Any:
    """``module`` without a DistributedDataParallel wrapper (parameter names are the stage's own)."""
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(module, DistributedDataParallel):
        module = module.module
    if not isinstance(module, nn.Module):
        raise TypeError(f"stage modules must be torch.nn.Module objects, got {type(module).__name__}")
    return module


def _refuse_sharded(stage: int, module: Any) -> None:
    from torch.distributed.fsdp import FSDPModule

    sharded = next((name for name, m in module.named_modules() if isinstance(m, FSDPModule)), None)
    if sharded is not None:
        raise ValueError(
            f"stage {stage}: tfz.metrics cannot judge FSDP-sharded parameters (module "
            f"{sharded or '<stage>'!r} is fully_shard-ed, so a rank sees only its shard); use DDP or "
            "no data parallelism with APF / AutoFreeze, or TimelyFreeze with its default random selection"
        )


@dataclass
class StageBinding:
    """A stage's units and the metric's state for it."""

    units: StageUnits
    state: Any
    """Metric-specific per-stage state."""
    validated: bool = False
    """The units were checked against the stage module (False right after load_state_dict)."""


class MetricBase:
    """Shared bookkeeping: stage binding, step checks, unit lookup, state_dict framing.

    Subclasses set ``kind`` and ``config`` (a dataclass with ``block_rows`` and ``include_tensors``) and
    implement ``_new_state``, ``_observe_stage``, ``_candidates``, ``_scores``, ``_stage_to_state`` and
    ``_stage_from_state``.
    """

    kind = ""

    def __init__(self, config: Any):
        self.config = config
        self._stages: dict[int, StageBinding] = {}
        self._last_step: int | None = None

    # -- subclass hooks -------------------------------------------------------------------------
    def _new_state(self, units: StageUnits, module: Any, step: int) -> Any:
        raise NotImplementedError

    def _observe_stage(self, binding: StageBinding, module: Any, step: int) -> None:
        raise NotImplementedError

    def _candidates(self, binding: StageBinding) -> np.ndarray:
        raise NotImplementedError

    def _scores(self, binding: StageBinding) -> np.ndarray:
        raise NotImplementedError

    def _stage_to_state(self, binding: StageBinding) -> dict[str, Any]:
        raise NotImplementedError

    def _stage_from_state(self, units: StageUnits, state: Mapping[str, Any]) -> Any:
        raise NotImplementedError

    def _check_loaded(self, stage: int, binding: StageBinding, module: Any) -> None:
        """Check loaded per-parameter state against the module (first observe after a load)."""

    # -- protocol ---------------------------------------------------------------------------------
    def observe(self, step: int, stage_modules: Mapping[int, Any]) -> None:
        """Record one optimizer step of the stages in ``stage_modules`` (see the module docstring)."""
        step = check_int("step", step, 0)
        if self._last_step is not None and step <= self._last_step:
            raise ValueError(f"step must increase between observe calls: got {step} after {self._last_step}")
        if not isinstance(stage_modules, Mapping):
            raise TypeError(
                f"stage_modules must be a mapping {{stage: module}}, got {type(stage_modules).__name__}"
            )
        modules = {check_stage(s): unwrap(m) for s, m in stage_modules.items()}
        for stage, module in modules.items():
            binding = self._stages.get(stage)
            if binding is None:
                units = self._stage_units(stage, module)
                binding = self._stages[stage] = StageBinding(
                    units, self._new_state(units, module, step), True
                )
            elif not binding.validated:
                self._validate(stage, binding, module)
            self._observe_stage(binding, module, step)
        self._last_step = step

    def _stage_units(self, stage: int, module: Any) -> StageUnits:
        _refuse_sharded(stage, module)
        try:
            return StageUnits.from_module(
                module, block_rows=self.config.block_rows, include_tensors=self.config.include_tensors
            )
        except ValueError as exc:
            raise ValueError(f"stage {stage}: {exc}") from None

    def _validate(self, stage: int, binding: StageBinding, module: Any) -> None:
        units = self._stage_units(stage, module)
        if units.specs != binding.units.specs:
            raise ValueError(
                f"stage {stage}: the module's freezable parameters {[s.name for s in units.specs]} "
                f"differ from the loaded state's {[s.name for s in binding.units.specs]}"
            )
        self._check_loaded(stage, binding, module)
        binding.validated = True

    def _binding(self, stage: int) -> StageBinding | None:
        return self._stages.get(check_stage(stage))

    @property
    def stages(self) -> tuple[int, ...]:
        """The stages bound so far, ascending."""
        return tuple(sorted(self._stages))

    def units(self, stage: int) -> StageUnits | None:
        binding = self._binding(stage)
        return None if binding is None else binding.units

    def candidates(self, stage: int) -> np.ndarray:
        """bool [n_units]: the units this metric wants frozen now; ValueError for an unbound stage."""
        return self._candidates(self._require(stage)).copy()

    def scores(self, stage: int) -> np.ndarray:
        """float [n_units]: candidate strength (higher: freeze first); ValueError for an unbound stage."""
        return self._scores(self._require(stage)).astype(np.float64, copy=True)

    def candidate_fraction(self, stage: int) -> float:
        """Weight fraction of the stage's units that are candidates (0.0 for an unbound stage)."""
        binding = self._binding(stage)
        if binding is None:
            return 0.0
        units = binding.units
        return float(units.weights[self._candidates(binding)].sum()) / units.total

    def _require(self, stage: int) -> StageBinding:
        binding = self._binding(stage)
        if binding is None:
            raise ValueError(f"stage {stage} has not been observed yet (bound stages: {list(self.stages)})")
        return binding

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Config, step and per-stage state (tensors are references, as in ``Optimizer.state_dict``)."""
        return {
            "version": STATE_VERSION,
            "kind": self.kind,
            "config": asdict(self.config),
            "last_step": self._last_step,
            "stages": {
                stage: {
                    "specs": _specs_to_state(b.units),
                    "block_rows": b.units.block_rows,
                    **self._stage_to_state(b),
                }
                for stage, b in sorted(self._stages.items())
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace all state by ``state`` (from :meth:`state_dict` of a metric with the same config)."""
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping, got {type(state).__name__}")
        if state.get("version") != STATE_VERSION or state.get("kind") != self.kind:
            raise ValueError(
                f"state is for kind {state.get('kind')!r} version {state.get('version')!r}, "
                f"expected {self.kind!r} version {STATE_VERSION}"
            )
        config = asdict(self.config)
        theirs = dict(state.get("config", {}))
        differ = sorted(k for k in set(config) | set(theirs) if config.get(k) != theirs.get(k))
        if differ:
            raise ValueError(
                "state was saved with a different config: "
                + ", ".join(f"{k}={theirs.get(k)!r} (here {config.get(k)!r})" for k in differ)
            )
        stages = {}
        for stage, st in state["stages"].items():
            units = _units_from_state(st["specs"], st["block_rows"])
            stages[check_stage(stage)] = StageBinding(units, self._stage_from_state(units, st), False)
        last = state.get("last_step")
        self._stages = stages
        self._last_step = None if last is None else int(last)
