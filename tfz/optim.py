"""Optimizer semantics of row freezing, for torch's own optimizers (``tfz.optim``).

:func:`attach_row_freezing` registers step pre/post hooks on an optimizer. Per FreezableLinear of the
model it reads the layer's ``row_usage`` (which rows received a weight-gradient contribution since
the last step) and guarantees:

- **Rows frozen in every microbatch of the step** keep their weight and optimizer state bit for bit:
  no momentum / moment update, no weight decay. The bias entry of such a row is treated the same way.
  The rows are snapshotted before ``optimizer.step()`` and restored after it. A layer frozen in every
  microbatch has ``.grad is None``, so torch skips it on its own (and does not advance its step).
- **Rows frozen in only some microbatches** get the sum of their gradients over the microbatches in
  which they were active: no rescaling by default (the TimelyFreeze choice). With ``rescale=True`` each
  row's gradient is multiplied by ``calls / active_calls`` (microbatches through the layer / those in
  which the row was active), making it an unbiased estimate of the full sum.
- ``step_scale`` (s) scales the step a partly frozen row takes by ``(calls / active_calls) ** s``:
  after the optimizer's step the row is set to ``before + factor * (after - before)``, its optimizer
  state as the step left it. Adam normalises each gradient by its running RMS, and a row's gradient
  from k of n microbatches carries about n/k times the noise variance of one from all n, so where
  noise dominates the row moves about sqrt(k/n) as far along the signal per step: ``s = 0.5`` gives
  that back (``tfz demo``'s setting, chosen by measurement: bench/RESULTS.md). ``s = -1`` scales the
  step by the row's share of the data. 0 (default) leaves the optimizer's step.
- Per-tensor scalar state advances whenever some row of the tensor is active, e.g. Adam's ``step``:
  a row that wakes up after being frozen uses the tensor's bias correction with its own (older)
  moments.
- When a parameter's state is created by a step in which some of its rows are frozen, those rows of
  its state tensors are set to zero: the initial value of Adam/AdamW/RMSprop moments; for SGD
  momentum, a zero buffer then gives ``momentum * 0 + grad``, which equals torch's first-step
  ``clone(grad)`` when ``dampening == 0``. (Optimizers with non-zero lazy initial state, such as
  Rprop's ``step_size``, see zeros there.)
- Layers with no backward through them since the last step (``row_usage.calls == 0``) are left to the
  optimizer unchanged, as are all other parameters.

Supported optimizers are those whose per-parameter state tensors are scalars or have the parameter's
shape (SGD, Adam, AdamW, Adagrad, RMSprop, ...); other state layouts raise TypeError. Usage is reset
after each step; call :meth:`RowFreezing.reset` (or ``tfz.nn.reset_row_usage``) when a step is skipped
(e.g. by a GradScaler on overflow). Weights tied to other modules are not supported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tfz._validate import check_bool, check_number
from tfz.nn import FreezableLinear

__all__ = ["RowFreezing", "attach_row_freezing"]


@dataclass
class _Snapshot:
    param: torch.Tensor
    rows: torch.Tensor
    """int64 [k]: frozen row indices."""
    weight: torch.Tensor
    """[k, ...] the frozen rows before the step."""
    state: dict[str, torch.Tensor]
    """name -> [k, ...] row-aligned state before the step."""
    fresh: bool
    """The parameter had no optimizer state before the step."""


def _row_aligned_state(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> dict[str, torch.Tensor]:
    aligned = {}
    for name, value in optimizer.state.get(param, {}).items():
        if not isinstance(value, torch.Tensor):
            continue
        if value.shape == param.shape:
            aligned[name] = value
        elif value.numel() > 1:
            raise TypeError(
                f"optimizer state {name!r} of shape {tuple(value.shape)} is not row-aligned with its "
                f"parameter of shape {tuple(param.shape)}; row freezing needs per-parameter state tensors "
                f"shaped like the parameter ({type(optimizer).__name__} is not supported)"
            )
    return aligned


def _per_row(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values`` [out] as ``like``'s dtype, shaped [out, 1, ...] to broadcast over ``like``'s rows."""
    return values.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


@dataclass
class _Partial:
    param: torch.Tensor
    before: torch.Tensor
    """The parameter before the step."""
    back: torch.Tensor
    """[out, 1, ...] per row: 1 - (calls / active calls) ** step_scale where partly frozen, else 0
    (the step's share taken back: ``after + back * (before - after)``)."""


