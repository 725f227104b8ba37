"""FreezableLinear: a drop-in nn.Linear whose weight gradient can skip rows and be deferred.

Same parameters, state_dict keys and forward as ``nn.Linear`` (``isinstance(m, nn.Linear)`` holds);
only the backward differs, see :mod:`tfz.nn.function`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from tfz._validate import check_int
from tfz.nn.context import RowUsage
from tfz.nn.function import freezable_linear

torch.fx.wrap("freezable_linear")  # a call node in torch.fx traces (its checks cannot take Proxies)

__all__ = ["ConversionReport", "FreezableLinear", "convert_to_freezable", "linear_flops"]

logger = logging.getLogger("tfz.nn")


class FreezableLinear(nn.Linear):
    """``nn.Linear`` with row-maskable, optionally deferred weight gradients.

    Row masks come from :func:`tfz.nn.use_row_masks` (none given: every row active, and the grads
    equal ``nn.Linear``'s); deferral from :meth:`tfz.nn.WeightGradStore.capture`. ``row_usage``
    records which rows received a contribution since the last optimizer step (see :mod:`tfz.optim`).
    """

    supports_row_masks = True
    """Marker read by ``tfz.masks`` and the mask context (they do not import this class)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        in_features = check_int("in_features", in_features, 0)
        out_features = check_int("out_features", out_features, 0)
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


@dataclass(frozen=True)
class ConversionReport:
    """What :func:`convert_to_freezable` did: the linear layers it made freezable and the ``nn.Linear``
    instances it left alone, each with the reason."""

    converted: tuple[str, ...]
    """Qualified names of the converted layers ("" for the model itself)."""
    skipped: tuple[tuple[str, str], ...]
    """(qualified name, reason) of the ``nn.Linear`` instances left alone."""

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)} linear layer(s) to FreezableLinear"]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)}:")
            lines += [f"  {fqn or '<model>'}: {why}" for fqn, why in self.skipped]
        return "\n".join(lines)


_FREEZABLE_SUBCLASSES: dict[type, type] = {}


def _freezable_subclass(cls: type) -> type:
    """``Freezable<cls>``: FreezableLinear's forward on an nn.Linear subclass (its other methods kept)."""
    new = _FREEZABLE_SUBCLASSES.get(cls)
    if new is None:
        name = f"Freezable{cls.__name__}"
        body = {
            "__module__": __name__,
            "__qualname__": name,
            "_converted_from": cls,
            "__reduce_ex__": _reduce_freezable,
        }
        new = type(name, (FreezableLinear, cls), body)
        _FREEZABLE_SUBCLASSES[cls] = new
    return new


def _reduce_freezable(module: nn.Module, protocol: int):
    """Pickle a converted subclass instance by its original class (the generated one has no import path)."""
    return _new_freezable, (type(module)._converted_from,), module.__dict__.copy()


def _new_freezable(cls: type) -> nn.Module:
    """An empty ``Freezable<cls>`` instance for unpickling; its state is set after."""
    new = _freezable_subclass(cls)
    return new.__new__(new)


