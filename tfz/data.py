"""Text that needs no download: corpora every machine that runs tfz already has.

- ``python-stdlib``: the running interpreter's standard library sources (``.py``, tests excluded);
- ``torch-headers``: the C/C++ headers installed with torch (``torch/include``), without the generated
  per-operator headers of ``ATen/ops``;
- ``torch-python``: torch's own Python sources (tests and testing utilities excluded).

Files are split into train, validation and (optionally) a held-out "tune" part by file with a fixed
seed, so no validation text is seen in training. :meth:`TextCorpus.sequences` gives a fixed,
evenly spaced set of windows of a split: the same validation set for every method and every seed.
:meth:`TextCorpus.encoded` turns the bytes into a tokenizer's ids (``tfz.tokenizer``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import random
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tfz._validate import check_choice, check_int, check_number

__all__ = [
    "CORPORA",
    "TextCorpus",
    "corpus_files",
    "default_text_files",
    "load_corpus",
    "torch_header_files",
    "torch_python_files",
]

SPLITS = ("train", "val", "tune")


def default_text_files() -> list[Path]:
    """The ``.py`` files of the running interpreter's standard library (tests excluded), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts]
    if not files:
        raise FileNotFoundError(f"no .py files found under the standard library at {root}")
    return sorted(files)


def _torch_root() -> Path:
    """The installed torch package's folder, found without importing torch."""
    spec = importlib.util.find_spec("torch")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise FileNotFoundError("torch is not installed: no torch sources to read")
    return Path(locations[0])


def torch_python_files() -> list[Path]:
    """torch's own ``.py`` files (folders named test, tests or testing excluded), sorted."""
    root = _torch_root()
    skip = {"test", "tests", "testing"}
    files = [p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts)]
    if not files:
        raise FileNotFoundError(f"no .py files found under {root}")
    return sorted(files)


def torch_header_files() -> list[Path]:
    """The ``.h`` / ``.hpp`` files under the installed torch's ``include`` folder, without the generated
    per-operator headers (``ATen/ops``), sorted."""
    root = _torch_root() / "include"
    files = [
        p
        for p in root.rglob("*")
        if p.suffix in (".h", ".hpp") and p.is_file() and p.relative_to(root).parts[:2] != ("ATen", "ops")
    ]
    if not files:
        raise FileNotFoundError(f"no C/C++ headers found under {root}")
    return sorted(files)


CORPORA: dict[str, Callable[[], list[Path]]] = {
    "python-stdlib": default_text_files,
    "torch-headers": torch_header_files,
    "torch-python": torch_python_files,
}
"""Built-in corpora: name -> function listing their files."""


def corpus_files(name: str) -> list[Path]:
    """The files of built-in corpus ``name`` (a key of :data:`CORPORA`)."""
    return CORPORA[check_choice("corpus", name, CORPORA)]()


