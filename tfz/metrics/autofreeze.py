"""AutoFreeze (Liu, Agarwal, Venkataraman, 2021): freeze a growing front prefix of layers.

**Rule** (per stage, every ``interval`` optimizer steps):

- each parameter's gradient is accumulated over the interval; at its end, per layer l,
  G_l = Σ_{parameters of l} ‖Σ_interval grad‖₁ (``accumulate="grad"``, AutoFreeze's code) or
  G_l = Σ_interval Σ_{parameters of l} ‖grad‖₁ (``accumulate="norm"``, no per-scalar state);
- the first interval only records G (nothing freezes);
- change rate c_l = |G_l^prev − G_l| / G_l^prev for the active layers;
- τ = the ``percentile``-th percentile (numpy's linear interpolation, as AutoFreeze's ``np.percentile``)
  of c over the active layers;
- the new boundary is the first active layer with c_l >= τ; with the guard s = max(s_old, s_new)
  the frozen prefix only grows (no flip-flop between checks), and at least one layer of the stage
  stays active.

A layer is a parameter name's index in ``layer_pattern`` (default ``layers.<i>.``, e.g.
``layers.5.attention.wq``); layers are ordered by that index. Parameters matching
``embedding_pattern`` (default: containing ``embed``) are frozen together with the prefix once it is
non-empty; everything else (final norm, output head) is never frozen, as in AutoFreeze. Every unit of
a frozen layer is a candidate.

**Per-stage prefix, and why.** With pipeline stages a rank sees only its own layers. AutoFreeze's
single global prefix would need, at every check, an all-gather of the per-layer G (a few floats per
layer) across pipeline ranks, and it would freeze nothing on stage k until stages 0..k-1 are frozen
entirely. tfz uses one prefix per stage, as the TimelyFreeze authors' ``AutoFreezer`` does: no
communication and no coupling to the runtime's process groups; each stage's backward gets cheaper
as its own front layers converge, which is what shortens the pipeline's critical path (a global
prefix would speed up stage 0 only for most of training); and τ is the percentile over the stage's
own active layers. The price: a stage may freeze a layer that a global prefix would not yet allow.

**State.** Per stage: the prefix, the previous G per layer, the last c and τ, the window start. In
"grad" mode one accumulator per parameter of the active layers (fp32, fp64 for fp64 parameters),
freed when its layer freezes; in "norm" mode one scalar per layer.

**Deviations from AutoFreeze's code and the TimelyFreeze authors' ``AutoFreezer``:**

1. Per-stage prefix (above); AutoFreeze has one global prefix.
2. The monotonic guard s = max(s_old, s_new). AutoFreeze scans from layer 0 with c = 0 for frozen
   layers, so τ = 0 would unfreeze everything; TimelyFreeze's code has no guard and alternates
   (a frozen tensor's ratio jumps to 1 and the layer unfreezes at the next check). Here frozen layers
   are no longer judged at all.
3. The interval is a fixed number of steps (default 10, TimelyFreeze's check interval); AutoFreeze
   uses total_steps / 20. TimelyFreeze's code uses the last step's gradient only and sums per-tensor
   change rates; here G is the layer-level norm of the gradient accumulated over the interval
   (AutoFreeze) or its cheap "norm" variant.
4. A layer with G^prev = 0 has no change rate: c is unknown, the layer is left out of τ and counts
   as changing (it bounds the prefix); G^prev = G = 0 gives c = 0.
5. Frozen means no weight gradient in any microbatch (:class:`tfz.metrics.AutoFreezeFreezer`); the
   forward is unchanged (no ``eval()`` mode, no activation caching) and the optimizer is not rebuilt
   (AutoFreeze's code creates a new optimizer at every freeze event, resetting every Adam moment;
   ``tfz.optim`` keeps the frozen rows' state and leaves the active ones alone).
6. Under a hybrid policy the prefix's units are candidates that may still train in microbatches the
   budget leaves them; the gradients of rows frozen in some microbatches are what they are (partial
   sums), which adds noise to G in that mode.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tfz._validate import check_bool, check_int, check_number
from tfz.masks import StageUnits
from tfz.metrics.base import MetricBase, StageBinding

__all__ = ["AutoFreezeConfig", "AutoFreezeMetric", "AutoFreezeStats"]

_EMBEDDING = -1
_NEVER = -2


@dataclass(frozen=True)
class AutoFreezeConfig:
    """AutoFreeze settings (p = 50 as AutoFreeze; the TimelyFreeze tables use 80)."""

    percentile: float = 50.0
    """p in [0, 100]: τ is the p-th percentile of the active layers' change rates."""
    interval: int = 10
    """Optimizer steps per check."""
    accumulate: str = "grad"
    """"grad": ‖Σ grad‖₁ (one accumulator per parameter); "norm": Σ ‖grad‖₁ (one scalar per layer)."""
    layer_pattern: str = r"(?:^|\.)layers\.(\d+)(?:\.|$)"
    """Regex whose first group is a parameter's layer index."""
    embedding_pattern: str = r"embed"
    """Regex (searched) for embedding parameters, frozen with a non-empty prefix."""
    block_rows: int = 64
    """Rows per unit of a FreezableLinear (must equal the masks' block_rows)."""
    include_tensors: bool = True
    """Units for other parameter tensors (norms, embeddings) too."""

    def __post_init__(self):
        checked = {
            "percentile": check_number("percentile", self.percentile, low=0.0, high=100.0),
            "interval": check_int("interval", self.interval, 1),
            "block_rows": check_int("block_rows", self.block_rows, 1),
        }
        for name, value in checked.items():  # plain Python numbers (the config goes into state_dict)
            object.__setattr__(self, name, value)
        if self.accumulate not in ("grad", "norm"):
            raise ValueError(f"accumulate must be 'grad' or 'norm', got {self.accumulate!r}")
        object.__setattr__(self, "include_tensors", check_bool("include_tensors", self.include_tensors))
        for name in ("layer_pattern", "embedding_pattern"):
            try:
                compiled = re.compile(getattr(self, name))
            except (re.error, TypeError) as exc:
                raise ValueError(f"{name} is not a valid regex: {getattr(self, name)!r} ({exc})") from None
            if name == "layer_pattern" and compiled.groups < 1:
                raise ValueError(
                    f"layer_pattern needs a group capturing the index, got {self.layer_pattern!r}"
                )


