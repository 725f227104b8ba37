"""Run a function on several ranks with a process group, and never hang when one of them fails.

:func:`launch` spawns ``world_size`` processes (``spawn`` start method), each with ``MASTER_ADDR`` /
``MASTER_PORT`` (a free local port), ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` set and
``init_process_group(backend, timeout=init_timeout)`` done, and calls ``fn(rank, world_size, *args)``;
it returns the per-rank return values (they must pickle). When a rank raises, the parent stops the
other ranks (SIGTERM, then SIGKILL) within about a second and raises :class:`RankError` with that
rank's exception type, message and traceback text (and the exception itself as ``__cause__`` when it
unpickles). A rank that dies without a Python exception (a signal, ``os._exit``) gives RankError with
its exit code. When several ranks fail, the one that failed first is reported: a silent death, else
the earliest exception (the others are usually its consequences, e.g. gloo's "Connection closed by
peer"). If the whole run exceeds ``timeout`` seconds, every rank is killed and TimeoutError is raised.
A rank ends itself within about half a second once the launching process is gone (killed, or
terminated by a signal it does not handle), so no rank outlives it.

A hang names the rank that stopped. Each rank reports its progress through a heartbeat in shared
memory: :class:`tfz.pipeline.FreezeAwareStage` reports every F/B/I/W action it enters and leaves
with its step (:func:`in_action`), and any code can call :func:`heartbeat` (both cost a few
microseconds, and nothing outside :func:`launch`). Once some rank has reported, a run in which no
rank reports anything for ``progress_timeout`` seconds is stopped with :class:`RankHangError`
naming the rank that stopped and the action it was in: a rank inside an action (the one that
entered its action first), else the rank that reported last the longest ago (ranks waiting for it
reported later). A rank that then fails because of the hang (gloo's "Timed out waiting ... for
recv" after ``init_timeout``) does not hide it: an error raised between actions after the run had
made no progress for half of ``init_timeout`` or more is reported as that hang.
With gloo, a rank that keeps at least a tenth of a CPU core busy also counts as making progress
(gloo's waits take no CPU; read from Linux's /proc), so an evaluation or a checkpoint between actions
is not taken for a hang; with other backends, call :func:`heartbeat` during such work.

``fn`` and ``args`` must be picklable (``fn`` defined at module level of an importable module).

:func:`run_from_env` is the same contract under ``torchrun`` (which does the spawning and failure
handling itself): it reads ``RANK`` / ``WORLD_SIZE`` from the environment.
"""

from __future__ import annotations

import gc
import os
import pickle
import queue
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from tfz._validate import check_int, check_number, short_repr

__all__ = ["RankError", "RankHangError", "heartbeat", "in_action", "launch", "ranks_from_env", "run_from_env"]

_GRACE_S = 2.0
"""Seconds a terminated rank gets before SIGKILL."""
_FAILURE_WINDOW_S = 1.0
"""After the first failure, seconds to wait for others (to report the one that came first)."""
_REPORT_GRACE_S = 0.2
"""Seconds a rank that exited may take to deliver its report before it counts as died."""
_PARENT_POLL_S = 0.5
"""Seconds between a rank's checks that the process that launched it is still there."""
RANK_BYTES = 300 * 2**20
"""Memory of one spawned rank before ``fn`` runs (torch, torch.distributed and tfz.pipeline imported:
275 MB resident measured with torch 2.13 on CPU): :func:`launch` refuses a ``world_size`` whose ranks
would need more than the machine's physical memory."""


