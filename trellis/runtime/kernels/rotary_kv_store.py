"""Rotary and the KV-cache write as ONE Triton kernel: a layer's q and k rotated, k and v paged.

The same math as rotary.py's apply_rotary followed by kv_store.py's store_kv, with the same
roundings (so the results match those two kernels bit for bit), in one launch instead of two: a
program owns one token, rotates its q heads in place, rotates its k heads (in place too, since
prefill attends over the chunk's own k) and writes those rotated k rows and the v rows into the
token's cache slot.
"""

from __future__ import annotations

import torch

from trellis.runtime.kernels.checks import check_rotary_inputs, check_store_kv_inputs
from trellis.runtime.kernels.rotary import rotate_halves, rotate_heads
from trellis.runtime.kernels.triton_setup import tl, triton


@triton.jit
def _rotary_store_kv_kernel(
    q_ptr,  # [T, Hq, D] with strides
    k_ptr,  # [T, Hk, D] with strides
    v_ptr,
    cos_ptr,  # [T, D], first half == second half
    sin_ptr,
    k_cache_ptr,  # [num_blocks, block_size, Hk, D] with strides
    v_cache_ptr,
    slot_mapping_ptr,  # [T] int64, negative = skip (padding rows of a CUDA graph batch)
    q_token_stride,
    q_head_stride,
    k_token_stride,
    k_head_stride,
    v_token_stride,
    v_head_stride,
    cos_token_stride,
    sin_token_stride,
    k_cache_block_stride,
    k_cache_pos_stride,
    k_cache_head_stride,
    v_cache_block_stride,
    v_cache_pos_stride,
    v_cache_head_stride,
    NUM_Q_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_Q_HEADS: tl.constexpr,
    BLOCK_KV_HEADS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    dims = tl.arange(0, BLOCK_HALF)
    dim_mask = dims < HALF
    cos = tl.load(cos_ptr + token * cos_token_stride + dims, mask=dim_mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + token * sin_token_stride + dims, mask=dim_mask, other=0.0).to(tl.float32)
    rotate_heads(
        q_ptr + token * q_token_stride,
        q_head_stride,
        cos,
        sin,
        dims,
        dim_mask,
        NUM_Q_HEADS,
        HALF,
        BLOCK_Q_HEADS,
    )

    heads = tl.arange(0, BLOCK_KV_HEADS)
    mask = (heads[:, None] < NUM_KV_HEADS) & dim_mask[None, :]  # [BLOCK_KV_HEADS, BLOCK_HALF]
    k_first = k_ptr + token * k_token_stride + heads[:, None] * k_head_stride + dims[None, :]
    k1, k2 = rotate_halves(
        tl.load(k_first, mask=mask, other=0.0), tl.load(k_first + HALF, mask=mask, other=0.0), cos, sin
    )
    tl.store(k_first, k1, mask=mask)
    tl.store(k_first + HALF, k2, mask=mask)

    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    cache_mask = mask & (slot >= 0)
    k_dst = (
        k_cache_ptr
        + block * k_cache_block_stride
        + offset * k_cache_pos_stride
        + heads[:, None] * k_cache_head_stride
        + dims[None, :]
    )
    tl.store(k_dst, k1.to(k_cache_ptr.dtype.element_ty), mask=cache_mask)
    tl.store(k_dst + HALF, k2.to(k_cache_ptr.dtype.element_ty), mask=cache_mask)
    v_first = v_ptr + token * v_token_stride + heads[:, None] * v_head_stride + dims[None, :]
    v_dst = (
        v_cache_ptr
        + block * v_cache_block_stride
        + offset * v_cache_pos_stride
        + heads[:, None] * v_cache_head_stride
        + dims[None, :]
    )
    v1 = tl.load(v_first, mask=cache_mask)
    v2 = tl.load(v_first + HALF, mask=cache_mask)
    tl.store(v_dst, v1.to(v_cache_ptr.dtype.element_ty), mask=cache_mask)
    tl.store(v_dst + HALF, v2.to(v_cache_ptr.dtype.element_ty), mask=cache_mask)


def rotary_store_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """apply_rotary(q, k, cos, sin) then store_kv(k, v, k_cache, v_cache, slot_mapping), in one kernel.

    q [T, Hq, D] and k [T, Hk, D] are rotated IN PLACE by cos/sin [T, D] (neox style) and returned;
    the rotated k and v [T, Hk, D] go into the caches [num_blocks, block_size, Hk, D] at the flat
    slots slot_mapping [T] int64, a negative slot skipping its row. q, k, v may be strided views
    (e.g. of the fused qkv output) as long as each head's D values are contiguous."""
    check_rotary_inputs(q, k, cos, sin)
    check_store_kv_inputs(k, v, k_cache, v_cache, slot_mapping)
    tokens, q_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    if tokens == 0:
        return q, k
    half = head_dim // 2
    _rotary_store_kv_kernel[(tokens,)](
        q,
        k,
        v,
        cos,
        sin,
        k_cache,
        v_cache,
        slot_mapping,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        cos.stride(0),
        sin.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        NUM_Q_HEADS=q_heads,
        NUM_KV_HEADS=kv_heads,
        HALF=half,
        BLOCK_SIZE=k_cache.shape[1],
        BLOCK_Q_HEADS=triton.next_power_of_2(q_heads),
        BLOCK_KV_HEADS=triton.next_power_of_2(kv_heads),
        BLOCK_HALF=triton.next_power_of_2(half),
        num_warps=4,
        enable_fp_fusion=False,
    )
    return q, k
