"""The paged KV cache of one stage on one rank: per layer, K and V of shape
[num_blocks, block_size, kv_heads_local, head_dim]. A sequence's block table maps its positions to
slots: the token at position p lives at slot ``table[p // block_size] * block_size + p % block_size``.

Every layer's K and V are views of ONE tensor ``data`` of shape
[layers, 2, num_blocks, block_size, kv_heads_local, head_dim], so a request's blocks for every
layer are gathered (or scattered) in one indexing operation over dim 2 (trellis/runtime/kv_copy.py),
not a loop over layers or blocks; each layer's K (or V) is still one contiguous tensor for the kernels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from trellis.core.model_config import ModelConfig


def kv_cache_bytes_per_block(
    cfg: ModelConfig, layers: tuple[int, int], tp: int, block_size: int, dtype: torch.dtype
) -> int:
    """Bytes one block costs on one rank: K and V, for every layer of the stage."""
    num_layers = layers[1] - layers[0]
    per_layer = 2 * block_size * cfg.kv_heads_per_rank(tp) * cfg.head_dim * dtype.itemsize
    return num_layers * per_layer


def slot_of(table: Sequence[int], position: int, block_size: int) -> int:
    return table[position // block_size] * block_size + position % block_size


class KVCache:
    def __init__(
        self,
        cfg: ModelConfig,
        *,
        layers: tuple[int, int],
        tp: int,
        block_size: int,
        num_blocks: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        self.first_layer = layers[0]
        self.block_size = block_size
        self.num_blocks = num_blocks
        count = layers[1] - layers[0]
        shape = (count, 2, num_blocks, block_size, cfg.kv_heads_per_rank(tp), cfg.head_dim)
        self.data = torch.zeros(shape, dtype=dtype, device=device)
        self.k = [self.data[i, 0] for i in range(count)]
        self.v = [self.data[i, 1] for i in range(count)]

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V caches of a layer, by its global index."""
        i = layer_idx - self.first_layer
        return self.k[i], self.v[i]
