"""How attention reads and writes the paged KV cache, behind a small interface.

``TorchReferenceBackend`` is the plain PyTorch path: the reference on CPU, one SDPA call per sequence.
A fast GPU backend (paged decode kernel, CUDA graphs) implements the same two methods.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from services.stage_worker.model.attention_metadata import AttentionMetadata


class AttentionBackend(Protocol):
    def begin_step(self, meta: AttentionMetadata) -> None:
        """Called once per step before the first layer: precompute what every layer shares."""
        ...

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        *,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        """Store this step's k, v [tokens, kv_heads, head_dim] in the cache, then attend with q
        [tokens, q_heads, head_dim] causally over each sequence's cached keys.
        Returns [tokens, q_heads, head_dim]."""
        ...


class TorchReferenceBackend:
    def __init__(self) -> None:
        self._meta: AttentionMetadata | None = None
        self._key_slots: list[torch.Tensor] = []  # per sequence: [context] cache slots of its keys
        self._distance: list[torch.Tensor] = []  # per sequence: [queries, context] query pos - key pos

    def begin_step(self, meta: AttentionMetadata) -> None:
        self._meta = meta
        self._key_slots, self._distance = [], []
        device = meta.block_tables.device
        offsets = torch.arange(meta.block_size, device=device)
        for i, (start, n) in enumerate(zip(meta.start_positions, meta.query_lens, strict=True)):
            context = start + n
            blocks = meta.block_tables[i, : -(-context // meta.block_size)].long()
            self._key_slots.append((blocks[:, None] * meta.block_size + offsets).flatten()[:context])
            query_pos = torch.arange(start, context, device=device)
            self._distance.append(query_pos[:, None] - torch.arange(context, device=device)[None, :])

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        *,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        meta = self._meta
        assert meta is not None, "begin_step must be called before forward"
        k_cache, v_cache = (c.view(-1, *c.shape[2:]) for c in kv_cache)  # [slots, kv_heads, head_dim]
        k_cache.index_copy_(0, meta.slot_mapping, k)
        v_cache.index_copy_(0, meta.slot_mapping, v)
        out = torch.empty_like(q)
        row = 0
        for slots, distance, n in zip(self._key_slots, self._distance, meta.query_lens, strict=True):
            allowed = distance >= 0  # causal: a query sees keys at its position and before
            if sliding_window is not None:
                allowed &= distance < sliding_window
            q_i = q[row : row + n].transpose(0, 1)  # [q_heads, n, head_dim]
            k_i = k_cache[slots].transpose(0, 1)  # [kv_heads, context, head_dim]
            v_i = v_cache[slots].transpose(0, 1)
            o_i = F.scaled_dot_product_attention(
                q_i, k_i, v_i, attn_mask=allowed, scale=scale, enable_gqa=True
            )
            out[row : row + n] = o_i.transpose(0, 1)
            row += n
        return out
