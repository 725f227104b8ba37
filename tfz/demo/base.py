"""The base model ``tfz demo --task finetune`` starts from: pretrained without freezing, built once, cached.

:func:`ensure_base` returns the base of a :class:`BaseSpec`, loaded, building it on first use
(one process, every core, progress printed) into the cache folder (``$TFZ_CACHE_DIR``, else
``$XDG_CACHE_HOME/tfz``, else ``~/.cache/tfz``). The file name carries a hash of the spec and of the
training text, so a changed spec or corpus builds a new base, and a build is reproducible from the
spec's seed. Files are written atomically; a cached file that no longer reads (truncated, damaged) is
said to be unreadable and built again over itself. A build keeps its progress beside the base
(``base-<hash>.progress.pt``, at every progress line, removed once the base is written), so an
interrupted first run goes on where it stopped, to the weights an uninterrupted build gives (progress
files of other bases that no process is building are pointed out with their size). A lock
file beside each cached file (``<name>.lock``) makes processes sharing the cache build it once: the
base, the vocabulary and the encoded text.

A base file (``torch.save``, loadable with ``weights_only=True``) holds::

    {"format": "tfz-demo-base", "version": 2, "model": {LlamaConfig fields}, "state_dict": {...},
     "tokenizer": [[a, b], ...] (byte-pair merges) or None (bytes),
     "spec": {BaseSpec fields} or None, "metrics": {"train_loss": ..., "val_loss": ...}}

Version 1 files (no ``tokenizer``) load as byte-level models. A base of more than 256 tokens learns
its tokenizer from its corpus (:func:`ensure_tokenizer`, cached beside it); text is encoded once per
tokenizer and corpus and cached too (:func:`encode_cached`).

``state_dict`` is the whole model as one :class:`tfz.models.LlamaStage` (``tok_embeddings.*``,
``layers.<i>.*``, ``norm.*``, ``output.*``): any split into stages loads its part by key.
:func:`save_base` writes one from your own weights (``tfz demo --base PATH``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

try:
    import fcntl
except ImportError:  # no flock on this platform: processes sharing the cache do not wait for each other
    fcntl = None

from tfz._io import write_files
from tfz._validate import check_choice, check_int, check_number
from tfz.data import SPLITS
from tfz.tokenizer import MAX_VOCAB, BytePairTokenizer

__all__ = [
    "BaseModel",
    "BaseSpec",
    "base_path",
    "cache_dir",
    "encode_cached",
    "ensure_base",
    "ensure_tokenizer",
    "load_base",
    "save_base",
]

FORMAT = "tfz-demo-base"
VERSION = 2
_VERSIONS = (1, 2)
_TOKENIZER_SAMPLE = 2 << 20
"""Bytes of a corpus's training split a tokenizer learns its merges from."""


@dataclass(frozen=True, kw_only=True)
class BaseSpec:
    """How the default base model is pretrained (no freezing, one process)."""

    vocab_size: int = 4096
    """A byte-pair vocabulary learned from ``corpus`` (:func:`ensure_tokenizer`); 256: bytes."""
    dim: int = 384
    n_layers: int = 4
    n_heads: int = 6
    ffn_dim: int = 1536
    seq_len: int = 64
    corpus: str = "python-stdlib"
    """Built-in corpus it is pretrained on (``tfz.data.CORPORA``)."""
    steps: int = 150
    batch_size: int = 32
    """Sequences per step."""
    lr: float = 2e-3
    """AdamW peak learning rate: linear warm-up over ``warmup`` steps, then cosine to 10%."""
    warmup: int = 15
    weight_decay: float = 0.1
    seed: int = 0
    """Initial weights and data order."""

    def __post_init__(self):
        for name in ("dim", "n_layers", "n_heads", "ffn_dim", "seq_len", "steps", "batch_size", "warmup"):
            check_int(name, getattr(self, name), 1)
        check_int("vocab_size", self.vocab_size, 256, maximum=MAX_VOCAB)
        check_int("seed", self.seed, 0)
        check_number("lr", self.lr, low=0.0, low_open=True)
        check_number("weight_decay", self.weight_decay, low=0.0)
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        from tfz.data import CORPORA

        check_choice("corpus", self.corpus, CORPORA)

    def model_config(self):
        from tfz.models import LlamaConfig

        return LlamaConfig(
            vocab_size=self.vocab_size,
            dim=self.dim,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            n_kv_heads=self.n_heads,
            ffn_dim=self.ffn_dim,
            max_seq_len=self.seq_len,
        )


