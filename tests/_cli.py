"""Running ``tfz`` in-process for tests, and a file-size limit to make writes fail part-way."""

from __future__ import annotations

import contextlib
import resource

from tfz.cli import main


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``tfz *argv``, argparse's own exits included."""
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """Writing a file past ``nbytes`` fails with EFBIG ("File too large"; Python ignores SIGXFSZ),
    as under ``ulimit -f``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
