"""Freeze ratio -> row-block masks for one (stage, microbatch) (``tfz.masks``).

Units are the row blocks of every row-freezable linear layer of a stage (``block_rows`` rows each,
the last block of a layer may be partial), weighted by their weight-gradient FLOPs per token
(2 * rows * in_features, so ``rows * in_features`` up to a constant), and optionally other parameter
tensors (norms, embeddings) as whole units weighted by their numel.

Given a ratio r, :func:`select` freezes units in the order a :class:`SelectionPolicy` ranks them:
first fit in that order (take a unit when it still fits under r * total), then one best-fit pick
among the units left if it brings the frozen weight closer to r * total. The realised fraction obeys

    |realised - r| <= (weight of the smallest unit left unfrozen) / (2 * total) <= max_weight / (2 * total)

(after the first-fit pass the remaining gap g is smaller than every unit left; adding the smallest
one, w, is chosen when g > w / 2, which leaves an error w - g < w / 2). ``StageUnits.bound`` is the
right-hand side.

The default :class:`RandomPolicy` draws from a numpy Generator seeded with (seed, stage, microbatch,
step), so every rank computes the same masks without communication. On stage 0 it samples without
replacement with weights decreasing linearly from 1.0 to 0.1 in model order (TimelyFreeze's bias
towards the front of the model, whose freezing also saves the backward below it); other stages use a
uniform permutation. Metric-guided policies plug in through :class:`SelectionPolicy`.

This module does not import ``tfz.nn``: row-freezable layers are found by their
``supports_row_masks`` class attribute (set by ``tfz.nn.FreezableLinear``).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np

from tfz._validate import check_int, check_number, check_ratio

__all__ = [
    "LayerSpec",
    "MaskProvider",
    "RandomPolicy",
    "SelectionPolicy",
    "StageMasks",
    "StageUnits",
    "TensorSpec",
    "Unit",
    "select",
    "select_covering",
    "select_row_arcs",
    "stage_module",
]


def stage_module(module: Any) -> Any:
    """The module whose parameter names the masks use: ``module`` without a DDP wrapper (torch is not
    imported here: a DDP module means torch.nn.parallel is loaded)."""
    ddp = getattr(sys.modules.get("torch.nn.parallel"), "DistributedDataParallel", None)
    return module.module if ddp is not None and isinstance(module, ddp) else module


@dataclass(frozen=True)
class LayerSpec:
    """A row-freezable linear layer: weight [out_features, in_features]."""

    name: str
    out_features: int
    in_features: int

    def __post_init__(self):
        object.__setattr__(
            self, "out_features", check_int(f"out_features of {self.name!r}", self.out_features, 1)
        )
        object.__setattr__(
            self, "in_features", check_int(f"in_features of {self.name!r}", self.in_features, 1)
        )


@dataclass(frozen=True)
class TensorSpec:
    """Another parameter tensor, frozen as a whole."""

    name: str
    numel: int

    def __post_init__(self):
        object.__setattr__(self, "numel", check_int(f"numel of {self.name!r}", self.numel, 1))


@dataclass(frozen=True)
class Unit:
    """One freezable unit: rows [start, stop) of layer ``name``, or the whole tensor ``name``."""

    name: str
    kind: str
    """"rows" or "tensor"."""
    start: int
    stop: int
    """Row range for "rows" units; (0, 0) for "tensor" units."""
    weight: int
    """rows * in_features, or numel."""
    position: int
    """Index in model order."""


class _UnitLayout(NamedTuple):
    row_units: np.ndarray
    """int64: positions of the row-block units, in model order."""
    row_counts: np.ndarray
    """int64: rows of each of them."""
    layers: list[tuple[str, int, int]]
    """(layer name, first, stop) over the row units' rows laid end to end."""
    tensor_units: np.ndarray
    """int64: positions of the whole-tensor units."""
    tensor_names: list[str]


