"""Paged decode attention in Triton: one query token per sequence against its paged KV cache.

A program owns one (sequence, kv head) and the G = Hq / Hk query heads that share that kv head
(padded to at least 16 rows so scores and values go through ``tl.dot``). It walks the sequence's
positions in tiles of TILE_N, gathering each position's K/V row through the block table, so any
block size works and one tile may span several blocks. Softmax is online, in float32.

Split-K: when there are few (sequence, kv head) pairs for the GPU (batch 1, long context), each
pair is split over NUM_SPLITS programs, each taking an equal share of the context (computed on the
device from context_lens), writing a partial output and its log-sum-exp; a small second kernel
combines them. NUM_SPLITS depends only on shapes (batch, kv heads, block table width), never on
data, so the launch is CUDA-graph safe: no host sync, grid from B and Hk only.
"""

from __future__ import annotations

import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton's first import: see triton_ops.py

import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from services.stage_worker.model.triton_ops import KernelInputError

TILE_N = 64  # positions per loop step: 4 blocks of 16, one 64 x D tile of K and of V in flight
MIN_DOT_ROWS = 16  # tl.dot needs M, N, K >= 16
MAX_SPLITS = 16
MIN_TILES_PER_SPLIT = 4  # a split shorter than this costs more in the reduce than it saves


