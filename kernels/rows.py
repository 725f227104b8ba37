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

from tfz._validate import check_int, short_repr

__all__ = ["ActiveRows", "GPU_BLOCKS", "as_device", "host_copy", "parse_device"]

GPU_BLOCKS = (64, 128)
"""Row-block heights whose lists are built with every mask (the Triton kernel's BLOCK_M choices)."""
_ALIGN = 16
"""Byte alignment of every uploaded field: the pointers the kernels are specialised (and compiled
ahead of time, ``kernels/aot.py``) for carry ``tt.divisibility=16``."""


def host_copy(mask: torch.Tensor, name: str) -> np.ndarray:
    """``mask`` (a tensor) as a numpy array: a view of a CPU tensor, one copy from a device tensor;
    a meta tensor, which holds no values, is refused naming ``name``."""
    if mask.device.type == "meta":
        raise ValueError(
            f"{name} is on the meta device, which holds no values: build the mask on the CPU or the "
            f"training device (shape {tuple(mask.shape)}, dtype {mask.dtype})"
        )
    return mask.detach().cpu().numpy()


def parse_device(device, name: str = "device") -> torch.device:
    """``device`` (a torch.device, a device string or a CUDA index) as a torch.device; ValueError
    naming it when torch cannot read it."""
    if isinstance(device, torch.device):
        return device
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"{name} must be a torch.device or a device string such as 'cpu' or 'cuda:0', "
            f"got {short_repr(device)}"
        ) from None


def as_device(device, name: str = "device") -> torch.device:
    """``device`` as a torch.device that can hold tensors here ("cuda" means the current CUDA
    device); ValueError naming it otherwise."""
    device = parse_device(device, name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name} {device} was given, but torch.cuda.is_available() is False")
        if device.index is None:
            return torch.device("cuda", torch.cuda.current_device())
    return device


def _host_bool(mask) -> np.ndarray:
    """A 1-D numpy bool copy-free view (numpy, CPU tensor) or host copy (device tensor) of ``mask``."""
    if isinstance(mask, torch.Tensor):
        if mask.dtype != torch.bool or mask.dim() != 1:
            raise TypeError(
                f"active_rows must be a 1-D bool tensor, got dtype {mask.dtype}, shape {tuple(mask.shape)}"
            )
        return host_copy(mask, "active_rows")
    if isinstance(mask, np.ndarray):
        if mask.dtype != np.bool_ or mask.ndim != 1:
            raise TypeError(
                f"active_rows must be a 1-D bool array, got dtype {mask.dtype}, shape {mask.shape}"
            )
        return mask
    raise TypeError(
        f"active_rows must be a bool tensor, a bool numpy array or ActiveRows, got {type(mask).__name__}"
    )


