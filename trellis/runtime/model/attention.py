"""The self-attention block of one decoder layer on one TP rank (its share of the heads)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from trellis.core.model_config import ModelConfig
from trellis.runtime.model.attention_backend import AttentionBackend
from trellis.runtime.model.attention_metadata import AttentionMetadata
from trellis.runtime.model.kv_cache import KVCache
from trellis.runtime.model.linear import QKVParallelLinear, RowParallelLinear
from trellis.runtime.model.parallel import TPGroup


@dataclass(frozen=True)
class StepContext:
    """What every layer of a step shares: the batch layout, the cache, and the rotary angles."""

    meta: AttentionMetadata
    kv_cache: KVCache
    backend: AttentionBackend
    cos: torch.Tensor  # [tokens, head_dim]
    sin: torch.Tensor  # [tokens, head_dim]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, *, tp: TPGroup, dtype: torch.dtype):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.sliding_window = cfg.sliding_windows[layer_idx]
        self.qkv_proj = QKVParallelLinear(
            cfg.hidden_size,
            cfg.head_dim,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            bias=cfg.qkv_bias,
            tp=tp,
            dtype=dtype,
        )
        self.o_proj = RowParallelLinear(
            cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.o_proj_bias, tp=tp, dtype=dtype
        )

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:  # [tokens, hidden] -> same
        tokens = x.shape[0]
        q, k, v = self.qkv_proj.split(self.qkv_proj(x))
        q = q.view(tokens, -1, self.head_dim)  # [tokens, q_heads, head_dim]
        k = k.view(tokens, -1, self.head_dim)  # [tokens, kv_heads, head_dim]
        v = v.view(tokens, -1, self.head_dim)
        kv_cache = ctx.kv_cache.layer(self.layer_idx)
        # The backend rotates q, k (on GPU in the same kernel as the KV-cache write), then attends.
        out = ctx.backend.forward_rotary(
            q, k, v, ctx.cos, ctx.sin, kv_cache, scale=self.scale, sliding_window=self.sliding_window
        )
        return self.o_proj(out.reshape(tokens, -1))
