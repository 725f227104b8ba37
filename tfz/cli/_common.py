"""Command-line flags shared by ``tfz simulate``, ``tfz plan`` and ``tfz profile``.

Schedule flags: ``--schedule``, ``--ranks``, ``--microbatches``, ``--stages-per-rank``.
Time flags: ``--f``, ``--i``, ``--w`` (and ``--w-frozen`` where asked for) in milliseconds, or
``--profile FILE`` (tfz-profile JSON, see :mod:`tfz.profile`); the two exclude each other. Times
that are not given default to :data:`DEFAULT_TIMES` (F = I = W = 1 ms, frozen W = 0 ms).
Output files (``--trace``, ``--png``, ``--out``) are checked before any work (:func:`check_output`)
and written whole or not at all (:func:`tfz._io.write_files`). Paths are never empty
(:func:`path_arg`) and are shown quoted in errors, so a newline in one cannot cut the line.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from tfz._io import has_suffix, write_files
from tfz._validate import short_repr
from tfz.cli import UsageError
from tfz.schedule import SCHEDULES

__all__ = [
    "DEFAULT_TIMES",
    "TIMELINE_SUFFIXES",
    "add_schedule_arguments",
    "add_time_arguments",
    "bounded_int",
    "check_output",
    "check_stdout",
    "check_timeline_outputs",
    "durations_from_args",
    "nonnegative_float",
    "path_arg",
    "positive_float",
    "positive_int",
    "profile_from_args",
    "ratio",
    "schedule_from_args",
    "schedule_name",
    "write_timelines",
]

TIMELINE_SUFFIXES = {"trace": (".json", ".json.gz"), "png": (".png",)}
"""File name endings ``--trace`` and ``--png`` accept."""

DEFAULT_TIMES = {"f": 1.0, "i": 1.0, "w": 1.0, "w_frozen": 0.0}
"""Milliseconds used for time flags that are not given."""


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return bounded_int(text, 1)


def bounded_int(text: str, low: int, high: int | None = None) -> int:
    """An integer in [low, high] from ``text``, else ArgumentTypeError naming it."""
    what = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high:,}]"
    try:
        value = int(text)
    except ValueError:  # also more than 4300 digits
        raise argparse.ArgumentTypeError(f"expected {what}, got {short_repr(text)}") from None
    if value < low or (high is not None and value > high):
        raise argparse.ArgumentTypeError(f"expected {what}, got {short_repr(text)}")
    return value


def _float(text: str, ok, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {short_repr(text)}") from None
    if not (math.isfinite(value) and ok(value)):
        raise argparse.ArgumentTypeError(f"expected {what}, got {short_repr(text)}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (rejects NaN and infinities)."""
    return _float(text, lambda v: v > 0, "a finite number > 0")


def nonnegative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    return _float(text, lambda v: v >= 0, "a finite number >= 0")


def step_exponent(text: str) -> float:
    """argparse type: a number in [-4, 4] (``tfz.optim``'s ``step_scale``)."""
    return _float(text, lambda v: -4 <= v <= 4, "a number in [-4, 4]")