@dataclass(frozen=True)
class AutoFreezeStats:
    """A copy of one stage's AutoFreeze state."""

    layers: tuple[int, ...]
    """Layer indices of the stage, ascending."""
    prefix: int
    """Number of frozen layers (the first ``prefix`` of ``layers``)."""
    checks: int
    """Completed intervals."""
    norms: np.ndarray
    """float64 [n_layers]: G of the last interval (0 for layers frozen before it)."""
    change: np.ndarray
    """float64 [n_layers]: c of the last check (NaN: frozen or unknown)."""
    tau: float
    """τ of the last check (NaN if none)."""


@dataclass
class _Stage:
    layers: tuple[int, ...]
    unit_layer: np.ndarray
    """int64 [n_units]: position in ``layers``, or _EMBEDDING, or _NEVER."""
    prefix: int
    window_start: int
    checks: int
    prev_norms: np.ndarray | None
    norms: np.ndarray
    change: np.ndarray
    tau: float
    acc: dict[str, torch.Tensor]
    acc_norm: list[Any]
    """Per layer: float or 0-dim tensor ("norm" mode)."""
    param_pos: dict[str, int] = dataclasses.field(default_factory=dict)
    """Parameter name -> layer position (-1: none); a cache, not saved."""


class AutoFreezeMetric(MetricBase):
    """AutoFreeze's gradient-norm change rate and monotonic per-stage prefix (module docstring).

    ``AutoFreezeMetric(config)`` or ``AutoFreezeMetric(percentile=80, ...)``.
    """

    kind = "autofreeze"

    def __init__(self, config: AutoFreezeConfig | None = None, **overrides: Any):
        if config is None:
            config = AutoFreezeConfig(**overrides)
        elif not isinstance(config, AutoFreezeConfig):
            raise TypeError(f"config must be an AutoFreezeConfig, got {type(config).__name__}")
        elif overrides:
            config = dataclasses.replace(config, **overrides)
        super().__init__(config)
        self._layer_re = re.compile(config.layer_pattern)
        self._embed_re = re.compile(config.embedding_pattern)

    def layer_of(self, name: str) -> int | None:
        """The layer index of a parameter or module name, or None."""
        match = self._layer_re.search(name)
        return None if match is None else int(match.group(1))

    def _unit_layers(self, units: StageUnits, layers: tuple[int, ...]) -> np.ndarray:
        pos = {layer: i for i, layer in enumerate(layers)}
        out = np.full(len(units), _NEVER, dtype=np.int64)
        for i, unit in enumerate(units.units):
            layer = self.layer_of(unit.name)
            if layer is not None and layer in pos:
                out[i] = pos[layer]
            elif layer is None and self._embed_re.search(unit.name):
                out[i] = _EMBEDDING
        return out

    def _layer_params(self, module: Any, layers: tuple[int, ...], cache: dict[str, int] | None = None):
        """(name, layer position, parameter) of the trainable parameters of ``layers``; ``cache`` keeps
        the name -> position map (-1: not a layer parameter) so names are parsed once per stage."""
        pos = {layer: i for i, layer in enumerate(layers)}
        for name, param in module.named_parameters():
            p = None if cache is None else cache.get(name)
            if p is None:
                layer = self.layer_of(name)
                p = pos[layer] if layer is not None and layer in pos else -1
                if cache is not None:
                    cache[name] = p
            if p >= 0 and param.requires_grad:
                yield name, p, param

    def _new_state(self, units: StageUnits, module: Any, step: int) -> _Stage:
        layers = tuple(
            sorted({self.layer_of(n) for n, p in module.named_parameters() if p.requires_grad} - {None})
        )
        n = len(layers)
        return _Stage(
            layers=layers,
            unit_layer=self._unit_layers(units, layers),
            prefix=0,
            window_start=step,
            checks=0,
            prev_norms=None,
            norms=np.zeros(n),
            change=np.full(n, np.nan),
            tau=math.nan,
            acc={},
            acc_norm=[0.0] * n,
        )

    @torch.no_grad()
    def _observe_stage(self, binding: StageBinding, module: Any, step: int) -> None:
        st: _Stage = binding.state
        grad_mode = self.config.accumulate == "grad"
        for name, pos, param in self._layer_params(module, st.layers, st.param_pos):
            if pos < st.prefix or param.grad is None:
                continue
            grad = param.grad.detach()
            if grad_mode:
                acc = st.acc.get(name)
                if acc is None:
                    st.acc[name] = grad.to(torch.promote_types(grad.dtype, torch.float32), copy=True)
                else:
                    if acc.device != grad.device:
                        acc = st.acc[name] = acc.to(grad.device)
                    acc.add_(grad)
            else:
                norm = grad.to(torch.promote_types(grad.dtype, torch.float32)).abs().sum()
                st.acc_norm[pos] = st.acc_norm[pos] + norm
        if step - st.window_start + 1 >= self.config.interval:
            self._check(st, module)
            st.window_start = step + 1

    def _check(self, st: _Stage, module: Any) -> None:
        n = len(st.layers)
        parts: list[list[Any]] = [[] for _ in range(n)]
        if self.config.accumulate == "grad":
            for name, pos, _ in self._layer_params(module, st.layers, st.param_pos):
                if pos >= st.prefix and name in st.acc:
                    parts[pos].append(st.acc[name].abs().sum().double())
        else:
            for pos in range(st.prefix, n):
                value = st.acc_norm[pos]
                parts[pos].append(value.double() if isinstance(value, torch.Tensor) else float(value))
        norms = np.array([float(sum(p)) if p else 0.0 for p in parts], dtype=np.float64)
        st.acc = {}
        st.acc_norm = [0.0] * n
        st.norms = norms
        st.checks += 1
        prev, st.prev_norms = st.prev_norms, norms
        st.change = np.full(n, np.nan)
        st.tau = math.nan
        if prev is None or n == 0:
            return  # the first interval only records G
        active = np.arange(st.prefix, n)
        g_prev, g = prev[active], norms[active]
        with np.errstate(divide="ignore", invalid="ignore"):
            change = np.where(g_prev > 0, np.abs(g_prev - g) / g_prev, np.where(g == 0, 0.0, np.nan))
        st.change[active] = change
        known = ~np.isnan(change)
        if not known.any():
            return
        st.tau = float(np.percentile(change[known], self.config.percentile))
        changing = np.isnan(change) | (change >= st.tau)
        first = int(np.argmax(changing)) if changing.any() else int(np.nanargmax(change))
        st.prefix = max(st.prefix, int(active[first]))

    # -- protocol ---------------------------------------------------------------------------------
    def _candidates(self, binding: StageBinding) -> np.ndarray:
        st: _Stage = binding.state
        layer = st.unit_layer
        return ((layer >= 0) & (layer < st.prefix)) | ((layer == _EMBEDDING) & (st.prefix > 0))

    def _scores(self, binding: StageBinding) -> np.ndarray:
        layer = binding.state.unit_layer
        # front to back: embeddings, then layer 0, 1, ...
        return np.where(layer == _EMBEDDING, 1.0, np.where(layer >= 0, -layer.astype(np.float64), -np.inf))

    def stats(self, stage: int) -> AutoFreezeStats:
        """A copy of the AutoFreeze state of ``stage`` (ValueError if it has not been observed)."""
        st: _Stage = self._require(stage).state
        return AutoFreezeStats(
            layers=st.layers,
            prefix=st.prefix,
            checks=st.checks,
            norms=st.norms.copy(),
            change=st.change.copy(),
            tau=st.tau,
        )

    # -- state_dict -------------------------------------------------------------------------------
    def _stage_to_state(self, binding: StageBinding) -> dict[str, Any]:
        st: _Stage = binding.state
        return {
            "layers": list(st.layers),
            "prefix": st.prefix,
            "window_start": st.window_start,
            "checks": st.checks,
            "prev_norms": None if st.prev_norms is None else st.prev_norms.tolist(),
            "norms": st.norms.tolist(),
            "change": st.change.tolist(),
            "tau": st.tau,
            "acc": dict(st.acc),
            "acc_norm": [float(v) for v in st.acc_norm],
        }

    def _stage_from_state(self, units: StageUnits, state: Mapping[str, Any]) -> _Stage:
        layers = tuple(int(x) for x in state["layers"])
        n = len(layers)

        def array(key: str) -> np.ndarray:
            arr = np.asarray(state[key], dtype=np.float64)
            if arr.shape != (n,):
                raise ValueError(f"state {key!r} has shape {arr.shape}, expected ({n},)")
            return arr.copy()

        prefix = int(state["prefix"])
        if not 0 <= prefix <= max(n - 1, 0):
            raise ValueError(f"state prefix {prefix} is out of range for {n} layers")
        acc = {}
        for name, value in state["acc"].items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(
                    f"state accumulator {name!r} must be a torch.Tensor, got {type(value).__name__}"
                )
            acc[str(name)] = value.detach().clone()
        acc_norm = [float(v) for v in state["acc_norm"]]
        if len(acc_norm) != n:
            raise ValueError(f"state 'acc_norm' has {len(acc_norm)} entries, expected {n}")
        return _Stage(
            layers=layers,
            unit_layer=self._unit_layers(units, layers),
            prefix=prefix,
            window_start=int(state["window_start"]),
            checks=int(state["checks"]),
            prev_norms=None if state["prev_norms"] is None else array("prev_norms"),
            norms=array("norms"),
            change=array("change"),
            tau=float(state["tau"]),
            acc=acc,
            acc_norm=acc_norm,
        )

    def _check_loaded(self, stage: int, binding: StageBinding, module: Any) -> None:
        st: _Stage = binding.state
        layers = tuple(
            sorted({self.layer_of(n) for n, p in module.named_parameters() if p.requires_grad} - {None})
        )
        if layers != st.layers:
            raise ValueError(
                f"stage {stage}: module layers {list(layers)} differ from the state's {list(st.layers)}"
            )
        names = {name for name, _, _ in self._layer_params(module, layers)}
        unknown = sorted(set(st.acc) - names)
        if unknown:
            raise ValueError(f"stage {stage}: state accumulators for unknown parameters {unknown}")
