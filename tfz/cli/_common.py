"""Command-line flags shared by ``tfz simulate`` and ``tfz plan``.

Schedule flags: ``--schedule``, ``--ranks``, ``--microbatches``, ``--stages-per-rank``.
Time flags: ``--f``, ``--i``, ``--w`` (and ``--w-frozen`` where asked for) in milliseconds, or
``--profile FILE`` (tfz-profile JSON, see :mod:`tfz.profile`); the two exclude each other. Times
that are not given default to :data:`DEFAULT_TIMES` (F = I = W = 1 ms, frozen W = 0 ms).
"""

from __future__ import annotations

import argparse
import math

from tfz.cli import UsageError
from tfz.schedule import SCHEDULES

__all__ = [
    "write_timelines",
    "DEFAULT_TIMES",
    "add_schedule_arguments",
    "add_time_arguments",
    "nonnegative_float",
    "positive_float",
    "positive_int",
    "profile_from_args",
    "schedule_from_args",
]

DEFAULT_TIMES = {"f": 1.0, "i": 1.0, "w": 1.0, "w_frozen": 0.0}
"""Milliseconds used for time flags that are not given."""


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _float(text: str, ok, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not (math.isfinite(value) and ok(value)):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (rejects NaN and infinities)."""
    return _float(text, lambda v: v > 0, "a finite number > 0")


def nonnegative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    return _float(text, lambda v: v >= 0, "a finite number >= 0")


def _schedule_name(text: str) -> str:
    return text.lower()


def add_schedule_arguments(parser: argparse.ArgumentParser) -> None:
    """``--schedule NAME --ranks P --microbatches M [--stages-per-rank V]``."""
    g = parser.add_argument_group("schedule")
    g.add_argument(
        "--schedule",
        required=True,
        type=_schedule_name,
        choices=SCHEDULES,
        metavar="NAME",
        help=f"pipeline schedule, one of: {', '.join(SCHEDULES)}",
    )
    g.add_argument("--ranks", required=True, type=positive_int, metavar="P", help="pipeline ranks (>= 1)")
    g.add_argument(
        "--microbatches", required=True, type=positive_int, metavar="M", help="microbatches per step"
    )
    g.add_argument(
        "--stages-per-rank",
        type=positive_int,
        default=None,
        metavar="V",
        help="model stages per rank (default: the schedule's own, 1 or 2)",
    )


def add_time_arguments(parser: argparse.ArgumentParser, *, frozen: bool = False) -> None:
    """``--f T --i T --w T [--w-frozen T] | --profile FILE``; defaults in :data:`DEFAULT_TIMES`.

    Full backward B takes ``I + W``. ``frozen`` adds ``--w-frozen`` (W with every parameter frozen).
    """
    g = parser.add_argument_group(
        "action times (ms, same for every stage; B = I + W)",
        "give some of --f/--i/--w (each defaults to 1 ms) or a --profile file, not both",
    )
    g.add_argument("--f", type=positive_float, default=None, metavar="T", help="forward time (default 1)")
    g.add_argument(
        "--i", type=positive_float, default=None, metavar="T", help="input-gradient backward (default 1)"
    )
    g.add_argument(
        "--w", type=positive_float, default=None, metavar="T", help="weight-gradient backward (default 1)"
    )
    if frozen:
        g.add_argument(
            "--w-frozen",
            type=nonnegative_float,
            default=None,
            metavar="T",
            help="weight-gradient backward with all parameters frozen (default 0)",
        )
    g.add_argument(
        "--profile", default=None, metavar="FILE", help="tfz-profile JSON with per-stage/per-action times"
    )


def schedule_from_args(args: argparse.Namespace):
    """The :class:`tfz.schedule.Schedule` the schedule flags describe (ValueError if invalid)."""
    from tfz.schedule import build_schedule

    return build_schedule(args.schedule, args.ranks, args.microbatches, args.stages_per_rank)


def profile_from_args(args: argparse.Namespace):
    """The :class:`tfz.profile.Profile` the time flags describe.

    UsageError when ``--profile`` is combined with time flags or the file cannot be read;
    ValueError (naming file and field) when it is malformed.
    """
    from tfz.profile import Profile

    names = [k for k in DEFAULT_TIMES if hasattr(args, k)]
    given = [k for k in names if getattr(args, k) is not None]
    if args.profile is not None:
        if given:
            flags = ", ".join("--" + k.replace("_", "-") for k in given)
            raise UsageError(f"--profile cannot be combined with {flags}")
        try:
            return Profile.load(args.profile)
        except OSError as exc:
            raise UsageError(f"cannot read profile {args.profile!r}: {exc.strerror or exc}") from None
    times = {
        k: DEFAULT_TIMES[k] if getattr(args, k, None) is None else getattr(args, k) for k in DEFAULT_TIMES
    }
    if times["w_frozen"] > times["w"]:
        raise UsageError(f"--w-frozen {times['w_frozen']} exceeds --w {times['w']}")
    return Profile.uniform(times["f"], times["i"], times["w"], times["w_frozen"])


def write_timelines(args: argparse.Namespace, sim, ratios=None, *, title: str | None = None) -> list[str]:
    """Write ``--trace`` (Chrome trace) and ``--png`` (Gantt chart) when given; returns the paths written."""
    written = []
    if getattr(args, "trace", None):
        from tfz.timeline import write_chrome_trace

        write_chrome_trace(args.trace, sim, ratios)
        written.append(args.trace)
    if getattr(args, "png", None):
        from tfz.timeline import write_gantt_png

        write_gantt_png(args.png, sim, ratios, title=title)
        written.append(args.png)
    return written
