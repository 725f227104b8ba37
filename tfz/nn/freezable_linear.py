"""FreezableLinear: a drop-in nn.Linear whose weight gradient can skip rows and be deferred.

Same parameters, state_dict keys and forward as ``nn.Linear`` (``isinstance(m, nn.Linear)`` holds);
only the backward differs, see :mod:`tfz.nn.function`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from tfz.nn.context import RowUsage
from tfz.nn.function import freezable_linear

__all__ = ["FreezableLinear", "convert_to_freezable"]


class FreezableLinear(nn.Linear):
    """``nn.Linear`` with row-maskable, optionally deferred weight gradients.

    Row masks come from :func:`tfz.nn.use_row_masks` (none given: every row active, and the grads
    equal ``nn.Linear``'s); deferral from :meth:`tfz.nn.WeightGradStore.capture`. ``row_usage``
    records which rows received a contribution since the last optimizer step (see :mod:`tfz.optim`).
    """

    supports_row_masks = True
    """Marker read by ``tfz.masks`` and the mask context (they do not import this class)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.row_usage = RowUsage(out_features)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """input: [..., in_features] -> [..., out_features]."""
        return freezable_linear(input, self.weight, self.bias, layer=self)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> FreezableLinear:
        """A FreezableLinear that shares ``linear``'s Parameter objects (no copy) and training mode."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        hooks = [
            name
            for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
            if getattr(linear, name, None)
        ]
        if hooks:
            raise ValueError(
                f"cannot convert a Linear with module hooks ({', '.join(hooks)}): they would be lost; "
                "convert before registering hooks (e.g. before FSDP/DDP wrapping)"
            )
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        return new

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, row_freezing=True"


def _is_plain_linear(module: nn.Module, fqn: str) -> bool:
    return type(module) is nn.Linear


def convert_to_freezable(
    model: nn.Module, filter_fn: Callable[[nn.Module, str], bool] | None = None
) -> nn.Module:
    """Swap ``nn.Linear`` modules of ``model`` for FreezableLinear in place; returns the model.

    Args:
        model: any module; if it is itself a selected Linear, the new module is returned.
        filter_fn: ``(module, fqn) -> bool`` picks the modules to swap (they must be ``nn.Linear``
            instances). Default: modules whose type is exactly ``nn.Linear`` (subclasses such as
            MultiheadAttention's ``out_proj`` and parametrized Linears are left alone).

    Parameters are shared, not copied, so optimizers built before the swap stay valid. A Linear
    reachable under several names is swapped once and stays shared.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be callable (module, fqn) -> bool, got {type(filter_fn).__name__}")
    select = filter_fn or _is_plain_linear
    swapped: dict[int, nn.Module] = {}

    def convert(module: nn.Module, fqn: str) -> nn.Module:
        if id(module) in swapped:
            return swapped[id(module)]
        for name, child in list(module.named_children()):
            new_child = convert(child, f"{fqn}.{name}" if fqn else name)
            if new_child is not child:
                setattr(module, name, new_child)
        result = module
        if not isinstance(module, FreezableLinear) and select(module, fqn):
            if not isinstance(module, nn.Linear):
                raise TypeError(f"filter_fn selected {fqn or 'the model'} of type {type(module).__name__}")
            result = FreezableLinear.from_linear(module)
        swapped[id(module)] = result
        return result

    return convert(model, "")
