"""Row-mask bookkeeping shared by the backends: active row runs and active row blocks.

Both are built on the host from the bool mask ``active_rows`` [out] (a device mask costs one
device-to-host copy) and cached per mask tensor, keyed by (device, data_ptr, version counter, shape,
block size). The cache holds a weak reference to the mask and checks it on every hit, so a freed
mask whose memory is reused never matches; an in-place edit of the mask bumps its version counter
and misses. Edits that bypass the version counter (through ``.data`` or a NumPy view) are not seen:
pass a new tensor in that case.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict

import torch

__all__ = ["row_runs", "active_index", "active_row_blocks", "clear_cache"]

_CACHE_SIZE = 64
_cache: OrderedDict[tuple, tuple[weakref.ref, object]] = OrderedDict()


def clear_cache() -> None:
    """Drop every cached run/block list."""
    _cache.clear()
    _all_blocks.clear()


def _cache_key(mask: torch.Tensor, kind: str, extra) -> tuple | None:
    try:
        version = mask._version
    except RuntimeError:  # inference tensors have no version counter: never cache them
        return None
    return (kind, extra, str(mask.device), mask.data_ptr(), version, tuple(mask.shape), tuple(mask.stride()))


def _cached(mask: torch.Tensor, kind: str, extra, build):
    key = _cache_key(mask, kind, extra)
    if key is not None:
        hit = _cache.get(key)
        if hit is not None and hit[0]() is mask:
            _cache.move_to_end(key)
            return hit[1]
    value = build()
    if key is not None:
        _cache[key] = (weakref.ref(mask), value)
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return value


def _host_mask(mask: torch.Tensor) -> torch.Tensor:
    return mask.detach().to("cpu").to(torch.int8)


def row_runs(active_rows: torch.Tensor) -> list[tuple[int, int]]:
    """Maximal runs ``[(start, stop), ...]`` of consecutive True entries of ``active_rows`` [out]."""

    def build():
        m = _host_mask(active_rows)
        edge = torch.diff(m, prepend=m.new_zeros(1), append=m.new_zeros(1))
        starts = (edge == 1).nonzero().flatten().tolist()
        stops = (edge == -1).nonzero().flatten().tolist()
        return list(zip(starts, stops))

    return _cached(active_rows, "runs", None, build)


def active_index(active_rows: torch.Tensor) -> torch.Tensor:
    """Indices (int64, on the mask's device) of the True entries of ``active_rows`` [out]."""
    return _cached(active_rows, "index", None, lambda: active_rows.nonzero().flatten())


_all_blocks: dict[tuple[int, str], torch.Tensor] = {}


def active_row_blocks(
    active_rows: torch.Tensor | None, n_rows: int, block_m: int, device: torch.device
) -> torch.Tensor:
    """Indices (int32 on ``device``) of the row blocks of height ``block_m`` that hold an active row.

    ``active_rows`` [n_rows] bool, or None for "every row active" (then all ``cdiv(n_rows, block_m)``
    blocks).
    """
    n_blocks = -(-n_rows // block_m)
    if active_rows is None:
        key = (n_blocks, str(device))
        if key not in _all_blocks:
            _all_blocks[key] = torch.arange(n_blocks, dtype=torch.int32, device=device)
        return _all_blocks[key]

    def build():
        m = _host_mask(active_rows)
        padded = torch.zeros(n_blocks * block_m, dtype=torch.int8)
        padded[:n_rows] = m
        blocks = padded.view(n_blocks, block_m).any(dim=1).nonzero().flatten().to(torch.int32)
        return blocks.to(device)

    return _cached(active_rows, "blocks", (block_m, str(device)), build)
