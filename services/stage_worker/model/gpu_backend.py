"""The GPU attention backend: KV stores and decode in Triton kernels, prefill in flash attention.

Decode rows (one query token) go through the paged decode kernel, which reads context lengths and
block tables on the device, so a decode step can be captured in a CUDA graph. Prefill chunks run
PyTorch SDPA per sequence: the flash kernel directly on the chunk's own K/V when the sequence has
no earlier context, else over its keys gathered from the paged cache with a causal offset mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from services.stage_worker.model import triton_ops
from services.stage_worker.model.attention_metadata import AttentionMetadata
from services.stage_worker.model.paged_decode import paged_decode_attention


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
        k_cache, v_cache = kv_cache
        triton_ops.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
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
        for i, row, n, start in self._prefill:
            out[row : row + n] = self._prefill_one(
                q[row : row + n],
                k[row : row + n],
                v[row : row + n],
                k_cache,
                v_cache,
                meta,
                i,
                start,
                scale,
                sliding_window,
            )
        return out

    @staticmethod
    def _prefill_one(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        seq: int,
        start: int,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        n = q.shape[0]
        qh = q.transpose(0, 1)  # [heads, n, head_dim]
        if start == 0 and sliding_window is None:
            o = F.scaled_dot_product_attention(
                qh, k.transpose(0, 1), v.transpose(0, 1), is_causal=True, scale=scale, enable_gqa=True
            )
            return o.transpose(0, 1)
        context = start + n
        bs = meta.block_size
        blocks = meta.block_tables[seq, : -(-context // bs)].long()
        slots = (blocks[:, None] * bs + torch.arange(bs, device=q.device)).flatten()[:context]
        keys = k_cache.view(-1, *k_cache.shape[2:])[slots].transpose(0, 1)  # [kv_heads, context, head_dim]
        values = v_cache.view(-1, *v_cache.shape[2:])[slots].transpose(0, 1)
        distance = torch.arange(start, context, device=q.device)[:, None] - torch.arange(
            context, device=q.device
        )
        allowed = distance >= 0
        if sliding_window is not None:
            allowed &= distance < sliding_window
        o = F.scaled_dot_product_attention(qh, keys, values, attn_mask=allowed, scale=scale, enable_gqa=True)
        return o.transpose(0, 1)
