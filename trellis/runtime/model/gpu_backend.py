"""The GPU attention backend: KV stores and decode in Triton kernels, prefill on fused SDPA kernels.

forward_rotary rotates q and k in the same kernel as the KV store. Decode rows (one query
token) go through the paged decode kernel, which reads context lengths and block tables on the
device, so a decode step can be captured in a CUDA graph. Prefill chunks run fused SDPA per
sequence (prefill_attention.py): causal on the chunk's own K/V when the sequence has no earlier
context, else over its keys gathered from the paged cache, causal aligned to the bottom right.
"""

from __future__ import annotations

import torch

from trellis.runtime.kernels import paged_decode_attention, rotary_store_kv
from trellis.runtime.model.attention_metadata import AttentionMetadata, key_slots
from trellis.runtime.model.prefill_attention import attend_fresh, attend_with_context, within_window


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
        if self._prefill_only(q.shape[0], sliding_window):  # its output is the step's: no copy
            return attend_fresh(q, k, v, scale=scale)
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
            rows = slice(row, row + n)
            if start == 0 and within_window(n, sliding_window):  # no earlier context: the chunk itself
                out[rows] = attend_fresh(q[rows], k[rows], v[rows], scale=scale)
            else:
                slots = key_slots(meta, i, start + n)
                out[rows] = attend_with_context(
                    q[rows], flat_k, flat_v, slots, start, scale=scale, sliding_window=sliding_window
                )
        return out

    def _prefill_only(self, tokens: int, sliding_window: int | None) -> bool:
        """The step's rows are one fresh prompt within the window, so attend_fresh covers them all."""
        if len(self._prefill) != 1:
            return False
        _, _, n, start = self._prefill[0]
        return n == tokens and start == 0 and within_window(n, sliding_window)