@dataclass(frozen=True, eq=False)
class StageUnits:
    """The freezable units of one stage, in model order."""

    specs: tuple[LayerSpec | TensorSpec, ...]
    block_rows: int = 64
    units: tuple[Unit, ...] = field(init=False)
    weights: np.ndarray = field(init=False)
    """int64 [n_units]."""

    def __post_init__(self):
        object.__setattr__(self, "block_rows", check_int("block_rows", self.block_rows, 1))
        names = [s.name for s in self.specs]
        for spec in self.specs:
            if not isinstance(spec, (LayerSpec, TensorSpec)):
                raise TypeError(f"specs must be LayerSpec or TensorSpec, got {type(spec).__name__}")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate names in specs: {sorted({n for n in names if names.count(n) > 1})}")
        units = []
        for spec in self.specs:
            if isinstance(spec, LayerSpec):
                for start in range(0, spec.out_features, self.block_rows):
                    stop = min(start + self.block_rows, spec.out_features)
                    weight = (stop - start) * spec.in_features
                    units.append(Unit(spec.name, "rows", start, stop, weight, len(units)))
            else:
                units.append(Unit(spec.name, "tensor", 0, 0, spec.numel, len(units)))
        if not units:
            raise ValueError("a stage needs at least one freezable unit, got no specs")
        object.__setattr__(self, "specs", tuple(self.specs))
        object.__setattr__(self, "units", tuple(units))
        object.__setattr__(self, "weights", np.array([u.weight for u in units], dtype=np.int64))

    @classmethod
    def from_module(cls, module: Any, *, block_rows: int = 64, include_tensors: bool = False) -> StageUnits:
        """Units of a stage module: its row-freezable linears, plus (optionally) its other parameters.

        Only parameters with ``requires_grad`` count. Model order is ``named_parameters()`` order.
        """
        layer_of = {}
        for name, sub in module.named_modules():
            if getattr(sub, "supports_row_masks", False) and sub.weight.requires_grad:
                layer_of[id(sub.weight)] = (name, sub)
        owned = {id(sub.bias) for _, sub in layer_of.values() if sub.bias is not None}
        specs = []
        for pname, param in module.named_parameters():
            if id(param) in layer_of:
                name, sub = layer_of[id(param)]
                specs.append(LayerSpec(name, sub.out_features, sub.in_features))
            elif include_tensors and param.requires_grad and id(param) not in owned:
                specs.append(TensorSpec(pname, param.numel()))
        if not specs:
            raise ValueError(_no_units_message(module, include_tensors))
        return cls(tuple(specs), block_rows=block_rows)

    @property
    def total(self) -> int:
        return int(self.weights.sum())

    @property
    def bound(self) -> float:
        """Guaranteed bound on |realised - ratio| of :func:`select`: max unit weight / (2 * total)."""
        return float(self.weights.max()) / (2 * self.total)

    def __len__(self) -> int:
        return len(self.units)

    @cached_property
    def _circles(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(circle of each unit, the weight before it on its circle, each circle's weight): a circle
        per layer (its row blocks in row order) and per whole tensor (one unit)."""
        spec_of = {spec.name: i for i, spec in enumerate(self.specs)}
        circle = np.array([spec_of[u.name] for u in self.units], dtype=np.int64)
        weight = np.bincount(circle, weights=self.weights, minlength=len(self.specs))
        before = np.cumsum(self.weights) - self.weights  # units of a spec are consecutive
        first = np.concatenate([[0.0], np.cumsum(weight)[:-1]])
        return circle, before - first[circle], weight

    @cached_property
    def _layout(self) -> _UnitLayout:
        """Where each unit's flag goes in the masks of :class:`StageMasks` (built once per units)."""
        rows = [u for u in self.units if u.kind == "rows"]
        layers, at = [], 0
        for spec in self.specs:
            if isinstance(spec, LayerSpec):
                layers.append((spec.name, at, at + spec.out_features))
                at += spec.out_features
        tensors = [u for u in self.units if u.kind == "tensor"]
        return _UnitLayout(
            row_units=np.array([u.position for u in rows], dtype=np.int64),
            row_counts=np.array([u.stop - u.start for u in rows], dtype=np.int64),
            layers=layers,
            tensor_units=np.array([u.position for u in tensors], dtype=np.int64),
            tensor_names=[u.name for u in tensors],
        )


def _no_units_message(module: Any, include_tensors: bool) -> str:
    """The error of a stage module without freezable units: what it holds and how to convert it."""
    holders = [
        f"{name or '<module>'} ({type(sub).__module__}.{type(sub).__qualname__})"
        for name, sub in module.named_modules()
        if any(True for _ in sub.parameters(recurse=False))
    ]
    shown = ", ".join(holders[:8]) + (f", ... ({len(holders)} in all)" if len(holders) > 8 else "")
    what = "no trainable parameter" if include_tensors else "no FreezableLinear with a trainable weight"
    return (
        f"a stage needs at least one freezable unit, but the stage module has {what}. Modules with "
        f"parameters: {shown or 'none'}. Convert its linear layers first with "
        "tfz.nn.convert_to_freezable(module) (nn.Linear and subclasses that keep nn.Linear.forward; "
        "pass filter_fn=lambda module, fqn: ... to choose, and report=True to see what was skipped "
        "and why), or count whole tensors as units with include_tensors=True"
    )


@runtime_checkable
class SelectionPolicy(Protocol):
    """Ranks units, most preferred to freeze first."""

    def rank(
        self, units: Sequence[Unit], *, stage: int, microbatch: int, rng: np.random.Generator
    ) -> np.ndarray:
        """A permutation of ``range(len(units))`` (int [n_units])."""
        ...


@dataclass(frozen=True)
class RandomPolicy:
    """Uniform random order; on ``front_bias_stages``, weighted towards the front of the model."""

    front_bias_stages: tuple[int, ...] = (0,)
    """Stages whose order is biased (any iterable of stage indices; kept as a tuple of ints)."""
    first_weight: float = 1.0
    """Sampling weight of the first unit in model order on biased stages."""
    last_weight: float = 0.1
    """Sampling weight of the last unit; weights in between are linear in model order."""

    def __post_init__(self):
        stages = self.front_bias_stages
        if isinstance(stages, (str, bytes)) or not isinstance(stages, Iterable):
            raise ValueError(f"front_bias_stages must be a tuple of stage indices, got {stages!r:.80}")
        stages = tuple(check_int("front_bias_stages entry", s, 0) for s in stages)
        object.__setattr__(self, "front_bias_stages", stages)
        for name in ("first_weight", "last_weight"):
            object.__setattr__(self, name, check_number(name, getattr(self, name), low=0.0, low_open=True))

    def rank(
        self, units: Sequence[Unit], *, stage: int, microbatch: int, rng: np.random.Generator
    ) -> np.ndarray:
        n = len(units)
        if stage not in self.front_bias_stages:
            return rng.permutation(n)
        weights = np.linspace(self.first_weight, self.last_weight, n)
        # Efraimidis-Spirakis: sorting Exp(1) / weight gives weighted sampling without replacement
        return np.argsort(rng.exponential(size=n) / weights, kind="stable")


@runtime_checkable
class MaskProvider(Protocol):
    """What the pipeline runtime asks before each backward: the masks of one (stage, microbatch).

    Implemented by ``tfz.controller.TimelyFreeze`` and the freezers of ``tfz.metrics``; None means
    nothing is frozen for that action.
    """

    def masks_for(self, stage: int, microbatch: int) -> StageMasks | None: ...


@dataclass(frozen=True, eq=False)
class StageMasks:
    """Masks of one (stage, microbatch). Row masks are True for rows that receive weight gradient."""

    units: StageUnits
    ratio: float
    """Requested frozen fraction of W FLOPs."""
    frozen: np.ndarray
    """bool [n_units]: frozen units."""

    @property
    def frozen_fraction(self) -> float:
        """Realised frozen fraction of the stage's unit weight."""
        return float(self.units.weights[self.frozen].sum()) / self.units.total

    @property
    def active_rows(self) -> dict[str, np.ndarray]:
        """Layer name -> bool [out_features] (True = active), for every layer of the stage (views of
        one array, made afresh per call)."""
        layout = self.units._layout
        active = np.repeat(~self.frozen[layout.row_units], layout.row_counts)  # all layers' rows, in order
        return {name: active[lo:hi] for name, lo, hi in layout.layers}

    @property
    def frozen_tensors(self) -> frozenset[str]:
        """Names of the whole tensors frozen."""
        layout = self.units._layout
        return frozenset(layout.tensor_names[i] for i in np.flatnonzero(self.frozen[layout.tensor_units]))

    def for_module(self, module: Any, device: Any = None) -> dict[Any, Any]:
        """``{layer: bool tensor [out_features] or None}`` for ``tfz.nn.use_row_masks``.

        Layers are looked up by name in ``module`` (the stage module the units came from); fully active
        layers map to None.
        """
        import torch

        masks = {}
        for name, rows in self.active_rows.items():
            layer = module.get_submodule(name)
            masks[layer] = None if rows.all() else torch.from_numpy(rows).to(device)
        return masks

    def __repr__(self) -> str:
        return (
            f"StageMasks(ratio={self.ratio:.4f}, realised={self.frozen_fraction:.4f}, "
            f"frozen_units={int(self.frozen.sum())}/{len(self.frozen)})"
        )


def _fill(weights: np.ndarray, order: Iterable[int], target: float) -> np.ndarray:
    """First fit in ``order`` under ``target``, then the best single extra unit (see module docstring)."""
    frozen = np.zeros(len(weights), dtype=bool)
    total = 0
    for i in order:
        w = int(weights[i])
        if total + w <= target:
            frozen[i] = True
            total += w
    gap = target - total
    left = np.flatnonzero(~frozen)
    if left.size and gap > 0:
        best = left[np.argmin(np.abs(gap - weights[left]))]
        if abs(gap - weights[best]) < gap:
            frozen[best] = True
    return frozen


def _order(
    units: StageUnits, policy: SelectionPolicy | None, entropy: list[int], stage: int, microbatch: int
) -> np.ndarray:
    policy = RandomPolicy() if policy is None else policy
    if not isinstance(policy, SelectionPolicy):
        raise TypeError(f"policy must have a rank(units, *, stage, microbatch, rng) method, got {policy!r}")
    rng = np.random.default_rng(entropy)
    order = np.asarray(policy.rank(units.units, stage=stage, microbatch=microbatch, rng=rng))
    n = len(units)
    if (
        order.shape != (n,)
        or not np.issubdtype(order.dtype, np.integer)
        or not np.array_equal(np.sort(order), np.arange(n))
    ):
        raise ValueError(f"policy {policy!r} returned {order!r}, not a permutation of range({n})")
    return order


def select(
    units: StageUnits,
    ratio: float,
    *,
    stage: int,
    microbatch: int,
    step: int = 0,
    seed: int = 0,
    policy: SelectionPolicy | None = None,
) -> StageMasks:
    """Freeze units of ``units`` so their weight fraction is as close to ``ratio`` as blocks allow.

    Args:
        units: the stage's units (:meth:`StageUnits.from_module` or from specs).
        ratio: target frozen fraction of W FLOPs, in [0, 1].
        stage, microbatch: the action the masks are for.
        step: decision index (e.g. how many times masks have been redrawn); part of the seed.
        seed: shared by all ranks.
        policy: ranks the units; default :class:`RandomPolicy`.
    """
    if not isinstance(units, StageUnits):
        raise TypeError(f"units must be StageUnits, got {type(units).__name__}")
    ratio = check_ratio("ratio", ratio)
    entropy = [check_int(n, v, 0) for n, v in (("seed", seed), ("stage", stage), ("microbatch", microbatch))]
    entropy.append(check_int("step", step, 0))
    order = _order(units, policy, entropy, stage, microbatch)
    frozen = _fill(units.weights, order.tolist(), ratio * units.total)
    return StageMasks(units=units, ratio=ratio, frozen=frozen)


def _step_draw_args(
    units: StageUnits, ratios: Sequence[float], *, seed: int, stage: int, step: int
) -> tuple[list[float], list[int]]:
    """The checked ratios and the (seed, stage, step) entropy of a draw of a whole step's masks."""
    if not isinstance(units, StageUnits):
        raise TypeError(f"units must be StageUnits, got {type(units).__name__}")
    targets = [check_ratio(f"ratios[{i}]", r) for i, r in enumerate(ratios)]
    entropy = [check_int(n, v, 0) for n, v in (("seed", seed), ("stage", stage), ("step", step))]
    return targets, entropy


def select_covering(
    units: StageUnits,
    ratios: Sequence[float],
    *,
    stage: int,
    step: int = 0,
    seed: int = 0,
    policy: SelectionPolicy | None = None,
) -> list[StageMasks]:
    """Masks of every microbatch of one stage at once, whose trainable units take turns.

    The policy ranks the units once (as for microbatch 0) into a circle; microbatch m trains the arc
    of consecutive units that starts where microbatch m - 1's arc ended and whose weight is closest to
    ``(1 - ratios[m]) * total``, and freezes the rest. When the trainable fractions add up to at least
    1 (plus rounding), every unit is trained by some microbatch of the step; independent draws
    (:func:`select`) leave a unit frozen in all M microbatches with probability about r^M (17% at
    r = 0.8, M = 8). Each realised fraction obeys the same bound as :func:`select`. The circle follows
    the policy's order, so a policy's preference (e.g. stage 0's front bias) shows in the order of the
    turns, not in how often a unit trains.
    """
    targets, entropy = _step_draw_args(units, ratios, seed=seed, stage=stage, step=step)
    circle = _order(units, policy, [*entropy, 1], stage, 0)
    w = units.weights[circle]
    n, total = len(w), units.total
    twice = np.concatenate([w, w])
    out, start = [], 0
    for ratio in targets:
        cum = np.concatenate([[0], np.cumsum(twice[start : start + n])])  # active weight of k = 0..n units
        k = int(np.argmin(np.abs(cum - (1.0 - ratio) * total)))
        frozen = np.ones(n, dtype=bool)
        frozen[circle[(start + np.arange(k)) % n]] = False
        out.append(StageMasks(units=units, ratio=ratio, frozen=frozen))
        start = (start + k) % n
    return out


def select_row_arcs(
    units: StageUnits, ratios: Sequence[float], *, stage: int, step: int = 0, seed: int = 0
) -> list[StageMasks]:
    """Masks of every microbatch of one stage at once, each layer's row blocks taking turns on a
    circle of their own.

    A layer's blocks, in row order, lie end to end on a circle as long as the layer's weight, and a
    random point on it is where the turns start; microbatch m trains the blocks that start on the next
    ``1 - ratios[m]`` of the circle and freezes the rest. So every microbatch trains one contiguous
    run of rows of every layer (two where it wraps): the masked dW of a layer is one GEMM per run,
    written straight into dW's rows (the scattered blocks of :func:`select_covering` need a gather on
    the CPU). Every block trains with probability ``1 - ratios[m]``, so the expected frozen fraction
    is exact, and every layer is off its share by less than its largest block:
    ``|realised - ratios[m]| < (sum of each layer's largest block) / total``. As with
    :func:`select_covering`, when the trainable shares add up to at least 1, every block trains in
    some microbatch of the step. A whole-tensor unit is a circle of one. Random (seeded with seed,
    stage and step); it takes no policy.
    """
    targets, entropy = _step_draw_args(units, ratios, seed=seed, stage=stage, step=step)
    circle, before, length = units._circles
    start = np.random.default_rng([*entropy, 2]).random(len(length)) * length
    share = 1.0 - np.array(targets, dtype=np.float64)[:, None]
    turns = np.concatenate([[0.0], np.cumsum(share[:, 0])])[:-1, None]  # shares taken before m
    # a unit trains in m when it starts within m's arc, [start + turns * length, + share * length)
    offset = (before - start[circle] - turns * length[circle]) % length[circle]
    trained = offset < share * length[circle]
    return [StageMasks(units=units, ratio=r, frozen=~t) for r, t in zip(targets, trained)]