class RankError(RuntimeError):
    """A rank of :func:`launch` failed.

    Attributes:
        rank: the failing rank.
        exc_type: qualified name of its exception type (``"ValueError"``, ``"torch.OutOfMemoryError"``),
            or None when it died without one.
        exc_message: ``str(exception)``.
        remote_traceback: the rank's formatted traceback ("" when it died without one).
        exitcode: the process exit code when it died without reporting, else None.

    A rank that died before ``fn`` ran has ``exc_message`` saying so (with the usual causes).
    """

    def __init__(
        self,
        rank: int,
        exc_type: str | None,
        exc_message: str,
        remote_traceback: str = "",
        exitcode: int | None = None,
    ):
        self.rank, self.exc_type, self.exc_message = rank, exc_type, exc_message
        self.remote_traceback, self.exitcode = remote_traceback, exitcode
        if exc_type is None:
            text = f"rank {rank} died without an exception (exit code {exitcode})"
            if exc_message:
                text += f": {exc_message}"
        else:
            text = f"rank {rank} raised {exc_type}: {exc_message}"
        if remote_traceback:
            text += f"\n--- traceback of rank {rank} ---\n{remote_traceback.rstrip()}"
        super().__init__(text)

    def __reduce__(self):
        args = (self.rank, self.exc_type, self.exc_message, self.remote_traceback, self.exitcode)
        return (type(self), args)


class RankHangError(RankError):
    """A rank of :func:`launch` stopped making progress (see the module docstring).

    Attributes (besides :class:`RankError`'s, with ``exc_type`` None):
        action: the action it was in (``"1F3"``), or the last one it reported when ``inside`` is
            False; None when it reported none.
        step: that action's step (as counted by its stage), or None.
        inside: whether it was inside ``action`` (else between actions, or not started).
        idle_s: seconds the whole run had made no progress.
    """

    def __init__(self, rank: int, action: str | None, step: int | None, inside: bool, idle_s: float, more=""):
        self.action, self.step, self.inside, self.idle_s, self._more = action, step, inside, idle_s, more
        self.rank, self.exc_type, self.remote_traceback, self.exitcode = rank, None, "", None
        where = _describe(action, step, inside)
        self.exc_message = (
            f"rank {rank} stopped making progress {where}; no rank progressed for {idle_s:.1f} s"
        )
        RuntimeError.__init__(self, self.exc_message + more)

    def __reduce__(self):
        return (type(self), (self.rank, self.action, self.step, self.inside, self.idle_s, self._more))


def _describe(action: str | None, step: int | None, inside: bool) -> str:
    """ "in action 1F3 of step 2", "after action 1B0", "before reporting any action"."""
    if action is None:
        return "before reporting any action"
    at = action + ("" if step is None else f" of step {step}")
    return f"in action {at}" if inside else f"after action {at}"


# -- heartbeat ---------------------------------------------------------------------------------------

