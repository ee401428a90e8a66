"""Tensor-parallel linear layers that own their sharding.

Each parameter carries a ``weight_loader(param, loaded, shard_id=None)`` that copies only this
rank's part of a checkpoint tensor (a safetensors slice or a tensor). Column-parallel layers split
the output features and leave their output sharded; the row-parallel layer splits the input
features and all-reduces, so a column -> row pair costs one all-reduce.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from trellis.runtime.model.parallel import TPGroup
from trellis.runtime.model.weights import Loadable, copy_checked, read_all, read_cols, read_rows


def make_param(shape: Sequence[int], dtype: torch.dtype, loader: Callable[..., None]) -> nn.Parameter:
    """An inference-only parameter (on the current default device) with its weight loader attached.

    Loaders capture plain numbers, never the module: a module -> param -> module cycle would keep
    (GPU) memory alive until the cyclic garbage collector happens to run.
    """
    param = nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)
    param.weight_loader = loader  # type: ignore[attr-defined]
    return param


def load_whole(param: nn.Parameter, loaded: Loadable, shard_id: object = None) -> None:
    copy_checked(param.data, read_all(loaded))


def load_row_shard(param: nn.Parameter, loaded: Loadable, shard_id: object = None, *, rank: int) -> None:
    """Rank r takes rows [r * n, (r + 1) * n) where n is the local size."""
    rows = param.shape[0]
    copy_checked(param.data, read_rows(loaded, rank * rows, (rank + 1) * rows))


def load_column_shard(param: nn.Parameter, loaded: Loadable, shard_id: object = None, *, rank: int) -> None:
    cols = param.shape[1]
    copy_checked(param.data, read_cols(loaded, rank * cols, (rank + 1) * cols))


def load_stacked_rows(
    param: nn.Parameter, loaded: Loadable, shard_id: object = None, *, rank: int, local_sizes: tuple[int, ...]
) -> None:
    """Stacked projection ``shard_id`` (0, 1, ...): this rank's rows of it, at its offset in the param."""
    assert isinstance(shard_id, int)
    size = local_sizes[shard_id]
    offset = sum(local_sizes[:shard_id])
    copy_checked(param.data[offset : offset + size], read_rows(loaded, rank * size, (rank + 1) * size))


def load_qkv(
    param: nn.Parameter,
    loaded: Loadable,
    shard_id: object = None,
    *,
    rank: int,
    q_size: int,
    kv_size: int,
    kv_row_start: int,
) -> None:
    if shard_id == "q":
        offset, size, start = 0, q_size, rank * q_size
    elif shard_id in ("k", "v"):
        offset = q_size if shard_id == "k" else q_size + kv_size
        size, start = kv_size, kv_row_start
    else:
        raise ValueError(f"QKV shard id must be 'q', 'k' or 'v', got {shard_id!r}")
    copy_checked(param.data[offset : offset + size], read_rows(loaded, start, start + size))


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W split by output rows: [tokens, in] -> [tokens, out / tp]."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool,
        tp: TPGroup,
        dtype: torch.dtype,
        loader: Callable[..., None] | None = None,
    ):
        super().__init__()
        self.out_local = out_features // tp.size
        loader = loader or partial(load_row_shard, rank=tp.rank)
        self.weight = make_param((self.out_local, in_features), dtype, loader)
        self.bias = make_param((self.out_local,), dtype, loader) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input stacked into one matmul (gate_up).

    Checkpoint tensor ``shard_id`` (0, 1, ...) lands at its own offset of the local output.
    """

    def __init__(
        self, in_features: int, out_sizes: Sequence[int], *, bias: bool, tp: TPGroup, dtype: torch.dtype
    ):
        local_sizes = tuple(size // tp.size for size in out_sizes)
        loader = partial(load_stacked_rows, rank=tp.rank, local_sizes=local_sizes)
        super().__init__(in_features, sum(out_sizes), bias=bias, tp=tp, dtype=dtype, loader=loader)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matmul: [tokens, hidden] -> [tokens, (q_local + 2 kv_local) * head_dim].

    When there are fewer kv heads than ranks, each rank holds the one kv head its q heads use,
    so kv heads are replicated over ``tp / num_kv_heads`` ranks.
    """

    def __init__(
        self,
        hidden: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        *,
        bias: bool,
        tp: TPGroup,
        dtype: torch.dtype,
    ):
        kv_heads = max(1, num_kv_heads // tp.size)
        replicas = max(1, tp.size // num_kv_heads)
        kv_head_start = (tp.rank // replicas) * kv_heads
        self.q_size = num_heads // tp.size * head_dim
        self.kv_size = kv_heads * head_dim
        loader = partial(
            load_qkv,
            rank=tp.rank,
            q_size=self.q_size,
            kv_size=self.kv_size,
            kv_row_start=kv_head_start * head_dim,
        )
        out_local = self.q_size + 2 * self.kv_size
        super().__init__(hidden, out_local * tp.size, bias=bias, tp=tp, dtype=dtype, loader=loader)

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_shard W_shard^T) + b, W split by input columns: [tokens, in / tp] -> [tokens, out]."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, tp: TPGroup, dtype: torch.dtype):
        super().__init__()
        self.tp = tp
        in_local = in_features // tp.size
        self.weight = make_param((out_features, in_local), dtype, partial(load_column_shard, rank=tp.rank))
        # The bias is whole on every rank and added once, after the reduction.
        self.bias = make_param((out_features,), dtype, load_whole) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce(F.linear(x, self.weight))
        return y + self.bias if self.bias is not None else y
