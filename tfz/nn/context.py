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

import numpy as np
import torch

from tfz import _torch_compat
from tfz._validate import check_int
from tfz.kernels import ActiveRows
from tfz.kernels.rows import as_device, host_copy

__all__ = ["RowMask", "RowUsage", "prepare_row_masks", "reset_row_usage", "use_row_masks"]

_TLS_KEY = "tfz.nn.state"
_HAS_TORCH_TLS = _torch_compat.tls_supported()
_local = threading.local()


class RowMask:
    """A validated row mask of one layer with its all-active / all-frozen status decided once.

    ``rows`` is the :class:`tfz.kernels.ActiveRows` of a partly frozen layer (its bool mask
    ``rows.mask``, True = the row receives weight gradient, plus row runs and row-block lists, built
    once on the mask's device), or None when every row is active (``all_active``) or every row is
    frozen (``all_frozen``). Copies for other devices are cached, so a prepared mask can be reused
    every step without a host synchronisation.
    """

    __slots__ = ("rows", "n_active", "out_features", "_by_device")

    def __init__(self, mask, out_features: int, *, device=None):
        out_features = check_int("out_features", out_features, 0)
        (prepared,) = _prepare([mask], [out_features], device)
        self.rows, self.n_active, self.out_features = prepared.rows, prepared.n_active, out_features
        self._by_device: dict[torch.device, ActiveRows] = {}

    @classmethod
    def _make(cls, rows: ActiveRows | None, n_active: int, out_features: int) -> RowMask:
        mask = cls.__new__(cls)
        mask.rows, mask.n_active, mask.out_features = rows, n_active, out_features
        mask._by_device = {}
        return mask

    @property
    def all_active(self) -> bool:
        return self.n_active == self.out_features

    @property
    def all_frozen(self) -> bool:
        return self.n_active == 0

    def on(self, device: torch.device) -> ActiveRows | None:
        """The prepared mask on ``device`` (None when every row is active, or every row is frozen)."""
        rows = self.rows
        if rows is None or rows.device == device:
            return rows
        cached = self._by_device.get(device)
        if cached is None:
            cached = self._by_device[device] = rows.to(device)
        return cached

    def __repr__(self) -> str:
        return f"RowMask(active={self.n_active}/{self.out_features})"


def _host_mask(mask, out_features: int) -> np.ndarray | None:
    """``mask`` validated, as a numpy bool array (None: every row active)."""
    if mask is None:
        return None
    if isinstance(mask, torch.Tensor):
        if mask.dtype != torch.bool:
            raise TypeError(f"row mask must have dtype torch.bool, got {mask.dtype}")
        shape = tuple(mask.shape)
    elif isinstance(mask, np.ndarray):
        if mask.dtype != np.bool_:
            raise TypeError(f"row mask must have dtype bool, got {mask.dtype}")
        shape = mask.shape
    else:
        raise TypeError(
            f"row mask must be a bool tensor, a bool numpy array or None, got {type(mask).__name__}"
        )
    if shape != (out_features,):
        raise ValueError(f"row mask has shape {shape}, expected ({out_features},)")
    if isinstance(mask, torch.Tensor):
        mask = host_copy(mask, "row mask")  # a CUDA mask: one device-to-host copy, here, once
    return mask


def _prepare(masks: list, out_features: list[int], device) -> list[RowMask]:
    """RowMasks of ``masks`` (bool tensors, numpy bool arrays or None); the partly frozen ones are
    prepared on ``device`` (default: a tensor mask's own device, else the CPU) with one upload."""
    if device is not None:
        device = as_device(device)
    hosts = [_host_mask(m, n) for m, n in zip(masks, out_features)]
    counts = [n if h is None else int(h.sum()) for h, n in zip(hosts, out_features)]
    partial = [i for i, (c, n) in enumerate(zip(counts, out_features)) if 0 < c < n]
    by_device: dict[torch.device, list[int]] = {}
    if device is not None:
        by_device = {device: partial} if partial else {}
    else:  # each tensor mask on its own device, numpy masks on the CPU
        for i in partial:
            by_device.setdefault(as_device(getattr(masks[i], "device", torch.device("cpu"))), []).append(i)
    rows: dict[int, ActiveRows] = {}
    for where, idx in by_device.items():
        rows.update(zip(idx, ActiveRows.build_many([hosts[i] for i in idx], where)))
    return [RowMask._make(rows.get(i), c, n) for i, (c, n) in enumerate(zip(counts, out_features))]


_ALL_ACTIVE: dict[int, RowMask] = {}


def _all_active(out_features: int) -> RowMask:
    mask = _ALL_ACTIVE.get(out_features)
    if mask is None:
        mask = _ALL_ACTIVE[out_features] = RowMask(None, out_features)
    return mask


