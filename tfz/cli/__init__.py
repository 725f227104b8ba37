"""The ``tfz`` command: ``simulate``, ``plan``, ``profile``, ``demo``.

Each subcommand lives in ``tfz/cli/<name>.py`` and defines ``add_arguments(parser)`` and
``run(args) -> int``; heavy imports happen inside ``run``. Every error ends with exit status 2 and
one line on stderr, without a traceback: user errors (ValueError, OSError, :class:`UsageError`, a
failed rank) as their message, anything else (a bug, MemoryError, RecursionError) with its type
named. ``TFZ_DEBUG=1`` (see :func:`tfz._validate.env_flag`) raises instead, with the traceback. Every
switch of :data:`tfz._validate.SWITCHES` is read before any work, so a bad word is refused at once.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from tfz._validate import SWITCHES, env_flag

__all__ = ["UsageError", "error_line", "main"]

COMMANDS = {
    "simulate": "simulate a schedule: makespan, bubbles, critical path, timeline",
    "plan": "solve the freeze-ratio LP for a schedule and profile",
    "profile": "measure per-stage F/I/W times of a model on one device",
    "demo": "train a small model pipelined over CPU ranks, with and without freezing",
}


class UsageError(Exception):
    """Bad command-line input: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def _available() -> dict[str, object]:
    mods = {}
    for name in COMMANDS:
        try:
            mods[name] = importlib.import_module(f"tfz.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"tfz.cli.{name}":
                raise
    return mods


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tfz", description="Pipeline-aware parameter freezing (TimelyFreeze).")
    from tfz import __version__

    parser.add_argument("--version", action="version", version=f"tfz {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, mod in _available().items():
        p = sub.add_parser(name, help=COMMANDS[name], description=(mod.__doc__ or COMMANDS[name]).strip())
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run, _parser=p)
    return parser


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else ""


def error_line(exc: BaseException) -> str:
    """The one line an exception is reported as: the message of a user error (ValueError, OSError,
    UsageError, a rank's error), else the exception's type and message."""
    launch = sys.modules.get("tfz.pipeline.launch")  # loaded whenever a RankError can exist
    user = (UsageError, ValueError, OSError) + ((launch.RankError,) if launch else ())
    msg = _first_line(exc)
    if isinstance(exc, user) and msg:
        return msg
    if isinstance(exc, MemoryError):
        return f"out of memory (MemoryError{': ' + msg if msg else ''})"
    if isinstance(exc, RecursionError):
        return f"input nested too deeply (RecursionError: {msg})"
    name = type(exc).__qualname__
    return f"{name}: {msg}" if msg else name


def main(argv: list[str] | None = None) -> int:
    try:
        debug = env_flag("TFZ_DEBUG")
        for name in SWITCHES:
            env_flag(name)
    except ValueError as exc:
        print(f"tfz: error: {exc}", file=sys.stderr)
        return 2
    command = "tfz"
    try:
        parser = build_parser()
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # said by the command that was given them ("tfz demo: error: ...")
            getattr(args, "_parser", parser).error(f"unrecognized arguments: {' '.join(unknown)}")
        if getattr(args, "_run", None) is None:
            print(
                f"tfz: error: give a command: {', '.join(COMMANDS)} (tfz --help describes them)",
                file=sys.stderr,
            )
            return 2
        command = f"tfz {args.command}"
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - every error is one line (TFZ_DEBUG=1: the traceback)
        if debug:
            raise
        print(f"{command}: error: {error_line(exc)}", file=sys.stderr)
        return 2
