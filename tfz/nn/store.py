"""Per-stage W queue: FreezableLinear weight gradients deferred from B/I to the W action.

The WeightGradStore pattern of Megatron zero-bubble and DualPipe, keyed by (stage, microbatch)::

    store = WeightGradStore()
    with store.capture(stage, mb):          # I action: dX now, dW queued
        torch.autograd.backward(outputs, grads)
    ...
    with tfz.nn.use_row_masks(masks):       # W action: the mask is resolved now
        store.flush(stage, mb)

Microbatches may be flushed in any order. Flushing accumulates into ``weight.grad`` (allocated when
None, except for a fully frozen layer) or ``weight.main_grad``, so autograd hooks on the weights do
not fire for deferred work. A backward that runs outside any capture does not enqueue (it computes dW
at once), and neither does one that does not need the weight gradient (e.g. a metadata-inference
``autograd.grad`` over the stage inputs inside a capture).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from tfz.nn.context import _capture, _current_state, _resolve_mask, use_row_masks
from tfz.nn.function import apply_weight_grads

__all__ = ["WeightGradStore"]


@dataclass(frozen=True)
class _Work:
    layer: Any
    x: torch.Tensor
    """[..., I] saved input."""
    dy: torch.Tensor
    """[..., O] output gradient."""
    weight: bool
    bias: bool


def _key(stage: int, microbatch: int) -> tuple[int, int]:
    for name, value in (("stage", stage), ("microbatch", microbatch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return (stage, microbatch)


class WeightGradStore:
    """Deferred dW work of FreezableLinear layers, queued per (stage, microbatch). Thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._pending: dict[tuple[int, int], list[_Work]] = {}
        self._flushed: set[tuple[int, int]] = set()

    @contextmanager
    def capture(self, stage: int, microbatch: int) -> Iterator[None]:
        """Queue, instead of computing, the dW of every backward started in this block by this thread.

        Capturing the same key again before its flush appends to its queue.
        """
        key = _key(stage, microbatch)
        with _capture(self, key):
            with self._lock:
                self._pending.setdefault(key, [])
                self._flushed.discard(key)
            yield

    def _enqueue(self, key, layer, x, dy, weight: bool, bias: bool) -> None:
        with self._lock:
            queue = self._pending.get(key)
            if queue is None:
                raise RuntimeError(f"W queue for (stage, microbatch) {key} was cleared during its capture")
            queue.append(_Work(layer, x, dy, weight, bias))

    def flush(self, stage: int, microbatch: int, *, masks: Mapping[Any, Any] | None = None) -> int:
        """Run the queued dW work of (stage, microbatch); returns how many layer calls it ran.

        Masks come from the row-mask context active now; ``masks`` is a shortcut for wrapping this
        call in ``use_row_masks(masks)``.
        """
        key = _key(stage, microbatch)
        with self._lock:
            if key not in self._pending:
                if key in self._flushed:
                    raise ValueError(f"W of (stage, microbatch) {key} was already flushed")
                pending = sorted(self._pending)
                raise ValueError(f"no captured backward for (stage, microbatch) {key}; pending: {pending}")
            work = self._pending.pop(key)
            self._flushed.add(key)
        with use_row_masks(masks) if masks is not None else nullcontext(), torch.no_grad():
            state = _current_state()
            for item in work:
                apply_weight_grads(
                    item.layer,
                    item.x,
                    item.dy,
                    _resolve_mask(state, item.layer),
                    weight=item.weight,
                    bias=item.bias,
                    into_grad=True,
                )
        return len(work)

    def pending(self) -> list[tuple[int, int]]:
        """Captured (stage, microbatch) keys not flushed yet, sorted."""
        return sorted(self._pending)

    def clear(self, stage: int | None = None) -> int:
        """Drop queued work (of one stage, or all) without running it; returns how many items were dropped."""
        with self._lock:
            keys = [k for k in self._pending if stage is None or k[0] == stage]
            dropped = sum(len(self._pending.pop(k)) for k in keys)
            self._flushed = {k for k in self._flushed if stage is not None and k[0] != stage}
        return dropped

    def __repr__(self) -> str:
        return f"WeightGradStore(pending={self.pending()})"
