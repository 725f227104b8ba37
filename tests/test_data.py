"""Byte corpus: split by file, windows and targets, the fixed evaluation set, the built-in corpora."""

import numpy as np
import pytest

from tfz.data import default_text_files, load_corpus, torch_header_files, torch_python_files


def _folder(tmp_path, n=10):
    texts = {f"f{i}.txt": (f"file {i} " * (i + 3)).encode() for i in range(n)}
    for name, data in texts.items():
        (tmp_path / name).write_bytes(data)
    return texts


def test_folder_split_is_by_file_and_seeded(tmp_path):
    texts = _folder(tmp_path)
    a = load_corpus(tmp_path, val_fraction=0.2, seed=1)
    b = load_corpus(tmp_path, val_fraction=0.2, seed=1)
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
    val = bytes(a.val).split(b"\n")
    train = bytes(a.train).split(b"\n")
    assert len(val) == 2 and len(train) == 8 and len(a.tune) == 0
    assert set(val) | set(train) == set(texts.values()) and not set(val) & set(train)


def test_tune_files_are_held_out_of_both_and_leave_validation_unchanged(tmp_path):
    texts = _folder(tmp_path, 20)
    plain = load_corpus(tmp_path, val_fraction=0.1, seed=3)
    c = load_corpus(tmp_path, val_fraction=0.1, tune_fraction=0.2, seed=3)
    parts = [set(bytes(x).split(b"\n")) for x in (c.train, c.val, c.tune)]
    assert [len(p) for p in parts] == [14, 2, 4]
    assert parts[0] | parts[1] | parts[2] == set(texts.values())
    assert not (parts[0] & parts[2]) and not (parts[1] & parts[2]) and not (parts[0] & parts[1])
    assert np.array_equal(plain.val, c.val)  # the same validation files with or without a tune part


def test_single_file_is_cut_by_position(tmp_path):
    f = tmp_path / "t.txt"
    f.write_bytes(bytes(range(200)))
    c = load_corpus(f, val_fraction=0.1, tune_fraction=0.2)
    assert bytes(c.train) == bytes(range(140))
    assert bytes(c.tune) == bytes(range(140, 180)) and bytes(c.val) == bytes(range(180, 200))


def test_batch_targets_are_next_bytes(tmp_path):
    f = tmp_path / "t.txt"
    f.write_bytes(bytes(range(256)) * 4)
    c = load_corpus(f, val_fraction=0.25)
    x, y = c.batch("train", 3, 10, np.random.default_rng(0))
    assert x.shape == y.shape == (3, 10)
    assert x.flags.c_contiguous and y.flags.c_contiguous  # torch's pipelining checks input strides
    np.testing.assert_array_equal((x + 1) % 256, y)
    with pytest.raises(ValueError, match="split must be one of 'train', 'val', 'tune', got 'test'"):
        c.batch("test", 1, 4, np.random.default_rng(0))
    with pytest.raises(ValueError, match="fewer than seq_len"):
        c.batch("val", 1, 10_000, np.random.default_rng(0))


def test_sequences_are_fixed_evenly_spaced_windows(tmp_path):
    f = tmp_path / "t.txt"
    f.write_bytes(bytes(range(100)) * 10)  # 1000 bytes, validation = the last 100
    c = load_corpus(f, val_fraction=0.1)
    x, y = c.sequences("val", 5, 8)
    assert x.shape == (5, 8) and x.dtype == np.int64
    # starts 0, 22.75, 45.5, 68.25, 91 -> 0, 22, 45, 68, 91 over the 100 validation bytes (values 0..99)
    np.testing.assert_array_equal(x[:, 0], [0, 22, 45, 68, 91])
    np.testing.assert_array_equal(y, x + 1)
    again = c.sequences("val", 5, 8)
    assert all(np.array_equal(a, b) for a, b in zip((x, y), again))
    with pytest.raises(ValueError, match="count must be an integer >= 1, got 0"):
        c.sequences("val", 0, 8)


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_corpus(tmp_path / "nope")
    with pytest.raises(ValueError, match="val_fraction"):
        load_corpus(tmp_path, val_fraction=1.0)
    with pytest.raises(ValueError, match=r"val_fraction \+ tune_fraction must be < 1"):
        load_corpus(tmp_path, val_fraction=0.5, tune_fraction=0.5)
    with pytest.raises(ValueError, match="needs at least 2 non-empty files"):
        load_corpus(tmp_path)  # empty folder
    (tmp_path / "only.txt").write_text("x")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="needs at least 2 non-empty files to split by file, found 1"):
        load_corpus(tmp_path)
    with pytest.raises(ValueError, match="empty.txt is empty"):
        load_corpus(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="unknown corpus 'nope'"):
        load_corpus(corpus="nope")
    for i in range(3):
        (tmp_path / f"more{i}.txt").write_text("y" * 10)
    with pytest.raises(ValueError, match="has 4 files: too few for 2 validation and 2 held-out files"):
        load_corpus(tmp_path, val_fraction=0.4, tune_fraction=0.55)


def test_default_corpus_is_the_stdlib():
    files = default_text_files()
    assert any(f.name == "functools.py" for f in files)
    c = load_corpus(max_bytes=1 << 16)
    assert len(c.train) >= 1 << 16 and len(c.val) > 0 and c.source == "python-stdlib"


def test_torch_headers_are_handwritten_cpp():
    files = torch_header_files()
    names = {f.name for f in files}
    assert "Tensor.h" in names and all(f.suffix in (".h", ".hpp") for f in files)
    assert not any("/ATen/ops/" in f.as_posix() for f in files)  # generated per-operator headers
    c = load_corpus(corpus="torch-headers", max_bytes=1 << 16)
    assert c.source == "torch-headers" and b"#include" in bytes(c.train[: 1 << 16])


def test_torch_python_sources_leave_out_tests():
    files = torch_python_files()
    assert any(f.name == "functional.py" and f.parent.name == "nn" for f in files)
    assert not any({"test", "tests", "testing"} & set(f.parts[-4:-1]) for f in files)
