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

``fn`` and ``args`` must be picklable (``fn`` defined at module level of an importable module).

:func:`run_from_env` is the same contract under ``torchrun`` (which does the spawning and failure
handling itself): it reads ``RANK`` / ``WORLD_SIZE`` from the environment.
"""

from __future__ import annotations

import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

__all__ = ["RankError", "launch", "run_from_env"]

_GRACE_S = 2.0
"""Seconds a terminated rank gets before SIGKILL."""
_FAILURE_WINDOW_S = 1.0
"""After the first failure, seconds to wait for others (to report the one that came first)."""
_REPORT_GRACE_S = 0.2
"""Seconds a rank that exited may take to deliver its report before it counts as died."""


class RankError(RuntimeError):
    """A rank of :func:`launch` failed.

    Attributes:
        rank: the failing rank.
        exc_type: qualified name of its exception type (``"ValueError"``, ``"torch.OutOfMemoryError"``),
            or None when it died without one.
        exc_message: ``str(exception)``.
        remote_traceback: the rank's formatted traceback ("" when it died without one).
        exitcode: the process exit code when it died without reporting, else None.
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
        else:
            text = f"rank {rank} raised {exc_type}: {exc_message}"
        if remote_traceback:
            text += f"\n--- traceback of rank {rank} ---\n{remote_traceback.rstrip()}"
        super().__init__(text)

    def __reduce__(self):
        args = (self.rank, self.exc_type, self.exc_message, self.remote_traceback, self.exitcode)
        return (type(self), args)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _type_name(exc: BaseException) -> str:
    cls = type(exc)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def _child(fn, rank, world_size, args, port, backend, init_timeout, results) -> None:
    """Process entry of one rank: report ("ok", rank, pickled result) or ("error", rank, ...)."""
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
        value = fn(rank, world_size, *args)
        payload = pickle.dumps(value)
    except BaseException as exc:  # noqa: BLE001 - every failure is reported to the parent
        try:
            exc_bytes = pickle.dumps(exc)
        except Exception:  # noqa: BLE001
            exc_bytes = None
        report = (rank, _type_name(exc), str(exc), traceback.format_exc(), exc_bytes, time.time())
        results.put(("error", *report))
        results.close()
        results.join_thread()
        os._exit(1)  # skip process-group teardown: peers may be blocked in a collective
    dist.destroy_process_group()
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


def _raise_first(reported: dict[int, tuple], died: dict[int, int]) -> None:
    """Raise the failure that came first: a rank that died without a report (its peers' errors are
    consequences, such as gloo's "Connection closed by peer"), else the earliest reported exception."""
    if died:
        rank = min(died)
        raise RankError(rank, None, "", exitcode=died[rank])
    rank, type_name, message, tb, exc_bytes, _ = min(reported.values(), key=lambda rep: (rep[5], rep[0]))
    cause = None
    if exc_bytes is not None:
        try:
            cause = pickle.loads(exc_bytes)
        except Exception:  # noqa: BLE001 - the exception type may not import here
            cause = None
    raise RankError(rank, type_name, message, tb) from cause


def _check_args(world_size, timeout, init_timeout, backend) -> None:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    for name, value in (("timeout", timeout), ("init_timeout", init_timeout)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{name} must be a number of seconds > 0, got {value!r}")
    if not isinstance(backend, str) or not backend:
        raise ValueError(f"backend must be a process-group backend name such as 'gloo', got {backend!r}")


def launch(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 300.0,
    backend: str = "gloo",
    init_timeout: float = 60.0,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks; returns results by rank.

    Args:
        fn: picklable function (module level).
        world_size: number of ranks (processes).
        timeout: seconds for the whole run (start-up included) before every rank is killed.
        backend: process-group backend ("gloo", "nccl").
        init_timeout: ``init_process_group`` timeout in seconds (also the collectives' timeout).

    Raises:
        RankError: a rank raised (or died); the others were stopped.
        TimeoutError: the run took longer than ``timeout``; every rank was killed.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {fn!r}")
    _check_args(world_size, timeout, init_timeout, backend)
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(
            target=_child,
            args=(fn, r, world_size, args, port, backend, float(init_timeout), results),
            name=f"tfz-rank{r}",
        )
        for r in range(world_size)
    ]
    deadline = time.monotonic() + timeout
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
            remaining = deadline - now
            if remaining <= 0:
                if first_failure is not None:
                    break
                running = [r for r in range(world_size) if r not in values]
                raise TimeoutError(
                    f"launch: ranks {running} still running after {timeout:g} s; all ranks were killed"
                )
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
        if reported or died:
            _raise_first(reported, died)
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
    finally:
        _stop(procs)
        results.close()
        results.cancel_join_thread()
    return [values[r] for r in range(world_size)]


def run_from_env(
    fn: Callable[..., Any], *args: Any, backend: str | None = None, init_timeout: float = 60.0
) -> Any:
    """Under ``torchrun``: ``fn(rank, world_size, *args)`` with the process group initialised.

    ``RANK`` and ``WORLD_SIZE`` come from the environment (ValueError naming a missing or bad one);
    ``MASTER_ADDR`` / ``MASTER_PORT`` too (torchrun sets them). ``backend`` defaults to "nccl" when
    CUDA is available, else "gloo". A process group that already exists is used as is (and left open);
    one created here is destroyed after ``fn`` returns.
    """
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
        dist.destroy_process_group()
    return value