@dataclass(frozen=True)
class BaseModel:
    """A loaded base: the model shape and the whole model's weights."""

    config: Any
    """:class:`tfz.models.LlamaConfig`."""
    state_dict: dict[str, Any]
    path: Path
    metrics: dict[str, Any]
    tokenizer: Any = None
    """Its :class:`tfz.tokenizer.BytePairTokenizer`; None: it reads bytes."""

    def check_fits(self, num_stages: int, seq_len: int) -> None:
        """ValueError unless this base splits into ``num_stages`` stages and takes ``seq_len`` tokens."""
        if self.config.n_layers < num_stages:
            raise ValueError(
                f"base model {self.path} has {self.config.n_layers} layers, fewer than the {num_stages} "
                "pipeline stages"
            )
        if seq_len > self.config.max_seq_len:
            raise ValueError(
                f"seq_len {seq_len} exceeds the base model's max_seq_len {self.config.max_seq_len}"
            )

    def load_into(self, stage) -> None:
        """Copy this base's weights into ``stage`` (a :class:`tfz.models.LlamaStage` of any split)."""
        wanted = stage.state_dict().keys()
        missing = [k for k in wanted if k not in self.state_dict]
        if missing:
            raise ValueError(f"base {self.path}: no weights for {missing[0]!r} ({len(missing)} missing)")
        stage.load_state_dict({k: self.state_dict[k] for k in wanted})