@dataclass(frozen=True)
class TextCorpus:
    """Train, validation and held-out ("tune") text: bytes (uint8 arrays) or token ids (uint16, see
    :meth:`encoded`); ``tune`` is empty unless asked for."""

    train: np.ndarray
    val: np.ndarray
    source: str
    tune: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint8))

    tokenizer: Any = None
    """The :class:`tfz.tokenizer.BytePairTokenizer` whose ids the splits hold; None for bytes."""

    def encoded(self, tokenizer) -> TextCorpus:
        """This byte corpus as ``tokenizer``'s ids (``tokenizer.encode`` of each split)."""
        if self.tokenizer is not None:
            raise ValueError(f"{self.source} is already encoded by {self.tokenizer!r}")
        ids = {split: tokenizer.encode(getattr(self, split).tobytes()) for split in SPLITS}
        return dataclasses.replace(self, tokenizer=tokenizer, **ids)

    def _split(self, split: str, seq_len: int) -> np.ndarray:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(map(repr, SPLITS))}, got {split!r}")
        data = getattr(self, split)
        if len(data) <= seq_len + 1:
            unit = "bytes" if self.tokenizer is None else "tokens"
            raise ValueError(
                f"{self.source}: {split} text has {len(data)} {unit}, fewer than seq_len + 2 = {seq_len + 2}"
            )
        return data

    @staticmethod
    def _windows(data: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
        windows = data[idx].astype(np.int64)
        return np.ascontiguousarray(windows[:, :-1]), np.ascontiguousarray(windows[:, 1:])

    def batch(self, split: str, batch_size: int, seq_len: int, rng: np.random.Generator):
        """Random windows: inputs [batch, seq_len] and next-token targets [batch, seq_len] (int64 numpy,
        C-contiguous: torch's pipelining checks stage-input strides against the first microbatch's)."""
        data = self._split(split, seq_len)
        starts = rng.integers(0, len(data) - seq_len - 1, size=batch_size)
        return self._windows(data, starts, seq_len)

    def sequences(self, split: str, count: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """``count`` windows evenly spaced over the whole split (no randomness): a fixed evaluation set.
        Inputs and next-token targets, int64 [count, seq_len]."""
        count = check_int("count", count, 1)
        data = self._split(split, seq_len)
        starts = np.linspace(0, len(data) - seq_len - 1, count).astype(np.int64)
        return self._windows(data, starts, seq_len)


def _read_files(files: list[Path], limit: int | None) -> np.ndarray:
    chunks, total = [], 0
    for f in files:
        chunk = f.read_bytes()
        if not chunk:
            continue
        chunks.append(chunk)
        total += len(chunk)
        if limit is not None and total >= limit:
            break
    return np.frombuffer(b"\n".join(chunks), dtype=np.uint8)


def _folder_files(p: Path) -> list[Path]:
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.stat().st_size > 0)
    if len(files) < 2:
        raise ValueError(
            f"data folder {p} needs at least 2 non-empty files to split by file, found {len(files)}"
        )
    return files


def load_corpus(
    path: str | Path | None = None,
    *,
    corpus: str = "python-stdlib",
    val_fraction: float = 0.1,
    tune_fraction: float = 0.0,
    seed: int = 0,
    max_bytes: int | None = 8 << 20,
) -> TextCorpus:
    """Load text from ``path`` (a file or a folder of text files), or built-in ``corpus`` when None.

    Folders are split by file: the files are shuffled with ``seed``, ``val_fraction`` of them validate,
    the next ``tune_fraction`` are held out as ``tune`` (for choosing settings without touching the
    validation set), the rest train. A single file is cut by position in the same proportions
    (train, tune, val). At most ``max_bytes`` bytes per split are read. Empty files and folders are
    refused (ValueError naming the path).
    """
    val_fraction = check_number("val_fraction", val_fraction, low=0.0, high=1.0, low_open=True)
    tune_fraction = check_number("tune_fraction", tune_fraction, low=0.0, high=1.0)
    if val_fraction + tune_fraction >= 1.0:
        raise ValueError(f"val_fraction + tune_fraction must be < 1, got {val_fraction} + {tune_fraction}")
    if path is None:
        files, source = corpus_files(corpus), corpus
    else:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"data path {p} does not exist")
        if p.is_file():
            data = np.frombuffer(p.read_bytes(), dtype=np.uint8)
            if len(data) == 0:
                raise ValueError(f"data file {p} is empty")
            a = int(len(data) * (1 - val_fraction - tune_fraction))
            b = int(len(data) * (1 - val_fraction))
            return TextCorpus(data[:a], data[b:], str(p), data[a:b])
        if not p.is_dir():
            raise ValueError(f"data path {p} is neither a file nor a folder")
        files, source = _folder_files(p), str(p)
    files = list(files)
    random.Random(seed).shuffle(files)
    n_val = max(1, int(round(len(files) * val_fraction)))
    n_tune = int(round(len(files) * tune_fraction))
    if tune_fraction > 0:
        n_tune = max(1, n_tune)
    if n_val + n_tune >= len(files):
        raise ValueError(
            f"{source} has {len(files)} files: too few for {n_val} validation and {n_tune} held-out files "
            "and at least one to train on"
        )
    val, tune, train = files[:n_val], files[n_val : n_val + n_tune], files[n_val + n_tune :]
    return TextCorpus(
        _read_files(train, max_bytes),
        _read_files(val, max_bytes),
        source,
        _read_files(tune, max_bytes),
    )
