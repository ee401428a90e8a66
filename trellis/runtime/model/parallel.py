"""The tensor-parallel group of one stage: the collectives its layers need, nothing else.

The group is the default torch.distributed world of the stage's processes (gloo on CPU, NCCL on
GPU) or a given subgroup. With one rank every collective is the identity, so a single process
needs no torch.distributed at all.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class TPGroup:
    def __init__(self, rank: int, size: int, group: dist.ProcessGroup | None = None) -> None:
        if not 0 <= rank < size:
            raise ValueError(f"TP rank {rank} is outside a group of size {size}")
        self.rank = rank
        self.size = size
        self.group = group  # None: the default world
        self.one_shot = None  # OneShotAllReduce for small tensors on GPU (see enable_one_shot)

    def enable_one_shot(self, device: torch.device, max_bytes: int) -> bool:
        """Small all-reduces (decode) over peer memory instead of NCCL; False where unavailable."""
        from trellis.runtime.model.custom_allreduce import OneShotAllReduce

        if self.size > 1 and max_bytes > 0:
            self.one_shot = OneShotAllReduce.create(
                self.group or dist.group.WORLD, max_bytes=max_bytes, device=device
            )
        return self.one_shot is not None

    @classmethod
    def single(cls) -> TPGroup:
        return cls(0, 1)

    @classmethod
    def from_world(cls) -> TPGroup:
        """The whole initialized torch.distributed world as one TP group."""
        return cls(dist.get_rank(), dist.get_world_size())

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the group (in place with NCCL/gloo; use the returned tensor)."""
        if self.size > 1:
            if self.one_shot is not None and self.one_shot.fits(t):
                return self.one_shot(t)
            dist.all_reduce(t, group=self.group)
        return t

    def all_gather(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's ``t`` along ``dim``, in rank order."""
        if self.size == 1:
            return t
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t, group=self.group)
        return torch.cat(parts, dim=dim)

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrite ``t`` on every rank with group rank ``src``'s copy, in place."""
        if self.size > 1:
            global_src = src if self.group is None else dist.get_global_rank(self.group, src)
            dist.broadcast(t, src=global_src, group=self.group)
        return t

    def __repr__(self) -> str:
        return f"TPGroup(rank={self.rank}, size={self.size})"
