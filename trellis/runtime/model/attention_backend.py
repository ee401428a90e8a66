"""How attention reads and writes the paged KV cache, behind a small interface.

``TorchReferenceBackend`` is the plain PyTorch path: the reference on CPU, one SDPA call per sequence.
A fast GPU backend (paged decode kernel, CUDA graphs) implements the same two methods (`begin_step`,
`forward_rotary`).
"""

from __future__ import annotations

from typing import Protocol

import torch

from trellis.runtime.model.attention_metadata import AttentionMetadata, attend_paged, key_slots
from trellis.runtime.model.rotary import apply_rotary


class AttentionBackend(Protocol):
    def begin_step(self, meta: AttentionMetadata) -> None:
        """Called once per step before the first layer: precompute what every layer shares."""
        ...

    def forward_rotary(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        *,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        """Rotate q [tokens, q_heads, head_dim] and k [tokens, kv_heads, head_dim] by cos/sin
        [tokens, head_dim] (the backend picks how, e.g. in the same kernel as the KV store), store this
        step's k, v in the cache, then attend with q causally over each sequence's cached keys.
        Returns [tokens, q_heads, head_dim]."""
        ...


class TorchReferenceBackend:
    def __init__(self) -> None:
        self._meta: AttentionMetadata | None = None
        self._key_slots: list[torch.Tensor] = []  # per sequence: [context] cache slots of its keys

    def begin_step(self, meta: AttentionMetadata) -> None:
        self._meta = meta
        self._key_slots = [
            key_slots(meta, i, start + n)
            for i, (start, n) in enumerate(zip(meta.start_positions, meta.query_lens, strict=True))
        ]

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
        for slots, start, n in zip(self._key_slots, meta.start_positions, meta.query_lens, strict=True):
            out[row : row + n] = attend_paged(
                q[row : row + n], k_cache, v_cache, slots, start, scale=scale, sliding_window=sliding_window
            )
            row += n
        return out

    def forward_rotary(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        *,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        """AttentionBackend.forward_rotary: rotary.py's rotation of q and k, then forward."""
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return self.forward(q, k, v, kv_cache, scale=scale, sliding_window=sliding_window)