def _blocks(host: np.ndarray, block: int) -> np.ndarray:
    n_blocks = -(-host.size // block)
    padded = np.zeros(n_blocks * block, dtype=bool)
    padded[: host.size] = host
    return np.flatnonzero(padded.reshape(n_blocks, block).any(axis=1)).astype(np.int32)


def _runs(flat: np.ndarray, index: np.ndarray, bounds: np.ndarray, sizes: np.ndarray):
    """(starts, stops, cuts) of the maximal runs of active rows of masks concatenated in ``flat``
    (``index``: its active rows; mask i spans ``bounds[i]:bounds[i + 1]``): a run starts at an active
    row whose row before, in the same mask, is inactive; mask i's runs are ``cuts[i]:cuts[i + 1]``."""
    before, after = np.zeros_like(flat), np.zeros_like(flat)
    before[1:], after[:-1] = flat[:-1], flat[1:]
    before[bounds[:-1][sizes > 0]] = False
    after[bounds[1:][sizes > 0] - 1] = False
    starts, stops = index[~before[index]], index[~after[index]] + 1
    return starts, stops, np.searchsorted(starts, bounds)


def _block_lists(flat, hosts, bounds, sizes, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(int32 block indices, each local to its mask, concatenated; cuts per mask) of the ``block``-row
    blocks holding an active row."""
    if not (sizes % block).any():  # every mask a whole number of blocks: one reshape for all
        found = np.flatnonzero(flat.reshape(-1, block).any(axis=1))
        cuts = np.searchsorted(found, bounds // block)
        return (found - np.repeat(bounds[:-1] // block, np.diff(cuts))).astype(np.int32), cuts
    per_mask = [_blocks(h, block) for h in hosts]
    cuts = np.zeros(len(hosts) + 1, dtype=np.int64)
    np.cumsum([b.size for b in per_mask], out=cuts[1:])
    return (np.concatenate(per_mask) if per_mask else np.zeros(0, dtype=np.int32)), cuts


def _aligned(values: np.ndarray, cuts: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """``values`` with each segment ``[cuts[i], cuts[i + 1])`` moved to start on an ``_ALIGN``-byte
    boundary (zeros in between), and the segments' new starts."""
    per = _ALIGN // values.itemsize
    lengths = np.diff(cuts)
    starts = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(-(-lengths // per) * per, out=starts[1:])
    out = np.zeros(starts[-1], dtype=values.dtype)
    out[np.arange(values.size) + np.repeat(starts[:-1] - cuts[:-1], lengths)] = values
    return out, starts[:-1].tolist()


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
        (built,) = ActiveRows._build([host], as_device(device))
        for name in ActiveRows.__slots__:
            setattr(self, name, getattr(built, name))

    @classmethod
    def build_many(cls, masks: Sequence, device) -> list[ActiveRows]:
        """One :class:`ActiveRows` per mask, all on ``device``, with a single upload."""
        if isinstance(masks, (np.ndarray, torch.Tensor)):
            raise TypeError(f"masks must be a sequence of masks, got one {type(masks).__name__}")
        return cls._build([_host_bool(m) for m in masks], as_device(device))

    @classmethod
    def _build(
        cls, hosts: list[np.ndarray], device: torch.device, align: bool | None = None
    ) -> list[ActiveRows]:
        """Every mask's fields from one concatenation of ``hosts`` (vectorised across masks), uploaded
        as four tensors (masks, indices, and the two block lists) that each mask's fields slice. With
        ``align`` (default: off the CPU, where kernels read these pointers) each slice starts on a
        16-byte boundary."""
        if align is None:
            align = device.type != "cpu"
        flat = np.concatenate(hosts) if hosts else np.zeros(0, dtype=bool)  # also the owned host copies
        sizes = np.fromiter((h.size for h in hosts), dtype=np.int64, count=len(hosts))
        bounds = np.zeros(len(hosts) + 1, dtype=np.int64)
        np.cumsum(sizes, out=bounds[1:])
        index = np.flatnonzero(flat)
        cuts = np.searchsorted(index, bounds)
        local = index - np.repeat(bounds[:-1], np.diff(cuts))
        starts, stops, run_cuts = _runs(flat, index, bounds, sizes)
        blocks = {b: _block_lists(flat, hosts, bounds, sizes, b) for b in GPU_BLOCKS}
        parts = [(flat, bounds), (local, cuts), *blocks.values()]
        laid = [_aligned(v, c) if align else (v, c[:-1].tolist()) for v, c in parts]
        mask_t, index_t, *block_t = _upload([values for values, _ in laid], device)
        mask_at, index_at, *block_at = [at for _, at in laid]
        out, lo, hi = [], bounds[:-1].tolist(), bounds[1:].tolist()
        cut, run_cut = cuts.tolist(), run_cuts.tolist()
        run_base = np.repeat(bounds[:-1], np.diff(run_cuts))
        run_lo, run_hi = (starts - run_base).tolist(), (stops - run_base).tolist()
        bcut = {b: c.tolist() for b, (_, c) in blocks.items()}
        for i in range(len(hosts)):
            rows = cls.__new__(cls)
            rows._host = flat[lo[i] : hi[i]]
            rows.n_rows = hi[i] - lo[i]
            rows.n_active = cut[i + 1] - cut[i]
            rows.runs = list(zip(run_lo[run_cut[i] : run_cut[i + 1]], run_hi[run_cut[i] : run_cut[i + 1]]))
            rows.device = device
            rows.mask = mask_t[mask_at[i] : mask_at[i] + rows.n_rows]
            rows.mask_bytes = rows.mask.view(torch.uint8)
            rows.index = index_t[index_at[i] : index_at[i] + rows.n_active]
            rows._counts = {b: bcut[b][i + 1] - bcut[b][i] for b in GPU_BLOCKS}
            rows._blocks = {
                b: t[at[i] : at[i] + rows._counts[b]] for b, t, at in zip(GPU_BLOCKS, block_t, block_at)
            }
            out.append(rows)
        cls.builds += len(out)
        return out

    def blocks(self, block: int) -> torch.Tensor:
        """int32 indices (on ``device``) of the ``block``-row blocks holding an active row."""
        found = self._blocks.get(block)
        if found is None:
            block = check_int("block", block, 1)
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
        device = as_device(device)
        return self if device == self.device else ActiveRows(self._host, device)

    @property
    def host(self) -> np.ndarray:
        """The mask as a numpy bool array (a copy owned by this object; do not modify)."""
        return self._host

    def __repr__(self) -> str:
        return (
            f"ActiveRows({self.n_active}/{self.n_rows} active, {len(self.runs)} runs, device={self.device})"
        )
