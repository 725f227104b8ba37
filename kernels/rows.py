"""Prepared row masks of the masked weight gradient: built once per mask, never inside a dW call.

:class:`ActiveRows` holds what a masked dW needs about its mask, computed on the host from the
mask's host copy when the mask is made (tfz.masks draws masks as numpy arrays at a decision step):

- ``n_active`` and ``runs`` (maximal runs of consecutive active rows, for the torch backend), on the
  host;
- on the mask's device: the bool mask, the int64 indices of the active rows (gathered torch path) and
  the int32 lists of the 64- and 128-row blocks holding an active row (the Triton launch grid).

The device tensors are uploaded together, in one copy from pinned memory that does not wait for the
device (no synchronisation). A dW call then only reads these fields: no device-to-host copy, no
index build. Building from a CUDA tensor costs one device-to-host copy, once; build from a host mask
(numpy array or CPU tensor) to avoid it. ``ActiveRows.builds`` counts builds (tests check that a
training step makes none beyond the masks it draws).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["ActiveRows", "GPU_BLOCKS"]

GPU_BLOCKS = (64, 128)
"""Row-block heights whose lists are built with every mask (the Triton kernel's BLOCK_M choices)."""
_ALIGN = 8


def _host_bool(mask) -> np.ndarray:
    """A 1-D numpy bool copy-free view (numpy, CPU tensor) or host copy (device tensor) of ``mask``."""
    if isinstance(mask, torch.Tensor):
        if mask.dtype != torch.bool or mask.dim() != 1:
            raise TypeError(
                f"active_rows must be a 1-D bool tensor, got dtype {mask.dtype}, shape {tuple(mask.shape)}"
            )
        return mask.detach().cpu().numpy()
    if isinstance(mask, np.ndarray):
        if mask.dtype != np.bool_ or mask.ndim != 1:
            raise TypeError(
                f"active_rows must be a 1-D bool array, got dtype {mask.dtype}, shape {mask.shape}"
            )
        return mask
    raise TypeError(
        f"active_rows must be a bool tensor, a bool numpy array or ActiveRows, got {type(mask).__name__}"
    )


def _device(device) -> torch.device:
    """``device`` as a torch.device with its index ("cuda" means the current CUDA device)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _blocks(host: np.ndarray, block: int) -> np.ndarray:
    n_blocks = -(-host.size // block)
    padded = np.zeros(n_blocks * block, dtype=bool)
    padded[: host.size] = host
    return np.flatnonzero(padded.reshape(n_blocks, block).any(axis=1)).astype(np.int32)


def _upload(parts: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """``parts`` as tensors on ``device``, from one buffer: one pinned, non-blocking copy on CUDA."""
    offsets, size = [], 0
    for p in parts:
        offsets.append(size)
        size += -(-p.nbytes // _ALIGN) * _ALIGN
    buf = np.zeros(max(size, _ALIGN), dtype=np.uint8)
    for p, off in zip(parts, offsets):
        buf[off : off + p.nbytes] = p.view(np.uint8)
    host = torch.from_numpy(buf)
    if device.type == "cpu":
        flat = host
    else:
        staged = torch.empty(host.shape, dtype=torch.uint8, pin_memory=device.type == "cuda")
        staged.copy_(host)
        flat = staged.to(device, non_blocking=True)
    dtypes = {np.bool_: torch.bool, np.int64: torch.int64, np.int32: torch.int32}
    return [flat[off : off + p.nbytes].view(dtypes[p.dtype.type]) for p, off in zip(parts, offsets)]


class ActiveRows:
    """A row mask [n_rows] (True = the row of W trains) prepared for :func:`tfz.kernels.wgrad`.

    Build with ``ActiveRows(mask, device)`` (``mask``: numpy bool array, or bool tensor; ``device``
    default: the tensor's, or CPU), or many at once with :meth:`build_many` (one upload). Fields:
    ``n_rows``, ``n_active``, ``runs`` (host list of ``(start, stop)``), ``device``, ``mask`` (bool
    tensor), ``mask_bytes`` (the same memory as uint8, for kernels), ``index`` (int64 tensor of the
    active rows); :meth:`blocks` / :meth:`n_blocks` give the active row-block list / count for a
    block height.
    """

    __slots__ = (
        "n_rows",
        "n_active",
        "runs",
        "device",
        "mask",
        "mask_bytes",
        "index",
        "_host",
        "_blocks",
        "_counts",
    )
    builds = 0
    """Number of index builds in this process (constructions and extra block heights)."""

    def __init__(self, mask, device=None):
        host = _host_bool(mask)
        if device is None:
            device = mask.device if isinstance(mask, torch.Tensor) else torch.device("cpu")
        (built,) = ActiveRows._build([host], _device(device))
        for name in ActiveRows.__slots__:
            setattr(self, name, getattr(built, name))

    @classmethod
    def build_many(cls, masks: Sequence, device) -> list[ActiveRows]:
        """One :class:`ActiveRows` per mask, all on ``device``, with a single upload."""
        return cls._build([_host_bool(m) for m in masks], _device(device))

    @classmethod
    def _build(cls, hosts: list[np.ndarray], device: torch.device) -> list[ActiveRows]:
        out, parts = [], []
        for host in hosts:
            rows = cls.__new__(cls)
            rows._host = host.copy()
            rows.n_rows = int(host.size)
            index = np.flatnonzero(host)
            rows.n_active = int(index.size)
            edges = np.diff(np.concatenate(([False], host, [False])).astype(np.int8))
            rows.runs = list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))
            rows.device = device
            blocks = {b: _blocks(host, b) for b in GPU_BLOCKS}
            rows._counts = {b: int(v.size) for b, v in blocks.items()}
            parts += [rows._host, index.astype(np.int64), *blocks.values()]
            out.append(rows)
        tensors = _upload(parts, device)
        per = 2 + len(GPU_BLOCKS)
        for i, rows in enumerate(out):
            mask, index, *blocks = tensors[i * per : (i + 1) * per]
            rows.mask, rows.mask_bytes, rows.index = mask, mask.view(torch.uint8), index
            rows._blocks = dict(zip(GPU_BLOCKS, blocks))
        cls.builds += len(out)
        return out

    def blocks(self, block: int) -> torch.Tensor:
        """int32 indices (on ``device``) of the ``block``-row blocks holding an active row."""
        found = self._blocks.get(block)
        if found is None:  # a block height other than the GPU ones (interpreter tests): built once
            host = _blocks(self._host, block)
            (found,) = _upload([host], self.device)
            self._blocks[block], self._counts[block] = found, int(host.size)
            ActiveRows.builds += 1
        return found

    def n_blocks(self, block: int) -> int:
        """How many ``block``-row blocks hold an active row (host value, no device access)."""
        if block not in self._counts:
            self.blocks(block)
        return self._counts[block]

    def to(self, device) -> ActiveRows:
        """The same mask prepared on ``device`` (``self`` when already there)."""
        device = _device(device)
        return self if device == self.device else ActiveRows(self._host, device)

    @property
    def host(self) -> np.ndarray:
        """The mask as a numpy bool array (a copy owned by this object; do not modify)."""
        return self._host

    def __repr__(self) -> str:
        return (
            f"ActiveRows({self.n_active}/{self.n_rows} active, {len(self.runs)} runs, device={self.device})"
        )
