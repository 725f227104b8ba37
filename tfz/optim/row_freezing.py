"""The row-freezing hooks (:class:`RowFreezing`); semantics in :mod:`tfz.optim`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tfz._validate import check_bool, check_number
from tfz.nn import FreezableLinear
from tfz.optim import row_adamw

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
    """Hooks that give ``optimizer`` the row-freezing semantics of :mod:`tfz.optim`; ``remove()``
    detaches them. With ``fused`` (default) a plain AdamW steps FreezableLinears in one pass (C++ on
    CPU, Triton on CUDA, no host synchronisation) where :func:`tfz.optim.row_adamw.fusable` holds
    (``fused_tensors``: how many in the last step)."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        *,
        rescale: bool = False,
        step_scale: float = 0.0,
        fused: bool = True,
    ):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.optimizer = optimizer
        self.rescale = check_bool("rescale", rescale)
        self.step_scale = check_number("step_scale", step_scale, low=-4.0, high=4.0)
        self.fused = check_bool("fused", fused)
        self.fused_tensors = 0
        """Parameters stepped in one pass in the last step (the rest went through torch's step)."""
        self._held: list[tuple[torch.Tensor, torch.Tensor]] = []
        """(parameter, gradient) stepped natively: the gradient is hidden from torch's step, then restored."""
        self._partial: list[_Partial] = []
        self.layers = [m for m in model.modules() if isinstance(m, FreezableLinear)]
        """The FreezableLinears of ``model``; those with a parameter in ``optimizer`` are stepped and
        have their row usage reset by it."""
        _check_not_split(optimizer, model)
        self._snapshots: list[_Snapshot] = []
        self._rescaled = False
        self._handles = [
            optimizer.register_step_pre_hook(self._before_step),
            optimizer.register_step_post_hook(self._after_step),
        ]

    def _owned(self) -> list[tuple[FreezableLinear, list[torch.Tensor]]]:
        """(layer, its parameters in the optimizer) for each layer with some."""
        in_optimizer = _ids_in(self.optimizer)
        owned = []
        for layer in self.layers:
            params = [p for p in (layer.weight, layer.bias) if p is not None and id(p) in in_optimizer]
            if params:
                owned.append((layer, params))
        return owned

    @torch.no_grad()
    def rescale_grads(self) -> None:
        """Apply ``rescale`` now (e.g. before gradient clipping); the step then does not rescale again."""
        if self._rescaled or not self.rescale:
            return
        for layer, params in self._owned():
            self._rescale_layer(layer, params)
        self._rescaled = True

    def _rescale_layer(self, layer: FreezableLinear, params: list[torch.Tensor]) -> None:
        usage = layer.row_usage
        counts_O = usage.counts
        if usage.calls == 0 or counts_O is None:
            return
        scale_O = usage.calls / counts_O.clamp(min=1).double()
        for p in params:
            if p.grad is not None:
                p.grad.mul_(_per_row(scale_O, p.grad))

    def _step_natively(self, layer: FreezableLinear, params: list[torch.Tensor], groups: dict) -> bool:
        """Step ``params`` of ``layer`` in one pass if they all qualify; hide their gradients."""
        state = self.optimizer.state
        if not all(row_adamw.fusable(p, groups[id(p)], state.get(p)) for p in params):
            return False
        usage = layer.row_usage
        if usage.frozen_throughout:  # only the step count advances
            counts = torch.zeros(layer.out_features, dtype=torch.int32)
        elif usage.full_calls == usage.calls:  # every row in every call
            counts = None
        else:  # rows masked in some calls, or the whole layer frozen in some
            counts = usage.counts
        fold = self.rescale and not self._rescaled
        for p in params:
            row_adamw.step(
                p, groups[id(p)], state[p], counts, usage.calls, rescale=fold, step_scale=self.step_scale
            )
            self._held.append((p, p.grad))
            p.grad = None
        self.fused_tensors += len(params)
        return True

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
        self._snapshots = []
        self._partial = []
        self.fused_tensors = 0
        native = self.fused and row_adamw.optimizer_fusable(optimizer, args, kwargs)
        groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        for layer, params in self._owned():
            usage = layer.row_usage
            if usage.calls == 0:
                continue
            params = [p for p in params if p.grad is not None]
            if not params or (native and self._step_natively(layer, params, groups)):
                continue
            if self.rescale and not self._rescaled:
                self._rescale_layer(layer, params)
            if self.step_scale != 0.0:
                self._snapshot_partial(layer, params)
            if usage.frozen_throughout:
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
        self._rescaled = True

    @torch.no_grad()
    def _after_step(self, optimizer, args, kwargs) -> None:
        self._restore_grads()
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
        """Forget this step's row usage of the layers this optimizer steps, and the snapshots (called
        after every step)."""
        self._restore_grads()
        self._snapshots = []
        self._partial = []
        self._rescaled = False
        for layer, _ in self._owned():
            layer.row_usage.reset()

    def _restore_grads(self) -> None:
        held, self._held = self._held, []
        for p, grad in held:
            p.grad = grad

    def remove(self) -> None:
        """Detach the hooks; the optimizer behaves like plain torch again."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __repr__(self) -> str:
        name = type(self.optimizer).__name__
        return (
            f"RowFreezing({name}, layers={len(self.layers)}, rescale={self.rescale}, "
            f"step_scale={self.step_scale:g}, fused={self.fused})"
        )


def _ids_in(optimizer: torch.optim.Optimizer) -> set[int]:
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


def _check_not_split(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """ValueError if a FreezableLinear of ``model`` has some trainable parameters in ``optimizer`` and
    others outside it: its row usage is read and reset by one optimizer's step."""
    in_optimizer = _ids_in(optimizer)
    for name, layer in model.named_modules():
        if not isinstance(layer, FreezableLinear):
            continue
        trainable = [p for p in (layer.weight, layer.bias) if p is not None and p.requires_grad]
        held = sum(id(p) in in_optimizer for p in trainable)
        if 0 < held < len(trainable):
            raise ValueError(
                f"FreezableLinear {name or type(model).__name__!r} has {held} of its {len(trainable)} "
                "trainable parameters in this optimizer: row freezing steps a layer in one optimizer; "
                "put its weight and bias in the same one (param groups can give them their own settings)"
            )


def attach_row_freezing(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    *,
    rescale: bool = False,
    step_scale: float = 0.0,
    fused: bool = True,
) -> RowFreezing:
    """Give ``optimizer`` the row-freezing semantics of this module for the FreezableLinears of ``model``.

    The optimizer object is unchanged (LR schedulers, checkpoints and GradScaler keep working).
    """
    return RowFreezing(optimizer, model, rescale=rescale, step_scale=step_scale, fused=fused)
