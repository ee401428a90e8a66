"""The GPU attention backend: KV stores and decode in Triton kernels, prefill in flash attention.

forward_rotary rotates q and k in the same kernel as the KV store. Decode rows (one query
token) go through the paged decode kernel, which reads context lengths and block tables on the
device, so a decode step can be captured in a CUDA graph. Prefill chunks run PyTorch SDPA per
sequence: the flash kernel directly on the chunk's own K/V when the sequence has no earlier
context, else over its keys gathered from the paged cache with a causal offset mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trellis.runtime.kernels import paged_decode_attention, rotary_store_kv
from trellis.runtime.model.attention_metadata import AttentionMetadata, attend_paged, key_slots


class GpuAttentionBackend:
    def __init__(self) -> None:
        self._meta: AttentionMetadata | None = None
        self._all_decode = False
        self._decode_rows: torch.Tensor | None = None  # rows of decode tokens in a mixed step
        self._decode_seqs: torch.Tensor | None = None  # their sequences' indices
        self._prefill: list[tuple[int, int, int, int]] = []  # (seq, first row, query len, start pos)

    def begin_step(self, meta: AttentionMetadata) -> None:
        self._meta = meta
        self._all_decode = all(n == 1 for n in meta.query_lens)
        self._prefill, decode_rows, decode_seqs = [], [], []
        if self._all_decode:
            return
        row = 0
        for i, (start, n) in enumerate(zip(meta.start_positions, meta.query_lens, strict=True)):
            if n == 1:
                decode_rows.append(row)
                decode_seqs.append(i)
            else:
                self._prefill.append((i, row, n, start))
            row += n
        device = meta.block_tables.device
        self._decode_rows = torch.tensor(decode_rows, dtype=torch.int64).to(device, non_blocking=True)
        self._decode_seqs = torch.tensor(decode_seqs, dtype=torch.int64).to(device, non_blocking=True)

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
        """AttentionBackend.forward_rotary: one kernel rotates q, k in place by cos/sin [tokens,
        head_dim] and writes the rotated k and v into the cache, then attention runs."""
        k_cache, v_cache = kv_cache
        q, k = rotary_store_kv(q, k, v, cos, sin, k_cache, v_cache, self._meta.slot_mapping)
        return self._attend(q, k, v, kv_cache, scale=scale, sliding_window=sliding_window)

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        *,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        """Attention of q over the cache, this step's k, v already in it (and in k, v for prefill)."""
        meta = self._meta
        k_cache, v_cache = kv_cache
        if self._all_decode:
            return paged_decode_attention(
                q,
                k_cache,
                v_cache,
                meta.block_tables,
                meta.context_lens,
                scale=scale,
                sliding_window=sliding_window,
            )
        out = torch.empty_like(q)
        if self._decode_rows.numel():
            seqs = self._decode_seqs
            out[self._decode_rows] = paged_decode_attention(
                q[self._decode_rows],
                k_cache,
                v_cache,
                meta.block_tables[seqs],
                meta.context_lens[seqs],
                scale=scale,
                sliding_window=sliding_window,
            )
        flat_k, flat_v = (c.view(-1, *c.shape[2:]) for c in kv_cache)  # [slots, kv_heads, head_dim]
        for i, row, n, start in self._prefill:
            if start == 0 and sliding_window is None:  # no earlier context: flash on the chunk itself
                o = F.scaled_dot_product_attention(
                    *(t[row : row + n].transpose(0, 1) for t in (q, k, v)),
                    is_causal=True,
                    scale=scale,
                    enable_gqa=True,
                )
                out[row : row + n] = o.transpose(0, 1)
            else:
                slots = key_slots(meta, i, start + n)
                out[row : row + n] = attend_paged(
                    q[row : row + n], flat_k, flat_v, slots, start, scale=scale, sliding_window=sliding_window
                )
        return out
