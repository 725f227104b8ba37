"""The demo's base model: reproducible from its seed, cached by spec, loadable into any stage split."""

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tfz.data import load_corpus
from tfz.demo.base import (
    BaseSpec,
    _corpus,
    base_path,
    encode_cached,
    ensure_base,
    ensure_tokenizer,
    load_base,
    save_base,
)
from tfz.models import build_stages
from tfz.tokenizer import BytePairTokenizer

SPEC = BaseSpec(
    vocab_size=320, dim=16, n_layers=3, n_heads=2, ffn_dim=32, seq_len=8, steps=3, batch_size=2, warmup=1
)


@pytest.fixture(scope="module")
def spec_base(tmp_path_factory):
    """SPEC's base, built once for the module, with its vocabulary and encoded text beside it."""
    base, _ = ensure_base(SPEC, tmp_path_factory.mktemp("spec_base"), progress=lambda _: None)
    return base


@pytest.fixture
def seeded(tmp_path, spec_base):
    """``seeded(name)``: a new cache folder holding SPEC's vocabulary and encoded text (not its base),
    so a build there skips learning them."""

    def folder(name: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        for file in (
            *spec_base.path.parent.glob("tokenizer-*.json"),
            *spec_base.path.parent.glob("tokens-*.npz"),
        ):
            shutil.copy(file, path)
        return path

    return folder


def test_build_is_reproducible_and_cached(tmp_path, seeded):
    lines = []
    base_a, built = ensure_base(SPEC, seeded("a"), progress=lines.append)
    a = base_a.path
    assert built and a.is_file() and a.parent == tmp_path / "a"
    assert any("building the base model" in line for line in lines) and any("3/3" in line for line in lines)
    base_b, _ = ensure_base(SPEC, seeded("b"), progress=lines.append)
    assert a.name == base_b.path.name  # the name is a hash of the spec and the training text
    wa, wb = load_base(a).state_dict, load_base(base_b.path).state_dict
    assert all(torch.equal(base_a.state_dict[k], wa[k]) for k in wa)  # returned as it reads back
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    lines.clear()
    again, built = ensure_base(SPEC, tmp_path / "a", progress=lines.append)
    assert again.path == a and not built and not lines
    other = BaseSpec(**{**SPEC.__dict__, "seed": 1})
    assert base_path(other, tmp_path / "a") != a
    assert not torch.equal(
        ensure_base(other, tmp_path / "a")[0].state_dict["output.weight"], wa["output.weight"]
    )


def test_base_names_stay_what_earlier_releases_wrote(tmp_path):
    """A cached base stays valid across releases: its name is sha256 of the spec's JSON and of the
    training text's own sha256, as first written."""
    digest = hashlib.sha256(json.dumps(dataclasses.asdict(SPEC), sort_keys=True).encode())
    digest.update(hashlib.sha256(_corpus(SPEC).train.tobytes()).digest())
    assert base_path(SPEC, tmp_path).name == f"base-{digest.hexdigest()[:16]}.pt"


def test_any_split_loads_the_same_model(tmp_path):
    cfg = SPEC.model_config()
    whole = build_stages(cfg, 1, seed=5)[0]
    path = save_base(tmp_path / "mine.pt", cfg, whole.state_dict(), metrics={"note": 1})
    base = load_base(path)
    assert base.config == cfg and base.metrics == {"note": 1}
    x = torch.randint(0, 256, (2, 8))
    for split in (2, 3):
        stages = build_stages(cfg, split, seed=0)  # other weights, replaced by the base's
        for stage in stages.values():
            base.load_into(stage)
        h = x
        for s in range(split):
            h = stages[s](h)
        torch.testing.assert_close(h, whole(x), rtol=0, atol=0)


def test_bad_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_base(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="junk.pt is not a readable checkpoint"):
        load_base(junk)
    cfg = SPEC.model_config()
    good = save_base(tmp_path / "good.pt", cfg, build_stages(cfg, 1)[0].state_dict())
    payload = torch.load(good, weights_only=True)
    for key, value, match in (
        ("format", "other", "is not a tfz-demo-base file"),
        ("version", 99, r"version 99, expected one of \(1, 2\)"),
        ("tokenizer", [[97, 999]], "bad 'tokenizer' entry"),
        ("model", {"dim": -1}, "bad 'model' entry"),
        ("state_dict", {"w": 1}, "'state_dict' must map names to tensors"),
    ):
        bad = tmp_path / f"bad_{key}.pt"
        torch.save({**payload, key: value}, bad)
        with pytest.raises(ValueError, match=match):
            load_base(bad)
    small = tmp_path / "small.pt"
    weights = dict(payload["state_dict"])
    weights.pop("output.weight")
    torch.save({**payload, "state_dict": weights}, small)
    with pytest.raises(ValueError, match="no weights for 'output.weight'"):
        load_base(small).load_into(build_stages(cfg, 2)[1])


def test_spec_errors():
    with pytest.raises(ValueError, match="steps must be an integer >= 1, got 0"):
        BaseSpec(steps=0)
    with pytest.raises(ValueError, match="unknown corpus 'x'"):
        BaseSpec(corpus="x")
    with pytest.raises(ValueError, match="dim 10 is not divisible by n_heads 3"):
        BaseSpec(dim=10, n_heads=3)


def test_the_base_carries_its_tokenizer_and_encoded_text_is_cached(tmp_path):
    lines = []
    base, _ = ensure_base(SPEC, tmp_path, progress=lines.append)
    assert any("learning a 320-token vocabulary" in line for line in lines)
    tok = base.tokenizer
    assert tok.vocab_size == 320
    assert tok == ensure_tokenizer(_corpus(SPEC), 320, tmp_path, progress=lines.append)
    assert len([line for line in lines if "vocabulary" in line]) == 1  # learned once, then read back
    assert len(list(tmp_path.glob("tokenizer-*.json"))) == 1
    assert ensure_tokenizer(_corpus(SPEC), 256, tmp_path) is None
    text = tmp_path / "text"
    text.mkdir()
    for i in range(4):
        (text / f"{i}.py").write_text(f"def f{i}(x):\n    return x * {i}  # twice {i}\n" * 20)
    corpus = load_corpus(text, val_fraction=0.25)
    cached = set(tmp_path.glob("tokens-*.npz"))  # the base's corpus
    fresh = encode_cached(corpus, tok, tmp_path)
    again = encode_cached(corpus, tok, tmp_path)  # from tokens-<hash>.npz
    assert len(set(tmp_path.glob("tokens-*.npz")) - cached) == 1
    for split in ("train", "val", "tune"):
        ids = getattr(again, split)
        assert np.array_equal(ids, getattr(fresh, split)) and ids.dtype == np.uint16
        assert tok.decode(ids) == getattr(corpus, split).tobytes()
    assert again.tokenizer == tok and encode_cached(corpus, None, tmp_path) is corpus


def test_version_1_bases_read_bytes_and_vocabularies_must_fit(tmp_path):
    cfg = SPEC.model_config()
    weights = build_stages(cfg, 1)[0].state_dict()
    tok = BytePairTokenizer([(97, 98)] * 1 + [(256, 99)])
    good = save_base(tmp_path / "good.pt", cfg, weights, tokenizer=tok)
    assert load_base(good).tokenizer == tok
    payload = torch.load(good, weights_only=True)
    old = tmp_path / "v1.pt"
    torch.save({k: v for k, v in payload.items() if k != "tokenizer"} | {"version": 1}, old)
    assert load_base(old).tokenizer is None
    big = BytePairTokenizer([(97, 98)] * 80)
    with pytest.raises(ValueError, match="vocab_size 320 is too small for its tokenizer's 336 ids"):
        save_base(tmp_path / "big.pt", cfg, weights, tokenizer=big)
    torch.save({**payload, "tokenizer": [list(p) for p in big.merges]}, tmp_path / "big.pt")
    with pytest.raises(ValueError, match="big.pt: vocab_size 320 is too small"):
        load_base(tmp_path / "big.pt")
    with pytest.raises(ValueError, match="vocab_size must be an integer in \\[256, 65536\\], got 100"):
        BaseSpec(vocab_size=100)


def test_damaged_cache_files_are_built_again(seeded):
    """A truncated or garbled cache file (base, vocabulary, encoded text) is named as unreadable and
    rebuilt to what a fresh build gives; the rebuilt file reads back with no message."""
    folder = seeded("damaged")
    first, _ = ensure_base(SPEC, folder, progress=lambda _: None)
    path = first.path
    corpus = _corpus(SPEC)
    (vocab,) = folder.glob("tokenizer-*.json")
    (tokens,) = folder.glob("tokens-*.npz")

    def damaged(file, write, rebuild):
        write(file)
        lines = []
        out = rebuild(lines.append)
        assert lines and lines[0].startswith(f"cached {file} is unreadable (")
        assert lines[0].endswith("); building it again")
        again = []
        rebuild(again.append)
        assert not [line for line in again if "unreadable" in line]  # the file was written over
        return out

    said = []
    rebuilt, built = damaged(
        path,
        lambda f: f.write_bytes(path.read_bytes()[:100]),
        lambda say: ensure_base(SPEC, folder, progress=lambda line: (said.append(line), say(line))),
    )
    assert rebuilt.path == path and built
    assert said[1].startswith("building the base model again: ") and not any(" once" in line for line in said)
    weights = load_base(path).state_dict
    assert all(torch.equal(weights[k], first.state_dict[k]) for k in first.state_dict)

    not_json, other_size = (
        lambda f: f.write_bytes(b"{bad"),
        lambda f: f.write_text('{"vocab_size": 320, "merges": [[97, 98]]}'),  # merges cut short
    )
    for garble in (not_json, other_size):
        tok = damaged(vocab, garble, lambda say: ensure_tokenizer(corpus, 320, folder, progress=say))
        assert tok == first.tokenizer

    reference = corpus.encoded(first.tokenizer)
    for garble in (lambda f: f.write_bytes(b"PK\x03\x04"), lambda f: np.savez(f, train=reference.train)):
        got = damaged(
            tokens, garble, lambda say: encode_cached(corpus, first.tokenizer, folder, progress=say)
        )
        for split in ("train", "val", "tune"):
            assert np.array_equal(getattr(got, split), getattr(reference, split))


class _InterruptedError(Exception):
    pass


def test_an_interrupted_build_goes_on_to_the_weights_of_an_uninterrupted_one(tmp_path, seeded):
    """Stopped after step 4 of 6 (the progress line raising, as Ctrl-C would), the next build resumes
    at step 4 and ends bit for bit where an uninterrupted build ends; its saved progress is then gone."""
    spec = dataclasses.replace(SPEC, steps=6)
    whole, _ = ensure_base(spec, seeded("whole"), progress=lambda _: None)

    def stop_after_4(line):
        if "step 4/6" in line:
            raise _InterruptedError

    with pytest.raises(_InterruptedError):
        ensure_base(spec, seeded("cut"), progress=stop_after_4)
    (saved,) = (tmp_path / "cut").glob("base-*.progress.pt")
    assert not list((tmp_path / "cut").glob("base-*[0-9a-f].pt"))
    lines = []
    resumed, built = ensure_base(spec, tmp_path / "cut", progress=lines.append)
    assert built and any("resuming at step 4/6" in line for line in lines)
    assert not any("step 3/6" in line for line in lines) and any("step 6/6" in line for line in lines)
    assert all(torch.equal(resumed.state_dict[k], v) for k, v in whole.state_dict.items())
    assert resumed.metrics["val_loss"] == whole.metrics["val_loss"]
    assert resumed.metrics["train_loss"] == whole.metrics["train_loss"]
    assert not saved.exists()


def test_progress_that_is_not_this_builds_starts_it_over(seeded):
    spec = dataclasses.replace(SPEC, steps=6)
    whole, _ = ensure_base(spec, seeded("whole"), progress=lambda _: None)
    path = base_path(spec, seeded("cut"))
    saved = path.with_name(path.stem + ".progress.pt")
    other = {"format": "tfz-demo-base-progress", "spec": dataclasses.asdict(SPEC), "step": 2}
    for garble in (lambda f: f.write_bytes(b"PK\x03\x04"), lambda f: torch.save(other, f)):
        garble(saved)
        lines = []
        base, _ = ensure_base(spec, path.parent, progress=lines.append)
        said = [line for line in lines if line.startswith(f"cached {saved} is unreadable (")]
        assert len(said) == 1 and said[0].endswith("); starting the build over")
        assert not any("resuming" in line for line in lines)
        assert all(torch.equal(base.state_dict[k], v) for k, v in whole.state_dict.items())
        path.unlink()


def _built_by_another_process(path: Path, written: Path, call):
    """Hold ``path``'s build lock (as another process would), start ``call(progress)`` in a thread,
    check it says it waits, write ``written`` to ``path`` (what the other process leaves) and let go:
    ``call``'s result, after checking it said nothing else."""
    import fcntl
    import threading

    lines, result = [], {}
    waiting = [f"waiting for another process building {path}"]
    with open(path.with_name(path.stem + ".lock"), "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        waiter = threading.Thread(target=lambda: result.update(r=call(lines.append)))
        waiter.start()
        for _ in range(400):
            if lines:
                break
            threading.Event().wait(0.05)
        assert lines == waiting and waiter.is_alive()
        shutil.copy(written, path)
        fcntl.flock(held, fcntl.LOCK_UN)
    waiter.join(60)
    assert lines == waiting
    return result["r"]


def test_a_base_another_process_is_building_is_waited_for_not_built_twice(spec_base, seeded):
    """With the build lock held elsewhere (here by the test), ensure_base says it waits, and once the
    other build has written the base and let go, loads it without building."""
    path = base_path(SPEC, seeded("shared"))
    base, built = _built_by_another_process(
        path, spec_base.path, lambda say: ensure_base(SPEC, path.parent, progress=say)
    )
    assert not built
    assert all(torch.equal(base.state_dict[k], v) for k, v in spec_base.state_dict.items())


@pytest.mark.parametrize("kind", ["tokenizer", "tokens"])
def test_a_vocabulary_or_encoding_another_process_is_making_is_waited_for(
    spec_base, tmp_path, kind, monkeypatch
):
    """torchrun's ranks each prepare the run: one learns the vocabulary and encodes the text, the
    others wait for its files instead of doing the same work."""
    from tfz.data import TextCorpus

    suffix = {"tokenizer": "json", "tokens": "npz"}[kind]
    (written,) = spec_base.path.parent.glob(f"{kind}-*.{suffix}")
    corpus, tok = _corpus(SPEC), spec_base.tokenizer

    def redone(*_):
        raise AssertionError(f"{kind} made again")

    monkeypatch.setattr(BytePairTokenizer, "train", redone)
    monkeypatch.setattr(TextCorpus, "encoded", redone)
    if kind == "tokenizer":
        got = _built_by_another_process(
            tmp_path / written.name,
            written,
            lambda say: ensure_tokenizer(corpus, 320, tmp_path, progress=say),
        )
        assert got == tok
    else:
        got = _built_by_another_process(
            tmp_path / written.name, written, lambda say: encode_cached(corpus, tok, tmp_path, progress=say)
        )
        assert np.array_equal(got.train, tok.encode(corpus.train.tobytes()))


def test_a_build_that_cannot_keep_its_progress_goes_on_without_it(spec_base, seeded, monkeypatch):
    import tfz.demo.base as base_module

    whole = spec_base
    write = base_module._atomic_write

    def full_disk(path, how):
        if path.name.endswith(".progress.pt"):
            raise OSError(28, "No space left on device")
        return write(path, how)

    monkeypatch.setattr(base_module, "_atomic_write", full_disk)
    lines = []
    base, built = ensure_base(SPEC, seeded("full"), progress=lines.append)
    said = [line for line in lines if "cannot keep" in line]
    full = "([Errno 28] No space left on device); going on without it"
    assert built and said == [f"  base model: cannot keep the build's progress {full}"]
    assert all(torch.equal(base.state_dict[k], v) for k, v in whole.state_dict.items())


def test_unfinished_builds_of_other_bases_are_pointed_out_unless_running(spec_base, seeded):
    """A progress file of another base (an interrupted build of other settings) is named with its
    size whenever the demo's base is ensured, unless a process is building that base now."""
    import fcntl

    folder = seeded("left")
    shutil.copy(spec_base.path, folder)
    other = folder / "base-0123456789abcdef.progress.pt"
    other.write_bytes(b"x" * 3 * 2**20)
    lines = []
    assert not ensure_base(SPEC, folder, progress=lines.append)[1]
    assert lines == [
        f"note: 1 unfinished base build(s) of other settings in {folder} (3 MiB: {other.name}); "
        "a run with those settings resumes one, or delete it"
    ]
    with open(folder / "base-0123456789abcdef.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        lines.clear()
        ensure_base(SPEC, folder, progress=lines.append)
        assert lines == []  # being built now: not left behind


def test_pointing_out_unfinished_builds_never_fails_the_run(spec_base, seeded):
    """A progress file gone by the time it is looked at (its build just ended) is left out, and a lock
    that cannot be opened counts as no build running: the base still loads."""
    folder = seeded("odd")
    shutil.copy(spec_base.path, folder)
    (folder / "base-00000000000000aa.progress.pt").symlink_to(folder / "gone")
    (folder / "base-00000000000000bb.progress.pt").write_bytes(b"x" * 2**20)
    (folder / "base-00000000000000bb.lock").mkdir()  # cannot be opened as a file
    lines = []
    base, built = ensure_base(SPEC, folder, progress=lines.append)
    assert not built and base.path.parent == folder
    assert lines == [
        f"note: 1 unfinished base build(s) of other settings in {folder} (1 MiB: "
        "base-00000000000000bb.progress.pt); a run with those settings resumes one, or delete it"
    ]
