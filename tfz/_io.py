"""Writing files whole or not at all, and file name endings of any case.

:func:`write_files` writes each file to a temporary file in its folder and renames them over their
paths only once all are written, so a failed write (a full disk, ``ulimit -f``) leaves every path as
it was and no temporary file behind. Standard library only, like :mod:`tfz._validate`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import BinaryIO

__all__ = ["has_suffix", "write_files"]

Content = bytes | Callable[[BinaryIO], None]
"""What :func:`write_files` writes: bytes, or a function writing into a binary file."""


def has_suffix(path: str | os.PathLike, suffixes: str | tuple[str, ...]) -> bool:
    """Whether the name ``path`` ends in ``suffixes`` (one or a tuple), in any case."""
    ends = (suffixes,) if isinstance(suffixes, str) else suffixes
    return os.fspath(path).lower().endswith(tuple(s.lower() for s in ends))


def write_files(files: Mapping[str | os.PathLike, Content]) -> None:
    """Write every path of ``files`` whole, or none of them.

    A path that exists and is not a regular file (``/dev/null``) is written in place; a symbolic
    link's target is replaced. New files get the umask's permissions, as ``open`` gives them. An
    OSError names the path it was writing.
    """
    staged: list[tuple[Path, Path, str | os.PathLike]] = []  # (temporary file, target, path as given)
    try:
        for path, content in files.items():
            target = Path(os.path.realpath(path))
            with _naming(path):
                if target.exists() and not target.is_file():
                    with open(target, "wb") as f:
                        _write(f, content)
                    continue
                tmp, fd = _temporary(target)
                staged.append((tmp, target, path))
                with os.fdopen(fd, "wb") as f:
                    _write(f, content)
        for tmp, target, path in staged:
            with _naming(path):
                os.replace(tmp, target)
    except BaseException:
        for tmp, _, _ in staged:
            tmp.unlink(missing_ok=True)
        raise


def _write(f: BinaryIO, content: Content) -> None:
    if isinstance(content, bytes):
        f.write(content)
    else:
        content(f)


def _temporary(target: Path) -> tuple[Path, int]:
    """A new file ``<name>.<random>.tmp`` beside ``target``, opened for writing: (path, descriptor)."""
    while True:
        tmp = target.with_name(f"{target.name}.{secrets.token_hex(4)}.tmp")
        try:
            return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue


@contextlib.contextmanager
def _naming(path):
    """An OSError raised inside names ``path`` (a full disk names no file, and a temporary file's
    name means nothing to the caller)."""
    try:
        yield
    except OSError as exc:
        if exc.errno is None or exc.filename == os.fspath(path):
            raise
        raise OSError(exc.errno, exc.strerror, os.fspath(path)) from None
