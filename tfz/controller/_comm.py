"""The controller's few collectives over the pipeline group (torch imported on first use).

With ``group=None`` every helper is the identity: one process plays every rank. With a
``replica_group`` (the ranks holding the same pipeline rank in each data-parallel replica), every
result is made the same on all replicas: sums are averaged over the replicas and broadcasts come from
replica 0, so the replicas measure, decide and plan as one.
"""

from __future__ import annotations

import numpy as np

__all__ = ["Comm"]


class Comm:
    """Collectives of one pipeline process group; tensors live on the device its backend needs."""

    def __init__(self, group, replica_group=None):
        self.group = group
        self.replica_group = replica_group
        self.replicas, self.replica = 1, 0
        if group is None:
            if replica_group is not None:
                raise ValueError("replica_group needs a pipeline group (group=None was given)")
            self.rank, self.size, self._device = 0, 1, None
            return
        import torch
        import torch.distributed as dist

        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        if replica_group is not None:
            self.replica = dist.get_rank(replica_group)
            self.replicas = dist.get_world_size(replica_group)
            if self.replica < 0:
                raise ValueError("this process is not a member of replica_group")
        backend = str(dist.get_backend(group)).lower()
        if "gloo" in backend or not torch.cuda.is_available():
            self._device = torch.device("cpu")
        else:
            self._device = torch.device("cuda", torch.cuda.current_device())

    @property
    def distributed(self) -> bool:
        return self.group is not None

    @property
    def leader(self) -> bool:
        """Pipeline rank 0 of replica 0: the one process that solves."""
        return self.rank == 0 and self.replica == 0

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
        if self.replica_group is not None:
            dist.all_reduce(t, group=self.replica_group)
            t /= self.replicas
        return t.cpu().numpy().astype(np.float64)

    def broadcast_from_first(self, array: np.ndarray, dtype=np.float64) -> np.ndarray:
        """Group rank 0's ``array`` on every rank (others pass an array of the same shape)."""
        if self.group is None:
            return np.asarray(array, dtype=dtype).astype(np.float64)
        import torch.distributed as dist

        t = self._tensor(array, dtype)
        dist.broadcast(t, group=self.group, group_src=0)
        if self.replica_group is not None:
            dist.broadcast(t, group=self.replica_group, group_src=0)
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
