"""Row-mask context and per-step row usage for FreezableLinear layers.

The caller states, per layer, which output rows take part in the weight gradient of the backward it is
about to run (or of the W queue it is about to flush)::

    with tfz.nn.use_row_masks({layer: mask_bool_O}):     # True = active row; None = all active
        loss.backward()

Masks are resolved when dW is computed: in the backward (immediate mode) or at
``WeightGradStore.flush`` (split mode). A layer named by no active context has all rows active.

The context is per thread, and it follows a backward into autograd's device worker threads: the state
is mirrored into torch's C++ thread-local Python-object slots, which autograd copies into the threads
that run a graph task (the same mechanism torch uses to make ``contextvars`` visible there).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from tfz import _torch_compat

__all__ = ["RowMask", "RowUsage", "prepare_row_masks", "reset_row_usage", "use_row_masks"]

_TLS_KEY = "tfz.nn.state"
_HAS_TORCH_TLS = _torch_compat.tls_supported()
_local = threading.local()


class RowMask:
    """A validated row mask of one layer with its all-active / all-frozen status decided once.

    ``active`` is a bool tensor [out_features] (True = the row receives weight gradient) or None when
    every row is active. Device copies are cached, so a prepared mask can be reused every step.
    """

    __slots__ = ("active", "n_active", "out_features", "_by_device")

    def __init__(self, mask: torch.Tensor | None, out_features: int):
        if mask is None:
            self.active, self.n_active = None, out_features
        else:
            if not isinstance(mask, torch.Tensor):
                raise TypeError(f"row mask must be a bool tensor or None, got {type(mask).__name__}")
            if mask.dtype != torch.bool:
                raise TypeError(f"row mask must have dtype torch.bool, got {mask.dtype}")
            if tuple(mask.shape) != (out_features,):
                raise ValueError(f"row mask has shape {tuple(mask.shape)}, expected ({out_features},)")
            self.n_active = int(mask.sum())  # one host sync per prepared mask, not per backward
            self.active = None if self.n_active == out_features else mask.detach()
        self.out_features = out_features
        self._by_device: dict[torch.device, torch.Tensor] = {}

    @property
    def all_active(self) -> bool:
        return self.active is None

    @property
    def all_frozen(self) -> bool:
        return self.n_active == 0

    def on(self, device: torch.device) -> torch.Tensor | None:
        """The active-row mask on ``device`` (None when every row is active)."""
        if self.active is None:
            return None
        if self.active.device == device:
            return self.active
        cached = self._by_device.get(device)
        if cached is None:
            cached = self._by_device[device] = self.active.to(device)
        return cached

    def __repr__(self) -> str:
        return f"RowMask(active={self.n_active}/{self.out_features})"


_ALL_ACTIVE: dict[int, RowMask] = {}


def _all_active(out_features: int) -> RowMask:
    mask = _ALL_ACTIVE.get(out_features)
    if mask is None:
        mask = _ALL_ACTIVE[out_features] = RowMask(None, out_features)
    return mask


def _check_layer(layer: Any) -> None:
    if not getattr(layer, "supports_row_masks", False):
        raise TypeError(f"row masks apply to FreezableLinear layers, got {type(layer).__name__}")


def prepare_row_masks(masks: Mapping[Any, torch.Tensor | RowMask | None]) -> dict[Any, RowMask]:
    """Validate ``{layer: mask}`` once (mask: bool [out_features], True = active; None = all active).

    The result can be passed to :func:`use_row_masks` every step without re-validating.
    """
    if not isinstance(masks, Mapping):
        raise TypeError(f"masks must be a mapping layer -> mask, got {type(masks).__name__}")
    prepared = {}
    for layer, mask in masks.items():
        _check_layer(layer)
        if isinstance(mask, RowMask):
            if mask.out_features != layer.out_features:
                raise ValueError(
                    f"RowMask for {mask.out_features} rows given for a layer with {layer.out_features} rows"
                )
            prepared[layer] = mask
        else:
            prepared[layer] = RowMask(mask, layer.out_features)
    return prepared


@dataclass(frozen=True)
class _Capture:
    store: Any
    key: tuple[int, int]


@dataclass(frozen=True)
class _State:
    """Immutable snapshot; a backward keeps the snapshot that was current when it started."""

    masks: tuple[dict[Any, RowMask], ...] = ()
    capture: _Capture | None = None


def _current_state() -> _State | None:
    if _HAS_TORCH_TLS and _torch_compat.tls_has(_TLS_KEY):
        return _torch_compat.tls_get(_TLS_KEY)
    return getattr(_local, "state", None)


def _set_state(state: _State | None) -> None:
    _local.state = state
    if _HAS_TORCH_TLS:
        if state is None:
            # erase rather than store None: a Python object left in C++ TLS at thread exit can deadlock
            if _torch_compat.tls_has(_TLS_KEY):
                _torch_compat.tls_remove(_TLS_KEY)
        else:
            _torch_compat.tls_stash(_TLS_KEY, state)


@contextmanager
def _push(state: _State) -> Iterator[None]:
    previous = getattr(_local, "state", None)
    _set_state(state)
    try:
        yield
    finally:
        _set_state(previous)


@contextmanager
def use_row_masks(masks: Mapping[Any, torch.Tensor | RowMask | None]) -> Iterator[None]:
    """Make ``{layer: mask}`` the row masks of this thread (and of the backwards it starts).

    Args:
        masks: FreezableLinear -> bool tensor [out_features] (True = active), a :class:`RowMask`, or
            None (all rows active). An all-False mask freezes the whole layer. Contexts nest; the
            innermost one that names a layer decides for it. Layers named by no context are all active.
    """
    prepared = prepare_row_masks(masks)
    state = getattr(_local, "state", None) or _State()
    with _push(_State(masks=(*state.masks, prepared), capture=state.capture)):
        yield


@contextmanager
def _capture(store: Any, key: tuple[int, int]) -> Iterator[None]:
    state = getattr(_local, "state", None) or _State()
    if state.capture is not None:
        raise RuntimeError(
            f"a W capture for (stage, microbatch) {state.capture.key} is already active in this thread; "
            f"cannot start one for {key}"
        )
    with _push(_State(masks=state.masks, capture=_Capture(store, key))):
        yield


def _resolve_mask(state: _State | None, layer: Any) -> RowMask:
    if state is not None:
        for masks in reversed(state.masks):
            mask = masks.get(layer)
            if mask is not None:
                return mask
    return _all_active(layer.out_features)


class RowUsage:
    """Rows of one layer that received a weight-gradient contribution since the last reset.

    ``calls`` counts dW computations (one per microbatch backward or W flush, fully frozen ones
    included); :attr:`counts` gives, per row, the calls in which the row was active. ``tfz.optim``
    reads both. All-active calls are counted in Python, so the unmasked path launches no kernel.
    """

    __slots__ = ("calls", "device", "full_calls", "out_features", "partial")

    def __init__(self, out_features: int):
        self.out_features = out_features
        self.calls = 0
        self.full_calls = 0
        self.partial: torch.Tensor | None = None
        """int32 [out_features]: active counts of the partially masked calls (None until one)."""
        self.device: torch.device | None = None

    def record(self, mask: RowMask, device: torch.device) -> None:
        self.calls += 1
        self.device = device
        if mask.all_frozen:
            return
        active = mask.on(device)
        if active is None:
            self.full_calls += 1
            return
        if self.partial is None or self.partial.device != device:
            self.partial = torch.zeros(mask.out_features, dtype=torch.int32, device=device)
        self.partial.add_(active)

    @property
    def counts(self) -> torch.Tensor | None:
        """int32 [out_features]: calls in which each row was active; None when no row ever was."""
        if self.partial is None:
            if self.full_calls == 0:
                return None
            return torch.full((self.out_features,), self.full_calls, dtype=torch.int32, device=self.device)
        return self.partial + self.full_calls if self.full_calls else self.partial

    def reset(self) -> None:
        self.calls = 0
        self.full_calls = 0
        self.partial = None

    def __repr__(self) -> str:
        return f"RowUsage(calls={self.calls}, all_active_calls={self.full_calls})"


def reset_row_usage(module: torch.nn.Module) -> None:
    """Forget the recorded row usage of every FreezableLinear in ``module`` (e.g. after a skipped step)."""
    for sub in module.modules():
        usage = getattr(sub, "row_usage", None)
        if isinstance(usage, RowUsage):
            usage.reset()
