"""Pure-Python stream timers with the interface of ``tfz._C.StreamTimer`` (used when it is not built).

``PythonHostTimer`` stamps ``time.perf_counter_ns``; ``TorchEventTimer`` keeps a pre-created pool of
``torch.cuda.Event(enable_timing=True)`` and resolves it like the native timer (one synchronisation per
stream, then elapsed times from the first record).
"""

from __future__ import annotations

import threading
import time

from tfz._validate import is_int

__all__ = ["PythonHostTimer", "TorchEventTimer", "check_capacity", "check_tag"]

MAX_CAPACITY = 1 << 24
_INT64 = (-(1 << 63), (1 << 63) - 1)


def check_capacity(capacity) -> int:
    """``capacity`` as a plain int in [1, 2**24] (as the native timer takes it); TypeError/ValueError
    naming it otherwise."""
    if not is_int(capacity):
        raise TypeError(f"capacity must be an int, got {type(capacity).__name__}")
    if not 1 <= capacity <= MAX_CAPACITY:
        raise ValueError(f"capacity must be in [1, {MAX_CAPACITY}], got {capacity}")
    return int(capacity)


def check_tag(tag) -> None:
    """Tags are str or int64 (as in the native timer)."""
    if isinstance(tag, str):
        return
    # a Python int, as the native timer's PyLong_Check (is_int refuses bool; numpy integers are no int)
    if not (isinstance(tag, int) and is_int(tag)):
        raise TypeError(f"tag must be a str or an int, got {type(tag).__name__}")
    if not _INT64[0] <= tag <= _INT64[1]:
        raise ValueError(f"tag out of int64 range: {tag!r}")


def _overflow(capacity: int) -> OverflowError:
    return OverflowError(
        f"StreamTimer overflow: all {capacity} slots hold unresolved records; "
        "call resolve() more often or raise capacity"
    )


class PythonHostTimer:
    """Host timestamps from ``time.perf_counter_ns``; ``stream`` is accepted and ignored."""

    clock = "host"
    device = -1

    def __init__(self, capacity: int = 4096):
        self._capacity = check_capacity(capacity)
        self._tags: list = []
        self._ns: list[int] = []
        self._lock = threading.Lock()

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def pending(self) -> int:
        return len(self._tags)

    def record(self, tag, stream=None) -> int:
        """Stamp ``tag`` now; returns its index in the current batch."""
        check_tag(tag)
        with self._lock:
            index = len(self._tags)
            if index == self._capacity:
                raise _overflow(self._capacity)
            self._ns.append(time.perf_counter_ns())
            self._tags.append(tag)
            return index

    def resolve(self) -> list[tuple]:
        """``[(tag, ms since the first record)]`` in record order; empties the batch."""
        with self._lock:
            tags, stamps = self._tags, self._ns
            self._tags, self._ns = [], []
        if not tags:
            return []
        origin = stamps[0]
        return [(tag, (ns - origin) / 1e6) for tag, ns in zip(tags, stamps)]

    def clear(self) -> None:
        """Drop unresolved records."""
        with self._lock:
            self._tags, self._ns = [], []


class TorchEventTimer:
    """Pre-created ``torch.cuda.Event`` pool on CUDA device ``device``; ``stream`` is a
    ``torch.cuda.Stream``, an int handle, or None for the device's current stream."""

    clock = "cuda-events"

    def __init__(self, capacity: int = 4096, device: int = 0):
        import torch

        if not torch.cuda.is_available():
            raise ValueError("TorchEventTimer times CUDA streams, but torch.cuda.is_available() is False")

        self._torch = torch
        self._capacity = check_capacity(capacity)
        self.device = int(device)
        self._events = [torch.cuda.Event(enable_timing=True) for _ in range(self._capacity)]
        self._tags: list = []
        self._streams: list = []
        self._lock = threading.Lock()

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def pending(self) -> int:
        return len(self._tags)

    def _stream(self, stream):
        cuda = self._torch.cuda
        if stream is None:
            return cuda.current_stream(self.device)
        if isinstance(stream, int) and is_int(stream):  # a Python int, as the native timer
            if stream < 0:
                raise ValueError(f"stream must be a non-negative CUDA stream handle, got {stream}")
            return cuda.ExternalStream(stream, device=self.device)
        if hasattr(stream, "cuda_stream"):
            return stream
        raise TypeError(
            f"stream must be a torch.cuda.Stream, an int handle or None, got {type(stream).__name__}"
        )

    def record(self, tag, stream=None) -> int:
        """Record the next pooled event for ``tag`` on ``stream``; returns its index."""
        check_tag(tag)
        stream = self._stream(stream)
        with self._lock:
            index = len(self._tags)
            if index == self._capacity:
                raise _overflow(self._capacity)
            self._events[index].record(stream)
            self._tags.append(tag)
            self._streams.append(stream.cuda_stream)
            return index

    def resolve(self) -> list[tuple]:
        """Synchronise the last event of each stream, return ``[(tag, ms since the first record)]``."""
        with self._lock:
            tags, streams = self._tags, self._streams
            self._tags, self._streams = [], []
            if not tags:
                return []
            last = {handle: i for i, handle in enumerate(streams)}
            for i in last.values():
                self._events[i].synchronize()
            first = self._events[0]
            return [(tags[0], 0.0)] + [
                (tags[i], float(first.elapsed_time(self._events[i]))) for i in range(1, len(tags))
            ]

    def clear(self) -> None:
        """Drop unresolved records without synchronising."""
        with self._lock:
            self._tags, self._streams = [], []