def cache_dir(folder: Path | str | None = None) -> Path:
    """``folder`` when given, else ``$TFZ_CACHE_DIR``, else ``$XDG_CACHE_HOME/tfz``, else ``~/.cache/tfz``."""
    if folder is not None:
        return Path(folder)
    if os.environ.get("TFZ_CACHE_DIR"):
        return Path(os.environ["TFZ_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "tfz"


@functools.lru_cache(maxsize=2)
def _corpus_named(name: str):
    from tfz.data import load_corpus

    return load_corpus(corpus=name, seed=0)


def _corpus(spec: BaseSpec):
    return _corpus_named(spec.corpus)


def _digest(*arrays, prefix: bytes = b"") -> str:
    """Cache key: sha256 of ``prefix`` and each array's own sha256, 16 hex digits."""
    digest = hashlib.sha256(prefix)
    for a in arrays:
        digest.update(hashlib.sha256(np.ascontiguousarray(a).tobytes()).digest())
    return digest.hexdigest()[:16]


def _atomic_write(path: Path, write: Callable[[Any], None]) -> Path:
    """Write ``path`` through ``write(file)``, making its folder: a temporary file renamed over it
    (none left on failure; :func:`tfz._io.write_files`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_files({path: write})
    return path


def _read_cached(
    path: Path, read: Callable[[Path], Any], progress: Callable[[str], None], then: str = "building it again"
) -> Any:
    """``read(path)`` of a cache file; None when it is missing, or unreadable (said through
    ``progress``, with what happens ``then``), so the caller builds it again over the bad one."""
    if not path.is_file():
        return None
    try:
        return read(path)
    except Exception as exc:  # a damaged file fails in its reader's own way (zip, json, torch)
        progress(f"cached {path} is unreadable ({type(exc).__name__}); {then}")
        return None


def ensure_tokenizer(
    corpus, vocab_size: int, folder: Path | None = None, *, progress: Callable[[str], None] = print
) -> BytePairTokenizer | None:
    """A ``vocab_size``-token byte-pair tokenizer of ``corpus`` (a byte-level :class:`tfz.data.TextCorpus`;
    None for 256): learned once from the first bytes of its training split, then cached
    (``tokenizer-<hash>.json``, keyed by the size and those bytes)."""
    if vocab_size == 256:
        return None
    sample = corpus.train[:_TOKENIZER_SAMPLE]
    key = _digest(np.array([vocab_size]), sample)
    path = cache_dir(folder) / f"tokenizer-{key}.json"

    def read(path: Path) -> BytePairTokenizer:
        saved = json.loads(path.read_text())
        tokenizer = BytePairTokenizer(saved["merges"])  # fewer than vocab_size when the text ran out
        if not tokenizer.vocab_size == saved["vocab_size"] <= vocab_size:
            raise ValueError(f"{tokenizer.vocab_size} tokens, recorded {saved['vocab_size']}")
        return tokenizer

    def build() -> BytePairTokenizer:
        progress(f"learning a {vocab_size:,}-token vocabulary from {corpus.source} once; cached as {path}")
        tokenizer = BytePairTokenizer.train(sample.tobytes(), vocab_size)
        text = json.dumps({"vocab_size": tokenizer.vocab_size, "merges": tokenizer.merges})
        _atomic_write(path, lambda f: f.write(text.encode()))
        return tokenizer

    return _cached(path, read, build, progress)


def encode_cached(corpus, tokenizer, folder: Path | None = None, *, progress: Callable[[str], None] = print):
    """``corpus.encoded(tokenizer)`` (``corpus`` unchanged when ``tokenizer`` is None), cached by the
    tokenizer and the text (``tokens-<hash>.npz``)."""
    if tokenizer is None:
        return corpus
    texts = [getattr(corpus, split) for split in SPLITS]
    key = _digest(np.asarray(tokenizer.merges, dtype=np.int64), *texts)
    path = cache_dir(folder) / f"tokens-{key}.npz"

    def read(path: Path):
        with np.load(path) as saved:
            return dataclasses.replace(corpus, tokenizer=tokenizer, **{k: saved[k] for k in SPLITS})

    def build():
        encoded = corpus.encoded(tokenizer)
        _atomic_write(path, lambda f: np.savez(f, **{split: getattr(encoded, split) for split in SPLITS}))
        return encoded

    return _cached(path, read, build, progress)


def base_path(spec: BaseSpec, folder: Path | None = None, *, corpus=None) -> Path:
    """Where the base of ``spec`` is cached: ``base-<hash of spec and training text>.pt``."""
    corpus = _corpus(spec) if corpus is None else corpus
    key = _digest(corpus.train, prefix=json.dumps(dataclasses.asdict(spec), sort_keys=True).encode())
    return cache_dir(folder) / f"base-{key}.pt"


def lr_factor(step: int, warmup: int, steps: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from 1 to 0.1 at ``steps``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


_PROGRESS_FORMAT = "tfz-demo-base-progress"


def _progress_path(path: Path) -> Path:
    """Where a build of the base cached at ``path`` keeps its progress until it ends."""
    return path.with_name(path.stem + ".progress.pt")


def _resume(progress_file: Path, spec: BaseSpec, say: Callable[[str], None]) -> dict | None:
    """The saved progress of an interrupted build of ``spec``; None when there is none, or it is not
    one (said, and the build starts over)."""
    import torch

    def read(path: Path) -> dict:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("format") != _PROGRESS_FORMAT or saved.get("spec") != dataclasses.asdict(spec):
            raise ValueError("not this spec's progress")
        if not 0 < saved["step"] < spec.steps:
            raise ValueError(f"step {saved['step']}")
        return saved

    return _read_cached(progress_file, read, say, then="starting the build over")


def _save_progress(
    file: Path, spec: BaseSpec, step: int, seconds: float, losses: list, rng, training: dict
) -> None:
    """Write a build's state after ``step`` steps (``training``: the model, optimizer and scheduler)."""
    import torch

    state = {
        "format": _PROGRESS_FORMAT,
        "spec": dataclasses.asdict(spec),
        "step": step,
        "seconds": seconds,
        "losses": losses,
        "rng": json.dumps(rng.bit_generator.state),
        **{name: part.state_dict() for name, part in training.items()},
    }
    _atomic_write(file, lambda f: torch.save(state, f))


def _pretrain(
    spec: BaseSpec, corpus, progress: Callable[[str], None], progress_file: Path | None = None
) -> tuple[dict, dict]:
    """Pretrain ``spec``'s model on ``corpus``: (weights, metrics). With ``progress_file`` the build
    saves its state there at every progress line and resumes from it, so an interrupted build goes
    on where it stopped and ends with the weights an uninterrupted one gives. ``seconds`` in the
    metrics is the training time of the steps the weights come from (steps run after the last save
    of an interrupted build, and lost with it, are not counted)."""
    import torch
    import torch.nn.functional as F

    from tfz.models import build_stages

    model = build_stages(spec.model_config(), 1, seed=spec.seed)[0]
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.95), weight_decay=spec.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, spec.warmup, spec.steps))
    rng = np.random.default_rng([spec.seed, 7])
    training = {"model": model, "optimizer": opt, "scheduler": sched}
    first, spent, losses = 0, 0.0, []
    saved = None if progress_file is None else _resume(progress_file, spec, progress)
    if saved is not None:
        for name, part in training.items():
            part.load_state_dict(saved[name])
        rng.bit_generator.state = json.loads(saved["rng"])
        first, spent, losses = saved["step"], saved["seconds"], list(saved["losses"])
        progress(f"  base model: resuming at step {first}/{spec.steps} from {progress_file}")
    resumed_at = time.perf_counter()
    every = max(1, spec.steps // 10)
    for step in range(first, spec.steps):
        x, y = (torch.from_numpy(a) for a in corpus.batch("train", spec.batch_size, spec.seq_len, rng))
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % every == 0 or step + 1 == spec.steps:
            now = time.perf_counter() - resumed_at
            elapsed = spent + now
            if progress_file is not None and step + 1 < spec.steps:
                try:
                    _save_progress(progress_file, spec, step + 1, elapsed, losses, rng, training)
                except OSError as exc:  # a full disk stops the keeping, not the build
                    progress(f"  base model: cannot keep the build's progress ({exc}); going on without it")
                    progress_file = None
            eta = now / (step + 1 - first) * (spec.steps - step - 1)
            progress(
                f"  base model: step {step + 1}/{spec.steps}, train loss {np.mean(losses[-every:]):.3f} "
                f"({elapsed:.0f} s, about {eta:.0f} s left)"
            )
    x, y = (torch.from_numpy(a) for a in corpus.sequences("val", 64, spec.seq_len))
    with torch.no_grad():
        val = float(F.cross_entropy(model(x).flatten(0, 1), y.flatten()))
    metrics = {"train_loss": float(np.mean(losses[-every:])), "val_loss": val, "seconds": elapsed}
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, metrics


def save_base(
    path: str | Path,
    model_config,
    state_dict: Mapping[str, Any],
    *,
    spec: BaseSpec | None = None,
    metrics: Mapping[str, Any] | None = None,
    tokenizer=None,
) -> Path:
    """Write a base file (atomically): ``model_config`` a :class:`tfz.models.LlamaConfig`,
    ``state_dict`` the whole model's weights as one LlamaStage's, ``tokenizer`` the
    :class:`tfz.tokenizer.BytePairTokenizer` of its text (None: bytes)."""
    import torch

    path = Path(path)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model": dataclasses.asdict(model_config),
        "state_dict": dict(state_dict),
        "tokenizer": None if tokenizer is None else [list(pair) for pair in tokenizer.merges],
        "spec": None if spec is None else dataclasses.asdict(spec),
        "metrics": dict(metrics or {}),
    }
    _check_vocab(path, model_config.vocab_size, tokenizer)
    return _atomic_write(Path(path), lambda f: torch.save(payload, f))


