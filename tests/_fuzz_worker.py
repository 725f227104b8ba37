"""Runs the cases of tests/test_fuzz_inputs.py, each in a forked child under a memory and time limit.

Started once per test module (``python _fuzz_worker.py``); it imports tfz, numpy, matplotlib and torch
once, then forks a child per case, so a case costs milliseconds, not an interpreter start. One JSON
request per stdin line, one JSON reply per line on the worker's original stdout:

- request: ``{"kind": "cli", "argv": [...]}`` (runs ``tfz.cli.main(argv)``) or ``{"kind": "api",
  "expr": "..."}`` (evaluates the expression with the names of :func:`_namespace`, ``files`` mapping
  fixture names to paths), plus ``env``, ``files``, ``timeout`` (seconds) and ``memory`` (bytes the
  child may add to the worker's address space, ``RLIMIT_AS``);
- reply: ``{"rc", "out", "err", "exc_type", "exc", "seconds", "killed"}``: exit status (CLI), the
  child's stdout and stderr, the exception an API case raised (type name and message), the wall time,
  and "timeout" or the signal when the child did not end by itself.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import tempfile
import time
import traceback


def _namespace() -> dict:
    """The names API cases use (imported once, before any fork)."""
    import importlib

    import numpy as np

    import tfz.cli
    import tfz.cli.plan
    import tfz.cli.profile
    import tfz.cli.simulate  # noqa: F401 - loaded before forking

    names = ("dag", "measure", "pipeline.launch", "profile", "schedule", "schedule.torch_io", "timeline")
    modules = [importlib.import_module(f"tfz.{name}") for name in names]  # tfz.pipeline.launch: a module
    ns = {name: getattr(mod, name) for mod in modules for name in mod.__all__}
    ns.update(np=np, tfz=tfz)
    tfz.cli.build_parser()  # imports every subcommand's modules (tfz.demo: the controller, the planner)
    import matplotlib.backends.backend_agg  # noqa: F401 - what the Gantt charts import
    import matplotlib.figure  # noqa: F401
    import torch.distributed.pipelining  # noqa: F401 - what tfz.schedule.torch_io imports

    ns["dag"] = ns["build_dag"](ns["build_schedule"]("1f1b", 2, 2))
    ns["sim"] = ns["simulate"](ns["dag"], np.ones(ns["dag"].num_actions))
    return ns


def _vm_size() -> int:
    """Bytes of address space this process uses now (0 where /proc is missing)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _child(req: dict, ns: dict, out_path: str, err_path: str, result_path: str) -> None:
    """Runs in the forked child; never returns."""
    code = 3
    try:
        if req.get("memory") and _vm_size():
            limit = _vm_size() + int(req["memory"])
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        os.environ.pop("TFZ_DEBUG", None)
        os.environ.update(req.get("env", {}))
        for fd, path in ((1, out_path), (2, err_path)):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(target, fd)
            os.close(target)
        sys.stdout = open(1, "w", closefd=False)
        sys.stderr = open(2, "w", closefd=False)
        result: dict = {}
        if req["kind"] == "cli":
            try:
                code = ns["tfz"].cli.main(req["argv"])
            except SystemExit as exc:  # argparse
                code = exc.code if isinstance(exc.code, int) else 2
        else:
            try:
                value = eval(req["expr"], {**ns, "files": req.get("files", {})})  # noqa: S307 - test table
                result = {"value": repr(value)[:200]}
            except BaseException as exc:  # noqa: BLE001 - reported to the test
                result = {"exc_type": type(exc).__name__, "exc": str(exc)}
            code = 0
        sys.stdout.flush()
        sys.stderr.flush()
        with open(result_path, "w") as fh:
            json.dump(result, fh)
    except BaseException:  # noqa: BLE001 - a failure of the harness itself
        with open(err_path, "a") as fh:
            fh.write("HARNESS FAILURE\n" + traceback.format_exc())
        code = 99
    os._exit(int(code) & 0xFF)


def _run(req: dict, ns: dict, tmp: str) -> dict:
    out_path, err_path, result_path = (os.path.join(tmp, n) for n in ("out", "err", "result"))
    for path in (out_path, err_path, result_path):
        if os.path.exists(path):
            os.unlink(path)
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        _child(req, ns, out_path, err_path, result_path)
    deadline = start + float(req.get("timeout", 60))
    killed = None
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            killed, status = "timeout", None
            break
        time.sleep(0.005)
    seconds = time.monotonic() - start
    rc = None
    if status is not None:
        if os.WIFSIGNALED(status):
            killed = f"signal {os.WTERMSIG(status)}"
        else:
            rc = os.WEXITSTATUS(status)

    def read(path: str) -> str:
        try:
            with open(path, encoding="utf-8", errors="replace") as fh:
                return fh.read()
        except FileNotFoundError:
            return ""

    result = json.loads(read(result_path) or "{}")
    return {
        "rc": rc,
        "out": read(out_path),
        "err": read(err_path),
        "seconds": seconds,
        "killed": killed,
        **result,
    }


def main() -> None:
    reply = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything the imports print goes to stderr, not into the replies
    ns = _namespace()
    with tempfile.TemporaryDirectory() as tmp:
        reply.write(json.dumps({"ready": True}) + "\n")
        reply.flush()
        for line in sys.stdin:
            if line.strip():
                reply.write(json.dumps(_run(json.loads(line), ns, tmp)) + "\n")
                reply.flush()


if __name__ == "__main__":
    main()
