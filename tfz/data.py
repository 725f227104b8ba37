"""Byte-level text that needs no download: by default the running interpreter's standard library sources.

Files are split into train and validation by file with a fixed seed, so no validation text is seen in
training.
"""

from __future__ import annotations

import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["ByteCorpus", "default_text_files", "load_corpus"]


def default_text_files() -> list[Path]:
    """The ``.py`` files of the running interpreter's standard library (tests excluded), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts]
    if not files:
        raise FileNotFoundError(f"no .py files found under the standard library at {root}")
    return sorted(files)


@dataclass(frozen=True)
class ByteCorpus:
    """Train and validation bytes (uint8 arrays)."""

    train: np.ndarray
    val: np.ndarray
    source: str

    def batch(self, split: str, batch_size: int, seq_len: int, rng: np.random.Generator):
        """Random windows: inputs [batch, seq_len] and next-byte targets [batch, seq_len] (int64 numpy,
        C-contiguous: torch's pipelining checks stage-input strides against the first microbatch's)."""
        data = {"train": self.train, "val": self.val}.get(split)
        if data is None:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if len(data) <= seq_len + 1:
            raise ValueError(f"{split} text has {len(data)} bytes, fewer than seq_len + 2 = {seq_len + 2}")
        starts = rng.integers(0, len(data) - seq_len - 1, size=batch_size)
        idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
        windows = data[idx].astype(np.int64)
        return np.ascontiguousarray(windows[:, :-1]), np.ascontiguousarray(windows[:, 1:])


def _read_files(files: list[Path], limit: int | None) -> np.ndarray:
    chunks, total = [], 0
    for f in files:
        chunk = f.read_bytes()
        chunks.append(chunk)
        total += len(chunk)
        if limit is not None and total >= limit:
            break
    return np.frombuffer(b"\n".join(chunks), dtype=np.uint8)


def load_corpus(
    path: str | Path | None = None,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    max_bytes: int | None = 8 << 20,
) -> ByteCorpus:
    """Load text from ``path`` (a file or a folder of text files; default: the standard library).

    Folders are split by file (``val_fraction`` of the files, shuffled with ``seed``); a single file is split
    at ``1 - val_fraction`` of its length. At most ``max_bytes`` bytes per split are read.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if path is None:
        files, source = default_text_files(), "python-stdlib"
    else:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"data path {p} does not exist")
        if p.is_file():
            data = np.frombuffer(p.read_bytes(), dtype=np.uint8)
            cut = int(len(data) * (1 - val_fraction))
            return ByteCorpus(data[:cut], data[cut:], str(p))
        files = sorted(f for f in p.rglob("*") if f.is_file())
        source = str(p)
        if len(files) < 2:
            raise ValueError(f"data folder {p} needs at least 2 files to split by file, found {len(files)}")
    files = list(files)
    random.Random(seed).shuffle(files)
    n_val = max(1, int(round(len(files) * val_fraction)))
    return ByteCorpus(_read_files(files[n_val:], max_bytes), _read_files(files[:n_val], max_bytes), source)
