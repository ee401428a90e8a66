"""Everything attention needs to know about a step's batch, built once per step and shared by all layers.

The step's tokens are packed flat (vLLM style): sequence i owns rows
[query_start[i], query_start[i + 1]) of every [tokens, ...] tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AttentionMetadata:
    positions: torch.Tensor  # [tokens] int64, position of each token in its sequence
    slot_mapping: torch.Tensor  # [tokens] int64, cache slot where each token's K/V is written
    query_start: torch.Tensor  # [seqs + 1] int32, cumulative query lengths
    context_lens: torch.Tensor  # [seqs] int32, tokens cached for each sequence after this step
    block_tables: torch.Tensor  # [seqs, max_blocks] int32, padded with 0
    block_size: int
    # Host copies, so per-sequence loops need no device sync.
    start_positions: tuple[int, ...]
    query_lens: tuple[int, ...]

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)


def build_attention_metadata(
    start_positions: Sequence[int],
    query_lens: Sequence[int],
    block_tables: Sequence[Sequence[int]],
    *,
    block_size: int,
    device: torch.device,
) -> AttentionMetadata:
    """Per-sequence start positions, query lengths and block tables -> the step's metadata tensors."""
    positions: list[int] = []
    slots: list[int] = []
    for start, n, table in zip(start_positions, query_lens, block_tables, strict=True):
        for p in range(start, start + n):
            positions.append(p)
            slots.append(table[p // block_size] * block_size + p % block_size)
    cumulative = [0]
    for n in query_lens:
        cumulative.append(cumulative[-1] + n)
    width = max((len(t) for t in block_tables), default=0)
    padded = [list(t) + [0] * (width - len(t)) for t in block_tables]

    def as_tensor(values: Sequence[int] | list[list[int]], dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

    return AttentionMetadata(
        positions=as_tensor(positions, torch.int64),
        slot_mapping=as_tensor(slots, torch.int64),
        query_start=as_tensor(cumulative, torch.int32),
        context_lens=as_tensor(
            [s + n for s, n in zip(start_positions, query_lens, strict=True)], torch.int32
        ),
        block_tables=as_tensor(padded, torch.int32).reshape(len(padded), width),
        block_size=block_size,
        start_positions=tuple(start_positions),
        query_lens=tuple(query_lens),
    )


def key_slots(meta: AttentionMetadata, seq: int, context: int) -> torch.Tensor:
    """[context] cache slots of sequence ``seq``'s first ``context`` keys, through its block table."""
    bs = meta.block_size
    blocks = meta.block_tables[seq, : -(-context // bs)].long()
    return (blocks[:, None] * bs + torch.arange(bs, device=blocks.device)).flatten()[:context]


def attend_paged(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    start: int,
    *,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """One sequence's queries q [n, q_heads, head_dim] at positions start.. over its keys at
    ``slots`` of the flat caches [slots, kv_heads, head_dim]: causal (and windowed) SDPA."""
    n, context = q.shape[0], slots.shape[0]
    positions = torch.arange(start, start + n, device=q.device)
    distance = positions[:, None] - torch.arange(context, device=q.device)  # [n, context]
    allowed = distance >= 0  # a query sees keys at its position and before
    if sliding_window is not None:
        allowed &= distance < sliding_window
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1),  # [q_heads, n, head_dim]
        k_cache[slots].transpose(0, 1),  # [kv_heads, context, head_dim]
        v_cache[slots].transpose(0, 1),
        attn_mask=allowed,
        scale=scale,
        enable_gqa=True,
    )
    return out.transpose(0, 1)
