"""Start-up tuning of the Triton wgrad kernel (``tfz.kernels.tune``): measured once, never in a step.

Without tuning every launch takes its config from ``tfz.kernels.configs.TABLE``. :func:`tune` times
the table's configs for the (dtype class, shape bucket, BLOCK_M) keys that a model's layer shapes use,
on the current GPU, on scratch tensors (never on a real ``main_grad``: nothing is cloned), and makes
the fastest the config of its key for the rest of the process. The natural place to call it is before
training or in a controller's warm-up, outside any timed step. A JSON ``cache`` file keeps the results
per GPU name and triton version, so a restart reads them instead of measuring again.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from tfz._validate import check_int

from . import configs
from .configs import WgradConfig

__all__ = ["load_cache", "tune"]

CACHE_FORMAT = "tfz-wgrad-tuning"
CACHE_VERSION = 1
_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def _shapes(shapes: Iterable) -> list[tuple[int, int, int]]:
    out = []
    for i, shape in enumerate(shapes):
        if not isinstance(shape, (tuple, list)) or len(shape) != 3:
            raise ValueError(f"shapes[{i}] must be (tokens, out_features, in_features), got {shape!r}")
        out.append(tuple(check_int(f"shapes[{i}][{j}]", v, 1) for j, v in enumerate(shape)))
    if not out:
        raise ValueError("shapes is empty: give the (tokens, out_features, in_features) of the layers")
    return out


def _entry_key(entry: dict, where: str) -> tuple:
    try:
        key = (
            str(entry["device"]),
            tuple(int(v) for v in entry["capability"]),
            str(entry["dtype_class"]),
            str(entry["bucket"]),
            int(entry["block_m"]),
        )
        cfg = WgradConfig(**entry["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{where}: bad entry {entry!r} ({exc})") from None
    if len(key[1]) != 2 or cfg.block_m != key[4] or cfg.split_k != 1:
        raise ValueError(f"{where}: bad entry {entry!r} (config does not match its key)")
    return key


def load_cache(path: str | os.PathLike) -> list[dict]:
    """The entries of a tuning cache file (validated; ValueError naming the file otherwise)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"tuning cache {path} cannot be read: {exc}") from None
    if (
        not isinstance(data, dict)
        or data.get("format") != CACHE_FORMAT
        or data.get("version") != CACHE_VERSION
    ):
        raise ValueError(f"tuning cache {path}: not a {CACHE_FORMAT} file of version {CACHE_VERSION}")
    entries = data.get("entries")
    if not isinstance(entries, list):
        raise ValueError(f"tuning cache {path}: 'entries' must be a list")
    for entry in entries:
        if not isinstance(entry, dict):
            raise ValueError(f"tuning cache {path}: bad entry {entry!r}")
        _entry_key(entry, f"tuning cache {path}")
    return entries


def _write_cache(path: Path, entries: list[dict]) -> None:
    text = json.dumps({"format": CACHE_FORMAT, "version": CACHE_VERSION, "entries": entries}, indent=1)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _default_bench(fn: Callable[[], object]) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))


def _fastest(pool, shape, dtype, device, bench) -> tuple[float, WgradConfig]:
    """(ms, config) of the fastest of ``pool`` on scratch operands of ``shape`` (all rows active)."""
    from ._wgrad_triton import wgrad_triton

    tokens, n_out, n_in = shape
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(tokens, n_in, generator=g, device=device).to(dtype)
    dy = torch.randn(tokens, n_out, generator=g, device=device).to(dtype)
    scratch = torch.zeros(n_out, n_in, device=device)
    timings = []
    for cfg in pool:
        run = lambda cfg=cfg: wgrad_triton(x, dy, scratch, None, True, None, True, config=cfg)
        timings.append((float(bench(run)), cfg))
    return min(timings, key=lambda item: item[0])


def tune(
    shapes: Iterable,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device=None,
    cache: str | os.PathLike | None = None,
    bench: Callable[[Callable[[], object]], float] | None = None,
    candidates: Iterable[WgradConfig] | None = None,
) -> dict[tuple, WgradConfig]:
    """Measure the Triton wgrad configs for these layer shapes on this device; returns {key: config}.

    Args:
        shapes: (tokens, out_features, in_features) of the layers (one per distinct shape is enough).
        dtype: operand dtype: bfloat16, float16, or float32 (TF32; needs
            ``torch.backends.cuda.matmul.allow_tf32``, else fp32 runs on cuBLAS and there is nothing to tune).
        device: a CUDA device (default: the current one); CPU tensors only under ``TRITON_INTERPRET=1``
            (tests), where ``bench`` must be given.
        cache: JSON file: entries of this GPU and triton version are used instead of measuring; new
            measurements are added (other entries are kept).
        bench: ``bench(fn) -> ms``; default ``triton.testing.do_bench`` (CUDA events, median).
        candidates: configs to try for every key (default: the table's configs of the device's family
            and dtype class with that BLOCK_M, which the ahead-of-time check compiles).

    A key is (GPU name, capability, dtype class, shape bucket, BLOCK_M); both BLOCK_M choices are
    measured for every shape. Nothing changes when the cache cannot be read.
    """
    import triton

    from . import _wgrad_triton as launcher

    todo = _shapes(shapes)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {list(_DTYPES.values())}, got {dtype}")
    device = torch.device(device if device is not None else "cuda")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type != "cuda" and not launcher.INTERPRET:
        raise ValueError(f"tune needs a CUDA device (or TRITON_INTERPRET=1 for CPU tensors), got {device}")
    if dtype == torch.float32 and device.type == "cuda" and not torch.backends.cuda.matmul.allow_tf32:
        raise ValueError("fp32 operands run on cuBLAS while torch.backends.cuda.matmul.allow_tf32 is False")
    if bench is None:
        if device.type != "cuda":
            raise ValueError("on CPU tensors (interpreter) tune needs a bench function")
        bench = _default_bench
    info = launcher.device_info(device)
    dclass = configs.dtype_class(_DTYPES[dtype])
    path = None if cache is None else Path(cache)
    stored = load_cache(path) if path is not None and path.exists() else []
    mine = [e for e in stored if e.get("triton") == triton.__version__]
    known = {_entry_key(e, str(path)): WgradConfig(**e["config"]) for e in mine}
    launcher.tuned.update({k: v for k, v in known.items() if k[:2] == (info.name, info.capability)})

    found: dict[tuple, WgradConfig] = {}
    new_entries = []
    element = torch.empty(0, dtype=dtype).element_size()
    for tokens, n_out, n_in in todo:
        for block_m in configs.BLOCK_M_CHOICES:
            key = launcher.tuned_key(info, dclass, n_in, block_m)
            if key in launcher.tuned:
                found[key] = launcher.tuned[key]
                continue
            pool = list(candidates) if candidates is not None else configs.table_configs(info.family, dclass)
            pool = [
                c
                for c in pool
                if c.block_m == block_m
                and c.split_k == 1
                and c.shared_bytes(element) <= info.shared_per_block
            ]
            if not pool:
                continue
            ms, best = _fastest(pool, (tokens, n_out, n_in), dtype, device, bench)
            launcher.tuned[key] = found[key] = best
            new_entries.append(
                {
                    "device": key[0],
                    "capability": list(key[1]),
                    "dtype_class": key[2],
                    "bucket": key[3],
                    "block_m": key[4],
                    "config": best.as_dict(),
                    "ms": ms,
                    "shape": [tokens, n_out, n_in],
                    "triton": triton.__version__,
                }
            )
    launcher.clear_picks()
    if path is not None and new_entries:
        _write_cache(path, stored + new_entries)
    return found