def _check_vocab(path, vocab_size: int, tokenizer) -> None:
    needed = 256 if tokenizer is None else tokenizer.vocab_size
    if vocab_size < needed:
        kind = "bytes" if tokenizer is None else f"its tokenizer's {needed:,} ids"
        raise ValueError(f"base model {path}: vocab_size {vocab_size:,} is too small for {kind}")


def load_base(path: str | Path) -> BaseModel:
    """Read a base file; ValueError naming the file and the field when it is not one."""
    import torch

    from tfz.models import LlamaConfig

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"base model {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a file that is not a checkpoint
        raise ValueError(f"base model {path} is not a readable checkpoint ({type(exc).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"base model {path} is not a {FORMAT} file (no format: {FORMAT!r} entry)")
    if payload.get("version") not in _VERSIONS:
        raise ValueError(
            f"base model {path}: version {payload.get('version')!r}, expected one of {_VERSIONS}"
        )
    try:
        config = LlamaConfig(**payload["model"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"base model {path}: bad 'model' entry ({exc})") from None
    weights = payload.get("state_dict")
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise ValueError(f"base model {path}: 'state_dict' must map names to tensors")
    merges = payload.get("tokenizer")
    try:
        tokenizer = None if merges is None else BytePairTokenizer(merges)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"base model {path}: bad 'tokenizer' entry ({exc})") from None
    _check_vocab(path, config.vocab_size, tokenizer)
    return BaseModel(config, weights, path, dict(payload.get("metrics") or {}), tokenizer)


def ensure_base(
    spec: BaseSpec, folder: Path | None = None, *, progress: Callable[[str], None] = print
) -> tuple[BaseModel, bool]:
    """(the base of ``spec``, loaded; whether it was built now). Built on first use, then cached."""
    corpus = _corpus(spec)
    path = base_path(spec, folder, corpus=corpus)

    def build() -> None:
        progress(
            f"building the base model {'again' if path.exists() else 'once'}: {spec.n_layers} layers, "
            f"dim {spec.dim}, pretrained without "
            f"freezing on {spec.corpus} for {spec.steps} steps (seed {spec.seed}); cached as {path}"
        )
        tokenizer = ensure_tokenizer(corpus, spec.vocab_size, folder, progress=progress)
        encoded = encode_cached(corpus, tokenizer, folder, progress=progress)
        weights, metrics = _pretrain(spec, encoded, progress, _progress_path(path))
        save_base(path, spec.model_config(), weights, spec=spec, metrics=metrics, tokenizer=tokenizer)
        _progress_path(path).unlink(missing_ok=True)
        progress(f"  base model ready: validation loss {metrics['val_loss']:.3f} on {spec.corpus}")

    cached = _cached(path, load_base, build, progress)
    left = _unfinished_builds(path)
    if left:
        mib = sum(left.values()) / 2**20
        progress(
            f"note: {len(left)} unfinished base build(s) of other settings in {path.parent} ({mib:.0f} MiB: "
            f"{', '.join(left)}); a run with those settings resumes one, or delete it"
        )
    return (cached, False) if cached is not None else (load_base(path), True)


def _unfinished_builds(path: Path) -> dict[str, int]:
    """Name -> size in bytes of the progress files beside ``path`` of other bases' builds that no
    process is running now (one that is gone by the time it is looked at is left out)."""
    left = {}
    for file in sorted(path.parent.glob("base-*.progress.pt")):
        base = file.with_name(file.name.removesuffix(".progress.pt") + ".pt")
        if base == path or _building(base):
            continue
        try:
            left[file.name] = file.stat().st_size
        except OSError:  # its build just ended and removed it
            continue
    return left


def _building(path: Path) -> bool:
    """Whether a process holds the build lock of ``path`` now."""
    if fcntl is None:
        return False
    try:
        with open(_lock_file(path)) as f:
            return not _try_lock(f)  # closing the file lets go of a lock taken here
    except OSError:  # no lock file (no build took it), or one this process cannot open
        return False


def _try_lock(f) -> bool:
    """Take ``f``'s exclusive lock unless another process holds it; whether it was taken."""
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _cached(path: Path, read: Callable[[Path], Any], build: Callable[[], Any], progress) -> Any:
    """``read(path)`` of a cache file, else ``build()``, which writes it, under ``path``'s build lock:
    a process that finds another building the same file waits and reads what that one wrote (a
    ``build`` that returns None: None, the caller reads the file itself)."""
    cached = _read_cached(path, read, progress)
    if cached is not None:
        return cached
    with _build_lock(path, progress):
        cached = _read_cached(path, read, lambda _: None)  # built meanwhile by another process
        return cached if cached is not None else build()


def _lock_file(path: Path) -> Path:
    """The lock a process holds while it builds the cache file ``path``."""
    return path.with_name(path.stem + ".lock")


@contextlib.contextmanager
def _build_lock(path: Path, progress: Callable[[str], None]) -> Iterator[None]:
    """Hold ``<name>.lock`` beside ``path`` while building it: a process that finds another one
    building the same file (torchrun's ranks, two runs on one cache) says so and waits for it."""
    if fcntl is None:
        yield
        return
    lock = _lock_file(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        if not _try_lock(f):
            progress(f"waiting for another process building {path}")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