def ratio(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    return _float(text, lambda v: 0 <= v <= 1, "a number in [0, 1]")


def schedule_name(text: str) -> str:
    """argparse type: a schedule name in any case, as :func:`tfz.schedule.build_schedule` takes it."""
    return text.lower()


def path_arg(text: str) -> str:
    """argparse type: a file or folder name; an empty one (which would mean the current folder) is
    refused."""
    if not text:
        raise argparse.ArgumentTypeError("expected a file or folder name, got ''")
    return text


def add_schedule_arguments(parser: argparse.ArgumentParser) -> None:
    """``--schedule NAME --ranks P --microbatches M [--stages-per-rank V]``."""
    g = parser.add_argument_group("schedule")
    g.add_argument(
        "--schedule",
        required=True,
        type=schedule_name,
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
        "--profile",
        type=path_arg,
        default=None,
        metavar="FILE",
        help="tfz-profile JSON with per-stage/per-action times",
    )
    g.add_argument(
        "--gap",
        type=nonnegative_float,
        default=0.0,
        metavar="T",
        help="time between actions (communication, the runtime's own work) added to every action, with "
        "the flags above or --profile; a run's is TimelyFreeze's controller.gap (default 0)",
    )


def schedule_from_args(args: argparse.Namespace, max_actions: int | None = None):
    """The :class:`tfz.schedule.Schedule` the schedule flags describe (ValueError if invalid, or over
    ``max_actions``, default :data:`tfz.schedule.MAX_ACTIONS`, before anything is built)."""
    from tfz.schedule import MAX_ACTIONS, build_schedule

    limit = MAX_ACTIONS if max_actions is None else max_actions
    return build_schedule(
        args.schedule, args.ranks, args.microbatches, args.stages_per_rank, max_actions=limit
    )


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


def durations_from_args(args: argparse.Namespace, profile, dag) -> tuple:
    """(unfrozen, frozen) float64 [n] of ``dag``'s actions from ``profile``, ``--gap`` added to each."""
    unfrozen, frozen = profile.durations(dag)
    return unfrozen + args.gap, frozen + args.gap


def check_output(path: str, flag: str, suffixes: tuple[str, ...]) -> None:
    """UsageError naming ``flag`` and ``path`` unless a file can be written there: a name ending in
    one of ``suffixes`` (any case), not a directory, in an existing directory that is writable (the
    file is written beside itself and renamed; an existing file must be writable too). Called
    before any work, so a long run never fails at its end."""
    name = os.fspath(path)
    if not has_suffix(name, suffixes):
        raise UsageError(f"{flag} {name!r}: the file name must end in {' or '.join(suffixes)}")
    target = Path(name)
    if target.is_dir():
        raise UsageError(f"{flag} {name!r} is a directory; give a file name ending in {suffixes[0]}")
    folder = target.parent
    if not folder.exists():
        raise UsageError(f"{flag} {name!r}: directory {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise UsageError(f"{flag} {name!r}: {str(folder)!r} is not a directory")
    if target.exists() and not os.access(target, os.W_OK):
        raise UsageError(f"{flag} {name!r}: the file is not writable")
    in_place = target.exists() and not target.is_file()  # a device such as /dev/null
    if not in_place and not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {name!r}: directory {str(folder)!r} is not writable")


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return os.path.realpath(a) == os.path.realpath(b)


def check_timeline_outputs(args: argparse.Namespace) -> None:
    """:func:`check_output` for ``--trace`` and ``--png`` when given, and neither may be the
    ``--profile`` file (it would be overwritten)."""
    for key, suffixes in TIMELINE_SUFFIXES.items():
        path = getattr(args, key, None)
        if path is None:
            continue
        check_output(path, f"--{key}", suffixes)
        profile = getattr(args, "profile", None)
        if profile is not None and _same_file(path, profile):
            raise UsageError(f"--{key} {path!r} is the --profile file; give the output another name")


def check_stdout() -> None:
    """UsageError when standard output is closed (``>&-``): the result could not be printed."""
    if sys.stdout is None:
        raise UsageError("standard output is closed, so the result cannot be printed (use >/dev/null)")


def write_timelines(args: argparse.Namespace, sim, ratios=None, *, title: str | None = None) -> list[str]:
    """Write ``--trace`` (Chrome trace) and ``--png`` (Gantt chart) when given, both or neither;
    returns the paths written."""
    from tfz.timeline import chrome_trace_bytes, gantt_png

    files = {}
    if getattr(args, "trace", None):
        files[args.trace] = chrome_trace_bytes(args.trace, sim, ratios)
    if getattr(args, "png", None):
        files[args.png] = gantt_png(sim, ratios, title=title)
    write_files(files)
    return list(files)
