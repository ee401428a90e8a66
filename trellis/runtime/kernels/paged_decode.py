"""Paged decode attention in Triton: one query token per sequence against its paged KV cache.

A program owns one (sequence, kv head) and the G = Hq / Hk query heads that share that kv head
(padded to at least 16 rows so scores and values go through ``tl.dot``). It walks the sequence's
positions in tiles of TILE_N, gathering each position's K/V row through the block table, so any
block size works and one tile may span several blocks. Softmax is online, in float32.

Split-K: when there are few (sequence, kv head) pairs for the GPU (batch 1, long context), each
pair is split over NUM_SPLITS programs, each taking an equal share of the context (computed on the
device from context_lens), writing a partial output and its log-sum-exp; the split that finishes
last (an atomic counter per pair) combines them, in the same launch. NUM_SPLITS depends only on
shapes (batch, kv heads, block table width), never on data, so the launch is CUDA-graph safe: no
host sync, grid from B and Hk only, and the counters are back at 0 after every launch.
The kernel itself is in paged_decode_kernel.py.
"""

from __future__ import annotations

import functools
import math

import torch

from trellis.runtime.kernels.checks import check_paged_decode_inputs
from trellis.runtime.kernels.paged_decode_kernel import paged_decode_kernel
from trellis.runtime.kernels.triton_setup import is_interpreted, triton

TILE_N = 64  # positions per loop step: 4 blocks of 16, one 64 x D tile of K and of V in flight
MIN_DOT_ROWS = 16  # tl.dot needs M, N, K >= 16
MAX_SPLITS = 16
MIN_TILES_PER_SPLIT = 4  # a split shorter than this costs more in the reduce than it saves
MIN_COUNTERS = 64  # counter buffers come in powers of 2 from this size, so few sizes ever exist


def split_counters(device: torch.device, count: int) -> torch.Tensor:
    """``count`` int32 counters at 0 on ``device``, shared by every split-K launch of that size.

    Launches on one device must run in order (one stream), as a stage's layers do. The buffer is
    made outside CUDA graph capture: a graph's warm-up runs the same shapes eagerly first."""
    if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0" must find one buffer
        device = torch.device("cuda", torch.cuda.current_device())
    return _counter_buffer(device, max(triton.next_power_of_2(count), MIN_COUNTERS))[:count]


@functools.cache
def _counter_buffer(device: torch.device, size: int) -> torch.Tensor:
    """int32 zeros [size] on ``device``, made once and kept for good: a captured CUDA graph holds its
    address, and every launch leaves it at 0 again. A refusal (raised) is not cached."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "paged decode split counters must be made outside CUDA graph capture: "
            "run the step once eagerly before capturing it"
        )
    return torch.zeros(size, dtype=torch.int32, device=device)


def choose_num_splits(*, batch: int, kv_heads: int, max_context: int, num_sms: int) -> int:
    """Splits per (sequence, kv head) so that batch * kv_heads * splits roughly fills the SMs, from
    shapes only; max_context bounds the positions one sequence attends (table capacity or window)."""
    useful = max(triton.cdiv(max_context, TILE_N * MIN_TILES_PER_SPLIT), 1)
    return max(1, min(triton.cdiv(num_sms, batch * kv_heads), useful, MAX_SPLITS))


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
    check_paged_decode_inputs(q, k_cache, v_cache, block_tables, context_lens, sliding_window, out)
    batch, q_heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
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
        counters = split_counters(q.device, batch * kv_heads)
    else:
        # Unused by the kernel when NUM_SPLITS == 1: any tensors do.
        partial_out = partial_lse = out
        counters = context_lens
    paged_decode_kernel[(batch, kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        out,
        partial_out,
        partial_lse,
        counters,
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
        BLOCK_GROUP=max(triton.next_power_of_2(group), 2),
        BLOCK_S=triton.next_power_of_2(num_splits),
        TILE=TILE_N,
        NUM_SPLITS=num_splits,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        INTERPRET=is_interpreted(paged_decode_kernel),
        num_warps=4,
    )
    return out
