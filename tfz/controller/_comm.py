"""The controller's few collectives over the pipeline group (torch imported on first use).

With ``group=None`` every helper is the identity: one process plays every rank.
"""

from __future__ import annotations

import numpy as np

__all__ = ["Comm"]


class Comm:
    """Collectives of one pipeline process group; tensors live on the device its backend needs."""

    def __init__(self, group):
        self.group = group
        if group is None:
            self.rank, self.size, self._device = 0, 1, None
            return
        import torch
        import torch.distributed as dist

        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        backend = str(dist.get_backend(group)).lower()
        if "gloo" in backend or not torch.cuda.is_available():
            self._device = torch.device("cpu")
        else:
            self._device = torch.device("cuda", torch.cuda.current_device())

    @property
    def distributed(self) -> bool:
        return self.group is not None

    def _tensor(self, array: np.ndarray, dtype):
        import torch

        return torch.from_numpy(np.ascontiguousarray(array, dtype=dtype)).to(self._device)

    def all_reduce_sum(self, array: np.ndarray, dtype=np.float64) -> np.ndarray:
        """Elementwise sum over the group, computed in ``dtype`` (float64 result)."""
        if self.group is None:
            return np.asarray(array, dtype=dtype).astype(np.float64)
        import torch.distributed as dist

        t = self._tensor(array, dtype)
        dist.all_reduce(t, group=self.group)
        return t.cpu().numpy().astype(np.float64)

    def broadcast_from_first(self, array: np.ndarray, dtype=np.float64) -> np.ndarray:
        """Group rank 0's ``array`` on every rank (others pass an array of the same shape)."""
        if self.group is None:
            return np.asarray(array, dtype=dtype).astype(np.float64)
        import torch.distributed as dist

        t = self._tensor(array, dtype)
        dist.broadcast(t, group=self.group, group_src=0)
        return t.cpu().numpy().astype(np.float64)

    def gather_actions(self, local: np.ndarray, names=None) -> np.ndarray:
        """float64 [n] with float32 precision: every rank's action values (NaN where a rank has none),
        combined with a presence mask so each action comes from exactly one rank.

        ``names`` (action names [n]) make errors readable. Raises RuntimeError naming an action that no
        rank or several ranks reported.
        """
        have = ~np.isnan(local)
        packed = np.stack([np.where(have, local, 0.0), have.astype(np.float64)])
        total = self.all_reduce_sum(packed, dtype=np.float32)
        values, count = total[0], total[1]
        bad = np.flatnonzero(count != 1)
        if len(bad):
            i = int(bad[0])
            name = names[i] if names is not None else f"#{i}"
            raise RuntimeError(f"action {name} was reported by {int(count[i])} ranks (expected exactly one)")
        return values