class RowFreezing:
    """Hooks that give ``optimizer`` the row-freezing semantics above; ``remove()`` detaches them."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        *,
        rescale: bool = False,
        step_scale: float = 0.0,
    ):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.optimizer = optimizer
        self.rescale = check_bool("rescale", rescale)
        self.step_scale = check_number("step_scale", step_scale, low=-4.0, high=4.0)
        self._partial: list[_Partial] = []
        self.layers = [m for m in model.modules() if isinstance(m, FreezableLinear)]
        self._snapshots: list[_Snapshot] = []
        self._rescaled = False
        self._handles = [
            optimizer.register_step_pre_hook(self._before_step),
            optimizer.register_step_post_hook(self._after_step),
        ]

    def _params(self, layer: FreezableLinear) -> list[torch.Tensor]:
        in_optimizer = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        return [p for p in (layer.weight, layer.bias) if p is not None and id(p) in in_optimizer]

    @torch.no_grad()
    def rescale_grads(self) -> None:
        """Apply ``rescale`` now (e.g. before gradient clipping); the step then does not rescale again."""
        if self._rescaled or not self.rescale:
            return
        for layer in self.layers:
            usage = layer.row_usage
            counts_O = usage.counts
            if usage.calls == 0 or counts_O is None:
                continue
            scale_O = usage.calls / counts_O.clamp(min=1).double()
            for p in self._params(layer):
                if p.grad is not None:
                    p.grad.mul_(_per_row(scale_O, p.grad))
        self._rescaled = True

    def _snapshot_partial(self, layer: FreezableLinear, params: list[torch.Tensor]) -> None:
        """Remember the rows active in some but not all calls, and their step factors (``step_scale``)."""
        usage = layer.row_usage
        counts = usage.counts
        if counts is None:
            return
        partly = (counts > 0) & (counts < usage.calls)
        if not bool(partly.any()):
            return
        scaled = (usage.calls / counts.clamp(min=1).double()) ** self.step_scale
        back = torch.where(partly, 1.0 - scaled, 0.0)
        for p in params:
            self._partial.append(_Partial(p, p.detach().clone(), _per_row(back, p)))

    @torch.no_grad()
    def _before_step(self, optimizer, args, kwargs) -> None:
        self.rescale_grads()
        self._snapshots = []
        self._partial = []
        for layer in self.layers:
            usage = layer.row_usage
            if usage.calls == 0:
                continue
            params = [p for p in self._params(layer) if p.grad is not None]
            if not params:
                continue
            if self.step_scale != 0.0:
                self._snapshot_partial(layer, params)
            if usage.full_calls == 0 and usage.partial is None:  # frozen in every call
                rows = torch.arange(layer.out_features, device=params[0].device)
            elif usage.partial is None:  # every row was active in the unmasked calls
                continue
            else:
                rows = (usage.counts == 0).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            for p in params:
                state = _row_aligned_state(optimizer, p)
                self._snapshots.append(
                    _Snapshot(
                        param=p,
                        rows=rows,
                        weight=p.index_select(0, rows),
                        state={name: value.index_select(0, rows) for name, value in state.items()},
                        fresh=not optimizer.state.get(p),
                    )
                )

    @torch.no_grad()
    def _after_step(self, optimizer, args, kwargs) -> None:
        partial, self._partial = self._partial, []
        for part in partial:  # whole tensors: most rows are partly frozen under TimelyFreeze's plans
            part.param.lerp_(part.before, part.back)
        snapshots, self._snapshots = self._snapshots, []
        for snap in snapshots:
            snap.param.index_copy_(0, snap.rows, snap.weight)
        for snap in snapshots:
            state = optimizer.state.get(snap.param, {})
            if snap.fresh:  # state created by this step: frozen rows start from zero
                for value in _row_aligned_state(optimizer, snap.param).values():
                    value.index_fill_(0, snap.rows, 0)
            for name, rows in snap.state.items():
                state[name].index_copy_(0, snap.rows, rows)
        self.reset()

    def reset(self) -> None:
        """Forget this step's row usage and snapshots (called after every step)."""
        self._snapshots = []
        self._partial = []
        self._rescaled = False
        for layer in self.layers:
            layer.row_usage.reset()

    def remove(self) -> None:
        """Detach the hooks; the optimizer behaves like plain torch again."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __repr__(self) -> str:
        name = type(self.optimizer).__name__
        return (
            f"RowFreezing({name}, layers={len(self.layers)}, rescale={self.rescale}, "
            f"step_scale={self.step_scale:g})"
        )


def attach_row_freezing(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    *,
    rescale: bool = False,
    step_scale: float = 0.0,
) -> RowFreezing:
    """Give ``optimizer`` the row-freezing semantics of this module for the FreezableLinears of ``model``.

    The optimizer object is unchanged (LR schedulers, checkpoints and GradScaler keep working).
    """
    return RowFreezing(optimizer, model, rescale=rescale, step_scale=step_scale)
