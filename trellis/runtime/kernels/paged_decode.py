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

import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton's first import: see triton_ops.py

import triton
from triton.runtime.interpreter import InterpretedFunction

from trellis.runtime.kernels.paged_decode_kernel import paged_decode_kernel
from trellis.runtime.kernels.triton_ops import KernelInputError

TILE_N = 64  # positions per loop step: 4 blocks of 16, one 64 x D tile of K and of V in flight
MIN_DOT_ROWS = 16  # tl.dot needs M, N, K >= 16
MAX_SPLITS = 16
MIN_TILES_PER_SPLIT = 4  # a split shorter than this costs more in the reduce than it saves
MIN_COUNTERS = 64  # counter buffers come in powers of 2 from this size, so few sizes ever exist

# (device, size) -> int32 zeros: the split counters. A buffer is made once and kept for good, since
# a captured CUDA graph holds its address; every launch leaves it at 0 again.
_split_counters: dict[tuple[torch.device, int], torch.Tensor] = {}


def split_counters(device: torch.device, count: int) -> torch.Tensor:
    """``count`` int32 counters at 0 on ``device``, shared by every split-K launch of that size.

    Launches on one device must run in order (one stream), as a stage's layers do. The buffer is
    made outside CUDA graph capture: a graph's warm-up runs the same shapes eagerly first."""
    if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0" must find one buffer
        device = torch.device("cuda", torch.cuda.current_device())
    size = max(triton.next_power_of_2(count), MIN_COUNTERS)
    key = (device, size)
    counters = _split_counters.get(key)
    if counters is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "paged decode split counters must be made outside CUDA graph capture: "
                "run the step once eagerly before capturing it"
            )
        counters = _split_counters[key] = torch.zeros(size, dtype=torch.int32, device=device)
    return counters[:count]


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
        INTERPRET=isinstance(paged_decode_kernel, InterpretedFunction),
        num_warps=4,
    )
    return out