_BUSY_SHARE = 0.1
"""Share of one CPU core a gloo rank must use between two samples to count as making progress (one
blocked in a gloo wait used 0.01 s of CPU in 4 s; a busy one uses a core, less on a loaded machine)."""
_SAMPLE_S = 1.0
"""Seconds between samples of the ranks' CPU time."""
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` (Linux ``/proc``); None where unreadable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


_FIELDS = 5
"""Doubles per rank in the heartbeat array: last report (time.monotonic), step (-1: none), inside an
action (1/0), when that action started, number of reports."""
_NAME_BYTES = 32
"""Bytes per rank for the name of its current (or last) action."""
_BEAT: _Heart | None = None
"""This process's heartbeat slot; set in ranks started by :func:`launch`."""


class _Heart:
    """One rank's slot in the shared heartbeat arrays."""

    __slots__ = ("values", "names", "base", "name_base")

    def __init__(self, values, names, rank: int):
        self.values, self.names = memoryview(values).cast("B").cast("d"), memoryview(names).cast("B")
        self.base, self.name_base = rank * _FIELDS, rank * _NAME_BYTES

    def report(self, name: str | None, step: int | None, inside: float | None) -> None:
        v, b, now = self.values, self.base, time.monotonic()
        if name is not None:
            raw = name.encode("utf-8", "replace")[:_NAME_BYTES]
            self.names[self.name_base : self.name_base + _NAME_BYTES] = raw.ljust(_NAME_BYTES, b"\0")
        if step is not None:
            v[b + 1] = step
        if inside is not None:
            v[b + 2] = inside
            if inside:
                v[b + 3] = now
        v[b + 4] += 1
        v[b] = now


def heartbeat(label: str | None = None, *, step: int | None = None) -> None:
    """Tell :func:`launch`'s watchdog that this rank is making progress (outside an action);
    ``label`` names what it did last (at most 32 bytes are kept). Does nothing outside launch."""
    if label is not None and not isinstance(label, str):
        raise TypeError(f"label must be a str or None, got {short_repr(label)}")
    check_int("step", step, optional=True)
    heart = _BEAT
    if heart is not None:
        heart.report(label, step, 0.0 if label is not None else None)


class _InAction:
    """Context of one action: reports entering and leaving it around ``inner``."""

    __slots__ = ("heart", "name", "step", "inner")

    def __init__(self, heart: _Heart, name: str, step: int | None, inner):
        self.heart, self.name, self.step, self.inner = heart, name, step, inner

    def __enter__(self):
        self.heart.report(self.name, self.step, 1.0)
        return self.inner.__enter__()

    def __exit__(self, *exc):
        try:
            return self.inner.__exit__(*exc)
        finally:
            self.heart.report(None, None, 0.0)


def in_action(name: str, step: int | None, inner):
    """``inner`` (a context manager), reporting to :func:`launch`'s watchdog that this rank is in
    action ``name`` of ``step`` while it runs; ``inner`` itself outside launch."""
    heart = _BEAT
    return inner if heart is None else _InAction(heart, name, step, inner)


class _Watch:
    """The parent's view of the heartbeat arrays."""

    def __init__(self, values, names, world_size: int, timeout: float | None, started: float):
        self.values, self.names, self.world, self.timeout, self.started = (
            values,
            names,
            world_size,
            timeout,
            started,
        )
        self.busy_at = started
        """When a rank was last seen keeping a CPU core busy (:meth:`note_cpu`)."""
        self._sampled = started
        self._cpu: dict[int, float] = {}

    def note_cpu(self, pids: dict[int, int], now: float) -> None:
        """Sample the CPU time of the ranks ``pids`` (rank -> pid), at most every ``_SAMPLE_S``; a rank
        that used ``_BUSY_SHARE`` of a core since the last sample counts as progress."""
        if now - self._sampled < _SAMPLE_S:
            return
        for rank, pid in pids.items():
            cpu = _cpu_seconds(pid)
            if cpu is None:
                continue
            before = self._cpu.get(rank)
            if before is not None and cpu - before >= _BUSY_SHARE * (now - self._sampled):
                self.busy_at = now
            self._cpu[rank] = cpu
        self._sampled = now

    def slot(self, rank: int) -> tuple[float, int | None, bool, float, str | None]:
        """(last report or 0, step, inside, action start, action name) of ``rank``."""
        v = self.values[rank * _FIELDS : (rank + 1) * _FIELDS]
        raw = bytes(self.names[rank * _NAME_BYTES : (rank + 1) * _NAME_BYTES]).rstrip(b"\0")
        name = raw.decode("utf-8", "replace") or None
        return v[0], (None if v[1] < 0 else int(v[1])), v[2] > 0, v[3], name

    def armed(self) -> bool:
        return any(self.values[r * _FIELDS + 4] > 0 for r in range(self.world))

    def last_progress(self, running) -> float:
        """When the newest report of the ``running`` ranks came, or a rank was last busy (the start
        time before either)."""
        return max([self.slot(r)[0] for r in running] + [self.started, self.busy_at])

    def stalled(self, running) -> int:
        """The rank that stopped: inside an action (the earliest entered), else the one whose last
        report is the oldest (never reported: oldest of all)."""
        slots = {r: self.slot(r) for r in running}
        inside = [r for r in running if slots[r][2]]
        if inside:
            return min(inside, key=lambda r: (slots[r][3], r))
        return min(running, key=lambda r: (slots[r][0], r))

    def where(self, rank: int) -> str:
        _, step, inside, _, name = self.slot(rank)
        return _describe(name, step, inside)

    def error(self, rank: int, idle_s: float, more: str = "") -> RankHangError:
        _, step, inside, _, name = self.slot(rank)
        return RankHangError(rank, name, step, inside, idle_s, more)

    def others(self, running, rank: int) -> str:
        """ "; rank 0 was after action 0B1 of step 2" for the running ranks besides ``rank``."""
        parts = [f"rank {r} was {self.where(r)}" for r in running if r != rank]
        return ("; " + ", ".join(parts)) if parts else ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _type_name(exc: BaseException) -> str:
    cls = type(exc)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def _destroy_process_group() -> None:
    """Free what ``fn`` left in reference cycles (stages, pending works) while the process group
    is alive, then destroy it: gloo objects collected later, at interpreter exit, abort the process
    ("terminate called without an active exception", about one torchrun run in ten). Nothing to
    destroy when ``fn`` destroyed the group itself."""
    import torch.distributed as dist

    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


def _exit_with_parent(parent: int) -> None:
    """End this rank when ``parent``, the process that launched it, is gone: killed or terminated,
    it cannot stop its ranks itself, and they would train on with nobody to report to."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(_PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="tfz-parent-watch", daemon=True).start()


def _child(fn, rank, world_size, args, port, backend, init_timeout, results, beats, started, parent) -> None:
    """Process entry of one rank: report ("ok", rank, pickled result) or ("error", rank, ...)."""
    global _BEAT
    _exit_with_parent(parent)
    _BEAT = _Heart(*beats, rank)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    try:
        import torch.distributed as dist

        dist.init_process_group(
            backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=init_timeout)
        )
        started[rank] = 1
        value = fn(rank, world_size, *args)
        payload = pickle.dumps(value)
    except BaseException as exc:  # noqa: BLE001 - every failure is reported to the parent
        try:
            exc_bytes = pickle.dumps(exc)
        except Exception:  # noqa: BLE001
            exc_bytes = None
        report = (rank, _type_name(exc), str(exc), traceback.format_exc(), exc_bytes, time.monotonic())
        results.put(("error", *report))
        results.close()
        results.join_thread()
        os._exit(1)  # skip process-group teardown: peers may be blocked in a collective
    _destroy_process_group()
    results.put(("ok", rank, payload))
    results.close()
    results.join_thread()


def _stop(procs) -> None:
    procs = [p for p in procs if p.pid is not None]  # a failed start leaves the rest unstarted
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + _GRACE_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5.0)


_NOT_STARTED = (
    "before fn ran, while starting up (its error is on stderr above): the spawned ranks "
    "import the main module, so a script must call launch() under 'if __name__ == \"__main__\":', "
    "and fn must come from a file (not stdin or python -c)"
)


def _raise_first(reported: dict[int, tuple], died: dict[int, int], started) -> None:
    """Raise the failure that came first: a rank that died without a report (its peers' errors are
    consequences, such as gloo's "Connection closed by peer"), else the earliest reported exception.
    ``started[rank]`` is 1 once that rank's ``fn`` was called."""
    if died:
        rank = min(died)
        raise RankError(rank, None, "" if started[rank] else _NOT_STARTED, exitcode=died[rank])
    rank, type_name, message, tb, exc_bytes, _ = min(reported.values(), key=lambda rep: (rep[5], rep[0]))
    cause = None
    if exc_bytes is not None:
        try:
            cause = pickle.loads(exc_bytes)
        except Exception:  # noqa: BLE001 - the exception type may not import here
            cause = None
    raise RankError(rank, type_name, message, tb) from cause


def _hang_behind(watch: _Watch | None, reported: dict[int, tuple], running, init_timeout: float):
    """The hang that the first reported error is a consequence of, or None: the error came from a
    rank between actions after the run had made no progress for half of ``init_timeout`` (the
    collectives' timeout) or more, while a still running rank had stopped earlier."""
    if watch is None or not watch.armed() or not running:
        return None
    rank, type_name, message, _, _, when = min(reported.values(), key=lambda rep: (rep[5], rep[0]))
    last, _, inside, _, _ = watch.slot(rank)
    idle = when - watch.last_progress([*running, rank])
    if inside or idle < init_timeout / 2:
        return None
    culprit = watch.stalled(running)
    culprit_last, _, culprit_inside, _, _ = watch.slot(culprit)
    if not culprit_inside and culprit_last >= last:  # it was waiting too, and reported later
        return None
    first = message.strip().splitlines()[0] if message.strip() else ""
    return watch.error(culprit, idle, f"; then rank {rank} raised {type_name}: {first}")


def _check_args(world_size, timeout, init_timeout, backend, progress_timeout=None) -> None:
    check_int("world_size", world_size, 1)
    for name, value in (("timeout", timeout), ("init_timeout", init_timeout)):
        check_number(name, value, low=0, low_open=True, unit="seconds")
    check_number("progress_timeout", progress_timeout, low=0, low_open=True, unit="seconds", optional=True)
    if not isinstance(backend, str) or not backend:
        raise ValueError(f"backend must be a process-group backend name such as 'gloo', got {backend!r}")
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_backend_available(backend):
        raise ValueError(f"backend {short_repr(backend)} is not available in this torch build (try 'gloo')")


def _check_spawnable(fn, world_size: int) -> None:
    """Refuse, before any process starts, a ``fn`` the ranks cannot import and more ranks than the
    machine's memory holds."""
    try:
        pickle.dumps(fn)
    except Exception as exc:  # noqa: BLE001 - PicklingError, AttributeError, TypeError: all mean the same
        raise TypeError(
            f"fn must be a function defined at module level of an importable module (the spawned ranks "
            f"import it), got {short_repr(fn)} ({type(exc).__name__}: {exc})"
        ) from None
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if getattr(fn, "__module__", None) == "__main__" and not (main_file and os.path.isfile(main_file)):
        raise TypeError(
            f"fn {short_repr(fn)} is defined in a main module read from {main_file or 'python -c'}, "
            "which the spawned ranks cannot import: put it in a script file or a module"
        )
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    need = world_size * RANK_BYTES
    if need > have:
        raise ValueError(
            f"world_size {world_size} starts {world_size} processes of about {RANK_BYTES / 2**30:.2g} GB "
            f"each ({need / 2**30:,.0f} GB), more than this machine's {have / 2**30:,.0f} GB of memory "
            "(tfz.pipeline.launch.RANK_BYTES)"
        )


def launch(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 300.0,
    backend: str = "gloo",
    init_timeout: float = 60.0,
    progress_timeout: float | None = 60.0,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks; returns results by rank.

    Args:
        fn: picklable function (module level; TypeError before anything starts otherwise).
        world_size: number of ranks (processes); refused when ``world_size * RANK_BYTES`` exceeds
            the machine's physical memory.
        timeout: seconds for the whole run (start-up included) before every rank is killed.
        backend: process-group backend ("gloo", "nccl"), available in this torch build.
        init_timeout: ``init_process_group`` timeout in seconds (also the collectives' timeout).
        progress_timeout: seconds without a heartbeat from any rank (once one has reported), nor,
            with gloo, a rank keeping a CPU core busy (see the module docstring), before the run is
            stopped as hung; None: no watchdog.

    Raises:
        RankError: a rank raised (or died); the others were stopped.
        RankHangError: the run stopped making progress; it names the rank and its action.
        TimeoutError: the run took longer than ``timeout``; every rank was killed.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {fn!r}")
    _check_args(world_size, timeout, init_timeout, backend, progress_timeout)
    _check_spawnable(fn, world_size)
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    beats = (ctx.RawArray("d", world_size * _FIELDS), ctx.RawArray("c", world_size * _NAME_BYTES))
    started = ctx.RawArray("b", world_size)
    for r in range(world_size):
        beats[0][r * _FIELDS + 1] = -1.0
    shared = (port, backend, float(init_timeout), results, beats, started, os.getpid())
    procs = [
        ctx.Process(
            target=_child,
            args=(fn, r, world_size, args, *shared),
            name=f"tfz-rank{r}",
        )
        for r in range(world_size)
    ]
    start = time.monotonic()
    deadline = start + timeout
    watch = _Watch(*beats, world_size, progress_timeout, start)
    values: dict[int, Any] = {}
    try:
        for p in procs:
            p.start()
        dead_since: dict[int, float] = {}
        reported: dict[int, tuple] = {}
        died: dict[int, int] = {}
        first_failure = None
        while len(values) + len(reported) + len(died) < world_size:
            now = time.monotonic()
            if first_failure is not None and now - first_failure > _FAILURE_WINDOW_S:
                break
            running = [
                r for r in range(world_size) if r not in values and r not in reported and r not in died
            ]
            remaining = deadline - now
            if remaining <= 0:
                if first_failure is not None:
                    break
                where = ""
                if watch.armed():
                    rank = watch.stalled(running)
                    where = f"; rank {rank} is {watch.where(rank)}"
                raise TimeoutError(
                    f"launch: ranks {running} still running after {timeout:g} s{where}; all ranks were killed"
                )
            if first_failure is None and progress_timeout is not None and watch.armed():
                if backend == "gloo":
                    watch.note_cpu({r: procs[r].pid for r in running}, now)
                idle = now - watch.last_progress(running)
                if idle > progress_timeout:
                    rank = watch.stalled(running)
                    raise watch.error(rank, idle, watch.others(running, rank))
            try:
                msg = results.get(timeout=min(0.05, remaining))
            except queue.Empty:
                for r, p in enumerate(procs):
                    if r in values or r in reported or r in died or p.exitcode is None:
                        continue
                    # exited without a report: give a last message a moment to arrive
                    if now - dead_since.setdefault(r, now) > _REPORT_GRACE_S:
                        died[r] = p.exitcode
                        first_failure = first_failure or now
                continue
            if msg[0] == "error":
                reported[msg[1]] = msg[1:]
                first_failure = first_failure or time.monotonic()
            else:
                values[msg[1]] = pickle.loads(msg[2])
        if reported and not died:
            running = [r for r in range(world_size) if r not in values and r not in reported]
            hang = _hang_behind(watch, reported, running, float(init_timeout))
            if hang is not None:
                raise hang
        if reported or died:
            _raise_first(reported, died, started)
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
    finally:
        _stop(procs)
        results.close()
        results.cancel_join_thread()
    return [values[r] for r in range(world_size)]


def ranks_from_env() -> tuple[int, int]:
    """(``RANK``, ``WORLD_SIZE``) from the environment, as torchrun sets them; ValueError naming a
    missing or bad one."""
    env = {}
    for name in ("RANK", "WORLD_SIZE"):
        text = os.environ.get(name)
        if text is None:
            raise ValueError(f"environment variable {name} is not set (run under torchrun, or use launch())")
        try:
            env[name] = int(text)
        except ValueError:
            raise ValueError(f"environment variable {name} must be an integer, got {text!r}") from None
    rank, world_size = env["RANK"], env["WORLD_SIZE"]
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is not in [0, WORLD_SIZE={world_size})")
    return rank, world_size


def run_from_env(
    fn: Callable[..., Any], *args: Any, backend: str | None = None, init_timeout: float = 60.0
) -> Any:
    """Under ``torchrun``: ``fn(rank, world_size, *args)`` with the process group initialised.

    ``RANK`` and ``WORLD_SIZE`` come from the environment (ValueError naming a missing or bad one);
    ``MASTER_ADDR`` / ``MASTER_PORT`` too (torchrun sets them). ``backend`` defaults to "nccl" when
    CUDA is available, else "gloo". A process group that already exists is used as is (and left open);
    one created here is destroyed after ``fn`` returns.
    """
    rank, world_size = ranks_from_env()
    import torch
    import torch.distributed as dist

    created = False
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        _check_args(world_size, 1.0, init_timeout, backend)
        timeout = timedelta(seconds=init_timeout)
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
        created = True
    value = fn(rank, world_size, *args)
    if created:
        _destroy_process_group()
    return value