def _tied_elsewhere(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> the first name of a module holding it, for parameters held by several modules."""
    holders: dict[int, list[tuple[str, nn.Module]]] = {}
    for fqn, module in model.named_modules(remove_duplicate=False):
        for p in module._parameters.values():
            if p is not None and all(m is not module for _, m in holders.setdefault(id(p), [])):
                holders[id(p)].append((fqn, module))
    return {
        key: ", ".join(f"{fqn or '<model>'} ({type(m).__name__})" for fqn, m in held)
        for key, held in holders.items()
        if len(held) > 1
    }


def _unconvertible(module: nn.Module, parent: nn.Module | None, tied: dict[int, str]) -> str | None:
    """Why a selected ``nn.Linear`` cannot become freezable (None: it can)."""
    if isinstance(parent, nn.MultiheadAttention):
        return "nn.MultiheadAttention reads this layer's weight directly, not through its forward"
    if parametrize.is_parametrized(module):
        return "parametrized (torch.nn.utils.parametrize): its weight is computed on access"
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        return "uninitialized lazy module (it becomes a plain nn.Linear on its first forward): run one first"
    if not isinstance(module.weight, nn.Parameter):
        return "its weight is not a Parameter but computed by a hook (e.g. torch.nn.utils.prune)"
    if type(module).forward is not nn.Linear.forward:
        return f"{type(module).__qualname__} overrides nn.Linear.forward"
    shared = [tied[id(p)] for p in (module.weight, module.bias) if p is not None and id(p) in tied]
    if shared:
        return (
            f"its parameters are tied to other modules ({shared[0]}): a frozen row would drop their "
            "gradient to it"
        )
    return None


def _swap_class(module: nn.Linear) -> None:
    """Make an nn.Linear instance freezable in place (same object, parameters, buffers, hooks and
    attributes)."""
    module.__class__ = FreezableLinear if type(module) is nn.Linear else _freezable_subclass(type(module))
    module.row_usage = RowUsage(module.out_features)


def convert_to_freezable(
    model: nn.Module,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    *,
    report: bool = False,
) -> nn.Module | tuple[nn.Module, ConversionReport]:
    """Make the linear layers of ``model`` freezable (FreezableLinear) in place; returns the model.

    Args:
        model: any module, a Linear itself included.
        filter_fn: ``(module, fqn) -> bool`` picks the modules to convert (they must be ``nn.Linear``
            instances that can be converted, else TypeError / ValueError naming them, and nothing is
            converted). Default: every ``nn.Linear`` instance that can be converted; the others are
            skipped with a warning.
        report: also return a :class:`ConversionReport` (converted and skipped layers, with reasons).

    Each converted layer keeps its object, Parameters, buffers, hooks, attributes and methods (so
    optimizers built before stay valid, and a layer reachable under several names stays shared): its
    class becomes FreezableLinear, or for a subclass that keeps ``nn.Linear.forward`` (torchtitan's
    ``Linear``, ``NonDynamicallyQuantizableLinear``) a generated ``Freezable<Name>`` subclass of it and
    of FreezableLinear. Left alone (a selected one of these raises ValueError): subclasses that
    override ``forward``, parametrized Linears, Linears whose weight a hook computes (pruning),
    uninitialized lazy Linears, Linears whose parameters other modules also hold (a tied output layer
    and embedding), and the ``out_proj`` of ``nn.MultiheadAttention`` (which never calls its forward).
    Logs the report at INFO.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be callable (module, fqn) -> bool, got {type(filter_fn).__name__}")
    tied = _tied_elsewhere(model)
    selected: list[tuple[str, nn.Linear]] = []
    skipped: list[tuple[str, str]] = []
    for fqn, module in model.named_modules():  # each module once, under its first name
        if isinstance(module, FreezableLinear):
            continue
        where = fqn or "the model"
        if filter_fn is not None:
            if not filter_fn(module, fqn):
                if isinstance(module, nn.Linear):
                    skipped.append((fqn, "filter_fn returned False"))
                continue
            if not isinstance(module, nn.Linear):
                raise TypeError(f"filter_fn selected {where} of type {type(module).__name__}")
        elif not isinstance(module, nn.Linear):
            continue
        parent = model.get_submodule(fqn.rpartition(".")[0]) if fqn else None
        why = _unconvertible(module, parent, tied)
        if why is None:
            selected.append((fqn, module))
        elif filter_fn is not None:
            raise ValueError(f"filter_fn selected {where}, which cannot be made freezable: {why}")
        else:
            skipped.append((fqn, why))
    for _, module in selected:
        _swap_class(module)
    summary = ConversionReport(tuple(fqn for fqn, _ in selected), tuple(skipped))
    logger.info("tfz.nn.convert_to_freezable: %s", summary)
    unexpected = [(fqn, why) for fqn, why in skipped if why != "filter_fn returned False"]
    if unexpected:
        listed = "; ".join(f"{fqn or '<model>'}: {why}" for fqn, why in unexpected)
        logger.warning("tfz.nn.convert_to_freezable left %d nn.Linear alone: %s", len(unexpected), listed)
    return (model, summary) if report else model


def linear_flops(module: nn.Module) -> tuple[int, int]:
    """Per token through ``module``: (the weight-gradient FLOPs of its FreezableLinears, the forward,
    input-gradient and weight-gradient FLOPs of every ``nn.Linear``), 2 * in * out FLOPs apiece. The
    first over the second is the most of the linear layers' work that freezing can remove; the
    module's other work (attention's matmuls, norms, activations, a loss) only lowers that share."""
    sizes = [
        (m.in_features * m.out_features, isinstance(m, FreezableLinear))
        for m in module.modules()
        if isinstance(m, nn.Linear)
    ]
    return 2 * sum(n for n, freezable in sizes if freezable), 6 * sum(n for n, _ in sizes)
