"""Byte corpus: split by file, windows and targets."""

import numpy as np
import pytest

from tfz.data import default_text_files, load_corpus


def test_folder_split_is_by_file_and_seeded(tmp_path):
    texts = {f"f{i}.txt": (f"file {i} " * (i + 3)).encode() for i in range(10)}
    for name, data in texts.items():
        (tmp_path / name).write_bytes(data)
    a = load_corpus(tmp_path, val_fraction=0.2, seed=1)
    b = load_corpus(tmp_path, val_fraction=0.2, seed=1)
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
    val = bytes(a.val).split(b"\n")
    train = bytes(a.train).split(b"\n")
    assert len(val) == 2 and len(train) == 8
    assert set(val) | set(train) == set(texts.values()) and not set(val) & set(train)


def test_batch_targets_are_next_bytes(tmp_path):
    f = tmp_path / "t.txt"
    f.write_bytes(bytes(range(256)) * 4)
    c = load_corpus(f, val_fraction=0.25)
    x, y = c.batch("train", 3, 10, np.random.default_rng(0))
    assert x.shape == y.shape == (3, 10)
    assert x.flags.c_contiguous and y.flags.c_contiguous  # torch's pipelining checks input strides
    np.testing.assert_array_equal((x + 1) % 256, y)
    with pytest.raises(ValueError, match="split must be 'train' or 'val'"):
        c.batch("test", 1, 4, np.random.default_rng(0))
    with pytest.raises(ValueError, match="fewer than seq_len"):
        c.batch("val", 1, 10_000, np.random.default_rng(0))


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_corpus(tmp_path / "nope")
    with pytest.raises(ValueError, match="val_fraction"):
        load_corpus(tmp_path, val_fraction=1.0)
    (tmp_path / "only.txt").write_text("x")
    with pytest.raises(ValueError, match="at least 2 files"):
        load_corpus(tmp_path)


def test_default_corpus_is_the_stdlib():
    files = default_text_files()
    assert any(f.name == "functools.py" for f in files)
    c = load_corpus(max_bytes=1 << 16)
    assert len(c.train) >= 1 << 16 and len(c.val) > 0 and c.source == "python-stdlib"