def _check_layer(layer: Any) -> None:
    if not getattr(layer, "supports_row_masks", False):
        raise TypeError(f"row masks apply to FreezableLinear layers, got {type(layer).__name__}")


def prepare_row_masks(masks: Mapping[Any, Any], *, device=None) -> dict[Any, RowMask]:
    """Validate and prepare ``{layer: mask}`` once; the result can be passed to :func:`use_row_masks`
    every step without re-validating, and its dW calls need no host synchronisation.

    Args:
        masks: layer -> bool tensor or numpy bool array [out_features] (True = active), a
            :class:`RowMask`, or None (all active).
        device: where the partly frozen masks are prepared (their row-block lists live there; default:
            a tensor mask's device, else the CPU). Preparing costs one upload for all of them, and one
            device-to-host copy per mask given as a CUDA tensor.
    """
    if not isinstance(masks, Mapping):
        raise TypeError(f"masks must be a mapping layer -> mask, got {type(masks).__name__}")
    prepared, todo = {}, []
    for layer, mask in masks.items():
        _check_layer(layer)
        if isinstance(mask, RowMask):
            if mask.out_features != layer.out_features:
                raise ValueError(
                    f"RowMask for {mask.out_features} rows given for a layer with {layer.out_features} rows"
                )
            prepared[layer] = mask
        else:
            todo.append((layer, mask))
    if todo:
        made = _prepare([m for _, m in todo], [layer.out_features for layer, _ in todo], device)
        prepared.update(zip([layer for layer, _ in todo], made))
    return {layer: prepared[layer] for layer in masks}


@dataclass(frozen=True)
class _Capture:
    store: Any
    key: tuple[int, int]


@dataclass(frozen=True)
class _State:
    """Immutable snapshot; a backward keeps the snapshot that was current when it started."""

    masks: tuple[dict[Any, RowMask], ...] = ()
    capture: _Capture | None = None
    in_place: bool = False
    """Masked layers add dW into ``.grad`` themselves in immediate mode (see :func:`use_row_masks`)."""


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
def use_row_masks(masks: Mapping[Any, Any], *, in_place: bool = False) -> Iterator[None]:
    """Make ``{layer: mask}`` the row masks of this thread (and of the backwards it starts).

    Args:
        masks: FreezableLinear -> bool tensor or numpy bool array [out_features] (True = active), a
            :class:`RowMask` (prepared once with :func:`prepare_row_masks`: no work per step), or
            None (all rows active). An all-False mask freezes the whole layer. Contexts nest; the
            innermost one that names a layer decides for it. Layers named by no context are all active.
        in_place: in immediate mode, a layer with frozen rows adds its dW for the active rows into
            ``weight.grad`` itself (allocated, zero, when None) and gives autograd no weight
            gradient, so no dense [out, in] gradient is made per backward. A layer with every row
            active does the same once its ``.grad`` exists (its first backward returns the fresh dW
            to autograd, which keeps it without a copy). Post-accumulate-grad hooks still run, after
            the add; hooks on the gradient value (``register_hook``) do not see it. For
            ``.backward()``: under ``torch.autograd.grad`` the dW still goes into ``.grad``.
    """
    prepared = prepare_row_masks(masks)
    state = getattr(_local, "state", None) or _State()
    in_place = bool(in_place) or state.in_place
    with _push(_State(masks=(*state.masks, prepared), capture=state.capture, in_place=in_place)):
        yield


@contextmanager
def _capture(store: Any, key: tuple[int, int]) -> Iterator[None]:
    state = getattr(_local, "state", None) or _State()
    if state.capture is not None:
        raise RuntimeError(
            f"a W capture for (stage, microbatch) {state.capture.key} is already active in this thread; "
            f"cannot start one for {key}"
        )
    with _push(_State(masks=state.masks, capture=_Capture(store, key), in_place=state.in_place)):
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
        self.out_features = check_int("out_features", out_features, 0)
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
        rows = mask.on(device)
        if rows is None:
            self.full_calls += 1
            return
        if self.partial is None or self.partial.device != device:
            self.partial = torch.zeros(mask.out_features, dtype=torch.int32, device=device)
        self.partial.add_(rows.mask)

    @property
    def frozen_throughout(self) -> bool:
        """No row was active in any call (every call froze the whole layer, or there was none)."""
        return self.partial is None and self.full_calls == 0

    @property
    def counts(self) -> torch.Tensor | None:
        """int32 [out_features]: calls in which each row was active; None when no row ever was."""
        if self.partial is None:
            if self.frozen_throughout:
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
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    for sub in module.modules():
        usage = getattr(sub, "row_usage", None)
        if isinstance(usage, RowUsage):
            usage.reset()