@triton.jit
def _attend_tile(
    q,  # [BLOCK_G, BLOCK_D]
    m,  # [BLOCK_G] running max score (log2 units)
    total,  # [BLOCK_G] running sum of exp2(score - m)
    acc,  # [BLOCK_G, BLOCK_D] running sum of p * v
    start,
    hi,
    table,  # this sequence's block table row
    k_base,  # k cache at this kv head
    v_base,
    block_stride,  # shared by both caches
    pos_stride,
    scale_log2,
    dims,
    dim_mask,
    BLOCK_SIZE: tl.constexpr,
    TILE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Folds positions [start, min(start + TILE, hi)) into the online softmax state."""
    positions = start + tl.arange(0, TILE)
    valid = positions < hi
    blocks = tl.load(table + positions // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    in_block = positions % BLOCK_SIZE
    # K is gathered straight into [BLOCK_D, TILE] (dims fastest) so it feeds tl.dot without a transpose;
    # V is loaded before the softmax math so both loads are in flight together.
    rows = blocks * block_stride + in_block * pos_stride
    k_t = tl.load(
        k_base + rows[None, :] + dims[:, None], mask=dim_mask[:, None] & valid[None, :], other=0.0
    )  # [BLOCK_D, TILE]
    v = tl.load(
        v_base + rows[:, None] + dims[None, :], mask=valid[:, None] & dim_mask[None, :], other=0.0
    )  # [TILE, BLOCK_D]
    scores = tl.dot(q, k_t, input_precision=DOT_PRECISION) * scale_log2  # [BLOCK_G, TILE]
    scores = tl.where(valid[None, :], scores, float("-inf"))
    m_new = tl.maximum(m, tl.max(scores, axis=1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(scores - m_new[:, None])
    total = total * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, total, acc


@triton.jit
def _paged_decode_kernel(
    q_ptr,  # [B, Hq, D] with strides
    k_cache_ptr,  # [num_blocks, block_size, Hk, D] with strides (the same for both caches)
    v_cache_ptr,
    block_tables_ptr,  # [B, W] int32
    context_lens_ptr,  # [B] int32
    out_ptr,  # [B, Hq, D] with strides (NUM_SPLITS == 1)
    partial_out_ptr,  # [B, Hq, NUM_SPLITS, D] float32 contiguous (NUM_SPLITS > 1)
    partial_lse_ptr,  # [B, Hq, NUM_SPLITS] float32 contiguous, log2 units
    q_seq_stride,
    q_head_stride,
    cache_block_stride,
    cache_pos_stride,
    cache_head_stride,
    table_stride,
    out_seq_stride,
    out_head_stride,
    scale_log2,  # softmax scale * log2(e): scores live in base 2 so exp2 does the work
    window,
    GROUP: tl.constexpr,  # query heads per kv head
    HEAD_DIM: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    TILE: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    context = tl.load(context_lens_ptr + seq)
    first = 0
    if HAS_WINDOW:
        first = tl.maximum(context - window, 0)
    # This program's share [lo, hi) of the attended positions, tile aligned, possibly empty.
    chunk = tl.cdiv(tl.cdiv(context - first, NUM_SPLITS), TILE) * TILE
    lo = first + split * chunk
    hi = tl.minimum(lo + chunk, context)

    rows = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + rows  # query heads of this kv head
    row_mask = rows < GROUP
    dim_mask = dims < HEAD_DIM  # constant true when HEAD_DIM is a power of 2 (>= 16)
    q = tl.load(
        q_ptr + seq * q_seq_stride + heads[:, None] * q_head_stride + dims[None, :],
        mask=row_mask[:, None] & dim_mask[None, :],
        other=0.0,
    )  # [BLOCK_G, BLOCK_D]

    m = tl.full([BLOCK_G], float("-inf"), tl.float32)  # running max score (log2 units)
    total = tl.zeros([BLOCK_G], tl.float32)  # running sum of exp2(score - m)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)  # running sum of p * v
    table = block_tables_ptr + seq * table_stride
    k_base = k_cache_ptr + kv_head * cache_head_stride
    v_base = v_cache_ptr + kv_head * cache_head_stride
    if INTERPRET:
        # Triton 3.6's interpreter cannot run a for loop with tensor bounds under numpy >= 2.4
        # (triton-lang/triton#9171); a while loop does the same steps.
        start = lo
        while start < hi:
            m, total, acc = _attend_tile(
                q,
                m,
                total,
                acc,
                start,
                hi,
                table,
                k_base,
                v_base,
                cache_block_stride,
                cache_pos_stride,
                scale_log2,
                dims,
                dim_mask,
                BLOCK_SIZE,
                TILE,
                DOT_PRECISION,
            )
            start += TILE
    else:
        for start in range(lo, hi, TILE):
            m, total, acc = _attend_tile(
                q,
                m,
                total,
                acc,
                start,
                hi,
                table,
                k_base,
                v_base,
                cache_block_stride,
                cache_pos_stride,
                scale_log2,
                dims,
                dim_mask,
                BLOCK_SIZE,
                TILE,
                DOT_PRECISION,
            )

    # An empty share (or context 0, a padding row) leaves total == 0: output zeros, weight zero.
    safe_total = tl.where(total > 0, total, 1.0)
    result = acc / safe_total[:, None]
    out_mask = row_mask[:, None] & dim_mask[None, :]
    if NUM_SPLITS == 1:
        dst = out_ptr + seq * out_seq_stride + heads[:, None] * out_head_stride + dims[None, :]
        tl.store(dst, result.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        slot = (seq * tl.num_programs(1) * GROUP + heads) * NUM_SPLITS + split  # [BLOCK_G]
        tl.store(partial_out_ptr + slot[:, None] * HEAD_DIM + dims[None, :], result, mask=out_mask)
        lse = tl.where(total > 0, m + tl.log2(safe_total), float("-inf"))
        tl.store(partial_lse_ptr + slot, lse, mask=row_mask)


@triton.jit
def _combine_splits_kernel(
    partial_out_ptr,  # [B, Hq, NUM_SPLITS, D] float32
    partial_lse_ptr,  # [B, Hq, NUM_SPLITS] float32, log2 units
    out_ptr,  # [B, Hq, D] with strides
    out_seq_stride,
    out_head_stride,
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    row = seq * tl.num_programs(1) + head
    splits = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, BLOCK_D)
    split_mask = splits < NUM_SPLITS
    lse = tl.load(partial_lse_ptr + row * NUM_SPLITS + splits, mask=split_mask, other=float("-inf"))
    top = tl.max(lse, axis=0)
    top = tl.where(top == float("-inf"), 0.0, top)  # every share empty: all weights become 0
    weights = tl.exp2(lse - top)  # [BLOCK_S]
    parts = tl.load(
        partial_out_ptr + (row * NUM_SPLITS + splits[:, None]) * HEAD_DIM + dims[None, :],
        mask=split_mask[:, None] & (dims[None, :] < HEAD_DIM),
        other=0.0,
    )  # [BLOCK_S, BLOCK_D]
    total = tl.sum(weights, axis=0)
    result = tl.sum(parts * weights[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    dst = out_ptr + seq * out_seq_stride + head * out_head_stride + dims
    tl.store(dst, result.to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)


def choose_num_splits(*, batch: int, kv_heads: int, max_context: int, num_sms: int) -> int:
    """Splits per (sequence, kv head) so that batch * kv_heads * splits roughly fills the SMs, from
    shapes only; max_context bounds the positions one sequence attends (table capacity or window)."""
    useful = max(triton.cdiv(max_context, TILE_N * MIN_TILES_PER_SPLIT), 1)
    return max(1, min(triton.cdiv(num_sms, batch * kv_heads), useful, MAX_SPLITS))


def _check_inputs(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    sliding_window: int | None,
) -> None:
    def require(condition: bool, message: str) -> None:
        if not condition:
            raise KernelInputError(message)

    require(q.dim() == 3, f"q must be [B, Hq, D], got shape {tuple(q.shape)}")
    batch, q_heads, head_dim = q.shape
    require(
        k_cache.dim() == 4 and k_cache.shape == v_cache.shape and k_cache.shape[3] == head_dim,
        f"caches {tuple(k_cache.shape)}, {tuple(v_cache.shape)} must be [blocks, block_size, Hk, {head_dim}]",
    )
    require(
        q_heads % k_cache.shape[2] == 0,
        f"{q_heads} query heads is no multiple of {k_cache.shape[2]} kv heads",
    )
    require(
        q.dtype == k_cache.dtype == v_cache.dtype, f"q {q.dtype} and caches {k_cache.dtype} differ in dtype"
    )
    require(
        block_tables.dim() == 2 and block_tables.shape[0] == batch and block_tables.dtype == torch.int32,
        f"block_tables must be int32 [{batch}, W], got {block_tables.dtype} {tuple(block_tables.shape)}",
    )
    require(
        context_lens.shape == (batch,) and context_lens.dtype == torch.int32,
        f"context_lens must be int32 [{batch}], got {context_lens.dtype} {tuple(context_lens.shape)}",
    )
    require(
        sliding_window is None or sliding_window > 0, f"sliding_window must be positive, got {sliding_window}"
    )
    require(
        k_cache.stride() == v_cache.stride(),
        f"caches differ in strides: {k_cache.stride()}, {v_cache.stride()}",
    )
    for name, t in (("q", q), ("k_cache", k_cache), ("block_tables", block_tables)):
        require(t.stride(-1) == 1, f"{name} must be contiguous in its last dim, got strides {t.stride()}")


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    *,
    scale: float,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """q [B, Hq, D] (rotated; its own K/V already in the cache) attends over the first
    context_lens[b] positions of sequence b's pages (the last sliding_window of them when set).
    Caches [num_blocks, block_size, Hk, D], block_tables [B, W] int32, context_lens [B] int32.
    Returns out [B, Hq, D] in q.dtype (written into ``out`` when given). num_splits None picks
    split-K from shapes (1 off CUDA)."""
    _check_inputs(q, k_cache, v_cache, block_tables, context_lens, sliding_window)
    batch, q_heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise KernelInputError(f"out must be {q.dtype} {tuple(q.shape)} with unit last stride")
    if batch == 0:
        return out
    if num_splits is None:
        num_splits = 1
        if q.is_cuda:
            capacity = block_tables.shape[1] * block_size
            num_splits = choose_num_splits(
                batch=batch,
                kv_heads=kv_heads,
                max_context=min(capacity, sliding_window or capacity),
                num_sms=torch.cuda.get_device_properties(q.device).multi_processor_count,
            )
    group = q_heads // kv_heads
    block_d = max(triton.next_power_of_2(head_dim), MIN_DOT_ROWS)
    if num_splits > 1:
        partial_out = torch.empty(
            (batch, q_heads, num_splits, head_dim), dtype=torch.float32, device=q.device
        )
        partial_lse = torch.empty((batch, q_heads, num_splits), dtype=torch.float32, device=q.device)
    else:
        partial_out = partial_lse = out  # unused by the kernel when NUM_SPLITS == 1
    _paged_decode_kernel[(batch, kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        out,
        partial_out,
        partial_lse,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        scale * math.log2(math.e),
        sliding_window or 0,
        GROUP=group,
        HEAD_DIM=head_dim,
        HAS_WINDOW=sliding_window is not None,
        BLOCK_SIZE=block_size,
        BLOCK_G=max(triton.next_power_of_2(group), MIN_DOT_ROWS),
        BLOCK_D=block_d,
        TILE=TILE_N,
        NUM_SPLITS=num_splits,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        INTERPRET=isinstance(_paged_decode_kernel, InterpretedFunction),
        num_warps=4,
    )
    if num_splits > 1:
        _combine_splits_kernel[(batch, q_heads)](
            partial_out,
            partial_lse,
            out,
            out.stride(0),
            out.stride(1),
            HEAD_DIM=head_dim,
            NUM_SPLITS=num_splits,
            BLOCK_S=triton.next_power_of_2(num_splits),
            BLOCK_D=block_d,
            num_warps=4,
        )
    return out
