"""APF, adaptive parameter freezing (Chen et al., ICDCS'21), on tfz's freezable units.

**Rule** (per unit, at every check round r; a unit is *active* in round r when its wake round w <= r):

- Δ = θ_now − θ_at_last_check for every scalar of every active unit (a check runs every
  ``check_interval`` optimizer steps, so Δ covers that many updates);
- per scalar j: E_j ← α E_j + (1 − α) Δ_j and A_j ← α A_j + (1 − α) |Δ_j| (both start at 0);
- per unit u: P_u = Σ_j |E_j| / Σ_j A_j (``aggregate="scalar"``, default) or
  |Σ_j E_j| / Σ_j A_j (``aggregate="block"``); P_u = 0 when Σ_j A_j = 0;
- AIMD on the freezing period L_u (in check rounds): L ← L + 1 if P_u < T, else L ← ⌊L / 2⌋; the next
  wake round is w = r + L + 1, so the unit is frozen for the next L rounds and wakes up on its own
  (non-monotonic);
- after the round, if more than ``tighten_ratio`` (0.8) of the stage's unit weight is frozen, T ← T / 2.

Frozen units are left out of the statistics while frozen: their E, A, P, L and w are kept unchanged.
The snapshot θ_at_last_check is refreshed for every unit at every check, so Δ always spans one round.

**How a unit aggregates its scalars, and why.** A unit freezes as a whole, so it needs one P. Both
EMAs are linear in Δ, so Σ_j A_j (and, in "block" mode, Σ_j E_j) are kept per unit from per-unit sums
of |Δ_j| (and Δ_j) without per-scalar state. P_u = Σ_j |E_j| / Σ_j A_j is the A-weighted mean of the
per-scalar APF values P_j = |E_j| / A_j: it is 1 when every scalar drifts steadily (whatever the signs)
and falls to APF's oscillation floor ≈ (1 − α) / (1 + α) ≈ 0.005 when they all oscillate. The cheaper
|Σ_j E_j| / Σ_j A_j ("block"; the authors' TimelyFreeze code uses |mean Δ| / mean |Δ| per whole
tensor) lets the signs of different scalars cancel: n scalars drifting steadily in independent
directions give about 1 / sqrt(n), i.e. 0.008 for a 64 x 256 block, so every large unit looks stable
from the second check on. That is why "scalar" is the default although it keeps one fp32 E_j per
scalar.

**State.** Per unit: Σ|E| (or Σ E), Σ A, P, L, w (numpy). Per scalar: the snapshot θ_at_last_check in
the parameter's own dtype and device, plus E_j in fp32 (fp64 for fp64 parameters) in "scalar" mode:
one extra copy of the stage's parameters (2 + 4 bytes per bf16 parameter) against APF's five
per-scalar arrays. Per stage: the round r, the threshold T, the step of the last snapshot.

**Deviations from the APF paper/code and the TimelyFreeze authors' ``APFFreezer``**, all deliberate:

1. Granularity: tfz units (row blocks with their bias rows, whole other tensors) instead of scalars
   (APF) or whole tensors (TimelyFreeze's code); the aggregation is described above.
2. Checks every ``check_interval`` optimizer steps (default 10, as TimelyFreeze's code; APF checks
   at every synchronisation round). Periods count check rounds as in APF (TimelyFreeze's code counts
   steps, which is the same up to its rounding of periods below one interval to 0).
3. The first check compares against the weights at the stage's first ``observe``; with both EMAs at
   0, P = 1 there for every unit that moved, so nothing freezes at the first check (APF behaves the
   same; TimelyFreeze's code only takes the snapshot at its first check).
4. A unit that never moved (Σ A = 0, e.g. zero gradients) gets P = 0 and counts as stable: that is
   what any ε in the denominator gives, since |E| <= A (TimelyFreeze's code uses max(A, 1e-10));
   APF's code divides by zero there (NaN, unstable).
5. Stable means P < T (APF's code); TimelyFreeze's code uses P <= T.
6. The threshold T and the > 80% rule are per stage (weight fraction of the stage's units; unit
   weight = number of weight scalars, so this is the fraction of scalars up to bias and norm
   scalars). APF applies the rule to the whole model, which across pipeline ranks would need
   communication; TimelyFreeze's code has no such rule. ``tighten_ratio=None`` turns it off.
7. Frozen means no weight gradient in any microbatch of the step (:class:`tfz.metrics.APFFreezer`;
   ``tfz.optim`` keeps the weights and optimizer state of such rows), not APF's roll-back of local
   updates (which saves communication only). Under a hybrid policy a candidate may still train in
   the microbatches the budget leaves it; it is still kept out of the statistics until its period
   ends (TimelyFreeze's hybrid judges every tensor at every check).
8. Not implemented: APF's aggressive/random freezing (APF#, APF++) and the 2020 code's halving of T
   at every learning-rate decay.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tfz._validate import check_bool, check_int, check_number, is_number, short_repr
from tfz.masks import LayerSpec, StageUnits
from tfz.metrics.base import MetricBase, StageBinding

__all__ = ["APFConfig", "APFMetric", "APFStats"]


@dataclass(frozen=True)
class APFConfig:
    """APF settings (defaults: APF's 2021 code for α and T, TimelyFreeze's code for the interval)."""

    alpha: float = 0.99
    """EMA decay of E and A."""
    threshold: float = 0.05
    """Initial stability threshold T (APF 2021 code and TimelyFreeze's default; halved by the > 80% rule)."""
    check_interval: int = 10
    """Optimizer steps per check round."""
    tighten_ratio: float | None = 0.8
    """Halve T after a round that leaves more than this weight fraction of a stage frozen; None: never."""
    aggregate: str = "scalar"
    """"scalar" (Σ|E_j| / ΣA_j, one fp32 E per scalar) or "block" (|ΣE_j| / ΣA_j, per-unit state only)."""
    block_rows: int = 64
    """Rows per unit of a FreezableLinear (must equal the masks' block_rows)."""
    include_tensors: bool = True
    """Judge other parameter tensors (norms, embeddings) as whole units too."""

    def __post_init__(self):
        if not (is_number(self.alpha) and 0 < self.alpha < 1):
            raise ValueError(f"alpha must be a number in (0, 1), got {short_repr(self.alpha)}")
        tighten = self.tighten_ratio
        if not (tighten is None or (is_number(tighten) and 0 <= tighten < 1)):
            raise ValueError(f"tighten_ratio must be None or a number in [0, 1), got {short_repr(tighten)}")
        checked = {
            "alpha": float(self.alpha),
            "threshold": check_number("threshold", self.threshold, low=0.0, low_open=True),
            "check_interval": check_int("check_interval", self.check_interval, 1),
            "tighten_ratio": None if tighten is None else float(tighten),
            "block_rows": check_int("block_rows", self.block_rows, 1),
        }
        for name, value in checked.items():  # plain Python numbers (the config goes into state_dict)
            object.__setattr__(self, name, value)
        if self.aggregate not in ("scalar", "block"):
            raise ValueError(f"aggregate must be 'scalar' or 'block', got {self.aggregate!r}")
        object.__setattr__(self, "include_tensors", check_bool("include_tensors", self.include_tensors))


@dataclass(frozen=True)
class APFStats:
    """A copy of one stage's APF state (arrays are [n_units], in unit order)."""

    round: int
    """Check rounds done."""
    threshold: float
    """Current T."""
    drift: np.ndarray
    """float64: Σ_j |E_j| ("scalar") or |Σ_j E_j| ("block") at the unit's last judgement."""
    path: np.ndarray
    """float64: Σ_j A_j."""
    perturbation: np.ndarray
    """float64: P at the unit's last judgement (inf before the first one)."""
    period: np.ndarray
    """int64: freezing period L in rounds."""
    wake: np.ndarray
    """int64: the round in which the unit is next active."""
    frozen: np.ndarray
    """bool: wake > round, the candidates."""


@dataclass
class _Stage:
    round: int
    threshold: float
    snapshot_step: int
    drift: np.ndarray
    ema: np.ndarray
    """float64 [n]: Σ_j E_j ("block" mode)."""
    path: np.ndarray
    perturbation: np.ndarray
    period: np.ndarray
    wake: np.ndarray
    snapshot: dict[str, torch.Tensor]
    scalar_ema: dict[str, torch.Tensor]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _spec_views(units: StageUnits, module: Any):
    """Per spec: (first unit position, row starts of its units, [(param name, parameter as [R, k])])."""
    position = 0
    for spec in units.specs:
        if isinstance(spec, LayerSpec):
            layer = module.get_submodule(spec.name)
            tensors = [(_join(spec.name, "weight"), layer.weight)]
            if layer.bias is not None:
                tensors.append((_join(spec.name, "bias"), layer.bias.view(-1, 1)))
            starts = np.arange(0, spec.out_features, units.block_rows)
        else:
            tensors = [(spec.name, module.get_parameter(spec.name).view(1, -1))]
            starts = np.zeros(1, dtype=np.int64)
        yield position, starts, tensors
        position += len(starts)


class APFMetric(MetricBase):
    """APF's effective perturbation and AIMD freezing periods per unit (rules in the module docstring).

    ``APFMetric(config)`` or ``APFMetric(threshold=0.01, ...)`` (keyword overrides of APFConfig).
    """

    kind = "apf"

    def __init__(self, config: APFConfig | None = None, **overrides: Any):
        if config is None:
            config = APFConfig(**overrides)
        elif not isinstance(config, APFConfig):
            raise TypeError(f"config must be an APFConfig, got {type(config).__name__}")
        elif overrides:
            config = dataclasses.replace(config, **overrides)
        super().__init__(config)

    # -- state creation ---------------------------------------------------------------------------
    def _new_state(self, units: StageUnits, module: Any, step: int) -> _Stage:
        n = len(units)
        snapshot, scalar_ema = {}, {}
        with torch.no_grad():
            for _, _, tensors in _spec_views(units, module):
                for name, param in tensors:
                    snapshot[name] = param.detach().clone()
                    if self.config.aggregate == "scalar":
                        scalar_ema[name] = torch.zeros(
                            param.shape, dtype=_compute_dtype(param.dtype), device=param.device
                        )
        return _Stage(
            round=0,
            threshold=float(self.config.threshold),
            snapshot_step=step,
            drift=np.zeros(n),
            ema=np.zeros(n),
            path=np.zeros(n),
            perturbation=np.full(n, np.inf),
            period=np.zeros(n, dtype=np.int64),
            wake=np.zeros(n, dtype=np.int64),
            snapshot=snapshot,
            scalar_ema=scalar_ema,
        )

    # -- the check ----------------------------------------------------------------------------------
    def _observe_stage(self, binding: StageBinding, module: Any, step: int) -> None:
        st: _Stage = binding.state
        if step - st.snapshot_step < self.config.check_interval:
            return
        active = st.wake <= st.round
        abs_sum, signed_sum = self._unit_sums(binding.units, module, st, active)
        st.snapshot_step = step
        cfg, a = self.config, self.config.alpha
        st.path[active] = a * st.path[active] + (1 - a) * abs_sum[active]
        if cfg.aggregate == "block":
            st.ema[active] = a * st.ema[active] + (1 - a) * signed_sum[active]
            st.drift[active] = np.abs(st.ema[active])
        else:
            st.drift[active] = signed_sum[active]  # Σ_j |E_j| of the updated per-scalar EMAs
        path = st.path[active]
        st.perturbation[active] = np.where(path > 0, st.drift[active] / np.where(path > 0, path, 1.0), 0.0)
        stable = st.perturbation < st.threshold
        st.period[active & stable] += 1
        st.period[active & ~stable] //= 2
        st.wake[active] = st.round + st.period[active] + 1
        st.round += 1
        frozen = st.wake > st.round
        units = binding.units
        if cfg.tighten_ratio is not None and units.weights[frozen].sum() > cfg.tighten_ratio * units.total:
            st.threshold /= 2

    @torch.no_grad()
    def _unit_sums(
        self, units: StageUnits, module: Any, st: _Stage, active: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per unit: Σ_j |Δ_j| and (Σ_j Δ_j, or Σ_j |E_j| after the per-scalar EMA update); float64 [n]."""
        a = self.config.alpha
        scalar = self.config.aggregate == "scalar"
        abs_rows, signed_rows, starts_all = [], [], []
        for position, starts, tensors in _spec_views(units, module):
            n_rows = tensors[0][1].shape[0]
            sizes = np.diff(np.append(starts, n_rows))
            row_active = None
            abs_r = signed_r = None
            for name, param in tensors:
                now = param.detach()
                prev = st.snapshot[name]
                if prev.shape != now.shape:
                    raise ValueError(
                        f"parameter {name!r} has shape {tuple(now.shape)}, state has {tuple(prev.shape)}"
                    )
                if prev.device != now.device:
                    prev = st.snapshot[name] = prev.to(now.device)
                cd = _compute_dtype(now.dtype)
                delta = now.to(cd) - prev.to(cd)
                da = delta.abs().sum(1)
                if scalar:
                    ema = st.scalar_ema[name]
                    if ema.device != now.device:
                        ema = st.scalar_ema[name] = ema.to(now.device)
                    if row_active is None:
                        flags = np.repeat(active[position : position + len(starts)], sizes)
                        row_active = (
                            None if flags.all() else torch.from_numpy(np.flatnonzero(flags)).to(now.device)
                        )
                    if row_active is None:  # every row active: update in place
                        ema.mul_(a).add_(delta, alpha=1 - a)
                    elif row_active.numel():
                        rows = ema.index_select(0, row_active).mul_(a)
                        ema.index_copy_(
                            0, row_active, rows.add_(delta.index_select(0, row_active), alpha=1 - a)
                        )
                    ds = ema.abs().sum(1)
                else:
                    ds = delta.sum(1)
                abs_r = da if abs_r is None else abs_r + da
                signed_r = ds if signed_r is None else signed_r + ds
                prev.copy_(now)
            abs_rows.append(abs_r)
            signed_rows.append(signed_r)
            starts_all.append((position, starts))
        device = abs_rows[0].device
        rows = (
            torch.stack(
                [
                    torch.cat([r.to(device, torch.float64) for r in abs_rows]),
                    torch.cat([r.to(device, torch.float64) for r in signed_rows]),
                ]
            )
            .cpu()
            .numpy()
        )
        offsets = np.cumsum([0] + [r.shape[0] for r in abs_rows[:-1]])
        flat_starts = np.concatenate([off + s for off, (_, s) in zip(offsets, starts_all)])
        return np.add.reduceat(rows[0], flat_starts), np.add.reduceat(rows[1], flat_starts)

    def _check_loaded(self, stage: int, binding: StageBinding, module: Any) -> None:
        st: _Stage = binding.state
        params = {name for _, _, tensors in _spec_views(binding.units, module) for name, _ in tensors}
        if set(st.snapshot) != params:
            raise ValueError(
                f"stage {stage}: loaded snapshots {sorted(st.snapshot)} do not match the module's "
                f"parameters {sorted(params)}"
            )

    # -- protocol ---------------------------------------------------------------------------------
    def _candidates(self, binding: StageBinding) -> np.ndarray:
        st: _Stage = binding.state
        return st.wake > st.round

    def _scores(self, binding: StageBinding) -> np.ndarray:
        return -binding.state.perturbation  # most stable first

    def stats(self, stage: int) -> APFStats:
        """A copy of the APF state of ``stage`` (ValueError if it has not been observed)."""
        st: _Stage = self._require(stage).state
        return APFStats(
            round=st.round,
            threshold=st.threshold,
            drift=st.drift.copy(),
            path=st.path.copy(),
            perturbation=st.perturbation.copy(),
            period=st.period.copy(),
            wake=st.wake.copy(),
            frozen=st.wake > st.round,
        )

    # -- state_dict -------------------------------------------------------------------------------
    def _stage_to_state(self, binding: StageBinding) -> dict[str, Any]:
        st: _Stage = binding.state
        return {
            "round": st.round,
            "threshold": st.threshold,
            "snapshot_step": st.snapshot_step,
            "drift": st.drift.tolist(),
            "ema": st.ema.tolist(),
            "path": st.path.tolist(),
            "perturbation": st.perturbation.tolist(),
            "period": st.period.tolist(),
            "wake": st.wake.tolist(),
            "snapshot": dict(st.snapshot),
            "scalar_ema": dict(st.scalar_ema),
        }

    def _stage_from_state(self, units: StageUnits, state: Mapping[str, Any]) -> _Stage:
        n = len(units)
        arrays = {}
        for key, dtype in (
            ("drift", np.float64),
            ("ema", np.float64),
            ("path", np.float64),
            ("perturbation", np.float64),
            ("period", np.int64),
            ("wake", np.int64),
        ):
            arr = np.asarray(state[key], dtype=dtype)
            if arr.shape != (n,):
                raise ValueError(f"state {key!r} has shape {arr.shape}, expected ({n},)")
            arrays[key] = arr.copy()
        snapshot = {str(k): _tensor(k, v) for k, v in state["snapshot"].items()}
        scalar_ema = {str(k): _tensor(k, v) for k, v in state["scalar_ema"].items()}
        required, allowed = _param_names(units)
        expected_ema = set(snapshot) if self.config.aggregate == "scalar" else set()
        if not required <= set(snapshot) <= allowed or set(scalar_ema) != expected_ema:
            raise ValueError(
                f"state tensors {sorted(snapshot)} / {sorted(scalar_ema)} do not match the units' parameters "
                f"{sorted(required)}"
            )
        return _Stage(
            round=int(state["round"]),
            threshold=float(state["threshold"]),
            snapshot_step=int(state["snapshot_step"]),
            snapshot=snapshot,
            scalar_ema=scalar_ema,
            **arrays,
        )


def _param_names(units: StageUnits) -> tuple[set[str], set[str]]:
    """Parameter names the units need (weights, whole tensors) and may have (plus layer biases)."""
    required, allowed = set(), set()
    for spec in units.specs:
        if isinstance(spec, LayerSpec):
            required.add(_join(spec.name, "weight"))
            allowed.add(_join(spec.name, "bias"))
        else:
            required.add(spec.name)
    return required, required | allowed


def _tensor(name: Any, value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"state tensor {name!r} must be a torch.Tensor, got {type(value).__name__}")
    return value.detach().clone()
