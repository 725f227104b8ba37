"""``ActionTimer``: durations of named pipeline actions (``with timer.action("3W5"): ...``)."""

from __future__ import annotations

import itertools
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from tfz.timing._backend import make_stream_timer

__all__ = ["ActionSpan", "ActionTimer"]


@dataclass(frozen=True)
class ActionSpan:
    """One occurrence of an action; times in ms since the first record of its batch (the step: a batch
    starts after the previous ``collect()`` / ``reset()``)."""

    name: str
    start_ms: float
    end_ms: float
    thread: int
    """``threading.get_ident()`` of the thread that ran the action."""

    @property
    def duration_ms(self) -> float:
        return self.end_ms - self.start_ms


class _Scope:
    __slots__ = ("_timer", "_name", "_occurrence")

    def __init__(self, timer: ActionTimer, name: str):
        self._timer = timer
        self._name = name

    def __enter__(self):
        self._occurrence = self._timer._start(self._name)
        return self

    def __exit__(self, *exc_info):
        self._timer._end(self._occurrence)
        return False


class ActionTimer:
    """Times named actions with a start and an end record on the current stream.

    ``device``: None (CUDA when torch is imported and sees a GPU, else host), "cpu", "cuda", "cuda:N",
    an int or a torch.device; ``capacity``: records per batch (two per action) before ``collect()``.
    Actions may nest (inclusive times) and run on several threads at once. ``backend`` says which timer
    is active ("cuda-events", "native-host" or "python"; see ``tfz.timing.backend``).

    CUDA times are measured on the stream current at entry/exit of the ``with`` block, so they cover the
    GPU work queued on that stream in between; events are recorded with the timer's device current.

    When the pool is full (more than ``capacity`` records since the last collect), an action is dropped
    instead of raising: it is missing from ``collect()``, counted in :attr:`dropped`, and the first drop
    warns (RuntimeWarning).
    """

    def __init__(self, device=None, capacity: int = 4096):
        self._timer, self.backend, self.device = make_stream_timer(device, capacity)
        self._stream: Callable[[], object] = self._stream_getter()
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._open: dict[int, tuple[str, int]] = {}
        self._ended: dict[int, tuple[str, int]] = {}
        self._aborted: set[int] = set()
        self.dropped = 0
        """Actions dropped because the pool was full (since this timer was made)."""

    @property
    def capacity(self) -> int:
        return self._timer.capacity

    def _stream_getter(self) -> Callable[[], object]:
        if self.device is None:
            return lambda: None
        import torch

        index = self.device
        if self.backend == "cuda-events":
            from tfz._torch_compat import cuda_raw_stream_getter

            raw = cuda_raw_stream_getter()
            if raw is not None:
                return lambda: raw(index)
            return lambda: torch.cuda.current_stream(index).cuda_stream
        return lambda: torch.cuda.current_stream(index)

    def action(self, name: str) -> _Scope:
        """Context manager timing one occurrence of ``name`` (e.g. "3W5")."""
        if not isinstance(name, str):
            raise TypeError(f"action name must be a str, got {type(name).__name__}")
        if not name:
            raise ValueError("action name must be a non-empty str, got ''")
        return _Scope(self, name)

    def _drop(self, name: str) -> None:
        self.dropped += 1
        if self.dropped == 1:
            warnings.warn(
                f"ActionTimer: all {self.capacity} records of the pool hold unresolved samples; action "
                f"{name!r} and later ones are dropped until collect() (count in .dropped). Collect every "
                "step or raise capacity.",
                RuntimeWarning,
                stacklevel=4,
            )

    def _start(self, name: str) -> int | None:
        occurrence = next(self._ids)
        with self._lock:
            try:
                self._timer.record(2 * occurrence, self._stream())
            except OverflowError:
                self._drop(name)
                return None
            self._open[occurrence] = (name, threading.get_ident())
        return occurrence

    def _end(self, occurrence: int | None) -> None:
        if occurrence is None:  # dropped at its start
            return
        with self._lock:
            entry = self._open.pop(occurrence, None)
            if entry is None:  # dropped by reset() while running
                return
            try:
                self._timer.record(2 * occurrence + 1, self._stream())
            except OverflowError:
                self._aborted.add(occurrence)
                self._drop(entry[0])
                return
            except BaseException:
                self._aborted.add(occurrence)
                raise
            self._ended[occurrence] = entry

    def collect_spans(self) -> list[ActionSpan]:
        """Resolve the actions ended since the last collect/reset, ordered by start (one synchronisation).

        Raises RuntimeError while an action is still open (call it after the step, once threads joined).
        """
        with self._lock:
            if self._open:
                names = sorted({name for name, _ in self._open.values()})
                raise RuntimeError(f"collect called while {len(self._open)} action(s) are open: {names}")
            records = self._timer.resolve()
            ended, self._ended = self._ended, {}
            aborted, self._aborted = self._aborted, set()
        starts: dict[int, float] = {}
        ends: dict[int, float] = {}
        for tag, ms in records:
            occurrence, is_end = divmod(tag, 2)
            (ends if is_end else starts)[occurrence] = ms
        if ends.keys() != ended.keys() or starts.keys() != ended.keys() | aborted:
            raise RuntimeError("ActionTimer records out of step with its actions (timer used directly?)")
        spans = [ActionSpan(name, starts[k], ends[k], thread) for k, (name, thread) in ended.items()]
        spans.sort(key=lambda span: span.start_ms)
        return spans

    def collect(self) -> dict[str, float]:
        """Milliseconds per action name, summed over its occurrences since the last collect/reset.

        Nested actions are inclusive (an outer action's time contains its inner actions). Use
        ``collect_spans()`` instead for every occurrence separately.
        """
        totals: dict[str, float] = {}
        for span in self.collect_spans():
            totals[span.name] = totals.get(span.name, 0.0) + span.duration_ms
        return totals

    def reset(self) -> None:
        """Drop every unresolved record and forget open actions (their ends are then ignored)."""
        with self._lock:
            self._timer.clear()
            self._open.clear()
            self._ended.clear()
            self._aborted.clear()

    def __repr__(self) -> str:
        return f"ActionTimer(backend={self.backend!r}, device={self.device}, capacity={self.capacity})"
