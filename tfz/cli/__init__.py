"""The ``tfz`` command: ``simulate``, ``plan``, ``profile``, ``demo``.

Each subcommand lives in ``tfz/cli/<name>.py`` and defines ``add_arguments(parser)`` and
``run(args) -> int``; heavy imports happen inside ``run``. User errors (ValueError, OSError,
:class:`UsageError`) end with exit status 2 and one line on stderr, without a traceback
(``TFZ_DEBUG=1`` shows it).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

__all__ = ["UsageError", "main"]

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
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args._run(args) or 0)
    except (UsageError, ValueError, OSError) as exc:
        if os.environ.get("TFZ_DEBUG") == "1":
            raise
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"tfz {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tfz: interrupted", file=sys.stderr)
        return 130
