"""The KV-cache write as one Triton kernel: K and V of a step's tokens into their paged slots.

Token t's rows go to cache[slot // block_size, slot % block_size] with slot = slot_mapping[t],
cast to the cache dtype; a negative slot (a padding row of a CUDA graph batch) writes nothing.
"""

from __future__ import annotations

import torch

from trellis.runtime.kernels.checks import check_store_kv_inputs
from trellis.runtime.kernels.triton_setup import tl, triton


@triton.jit
def _store_kv_kernel(
    k_ptr,  # [T, Hk, D] with strides
    v_ptr,
    k_cache_ptr,  # [num_blocks, block_size, Hk, D] with strides
    v_cache_ptr,
    slot_mapping_ptr,  # [T] int64, negative = skip (padding rows of a CUDA graph batch)
    k_token_stride,
    k_head_stride,
    v_token_stride,
    v_head_stride,
    k_cache_block_stride,
    k_cache_pos_stride,
    k_cache_head_stride,
    v_cache_block_stride,
    v_cache_pos_stride,
    v_cache_head_stride,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    heads = tl.arange(0, BLOCK_HEADS)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < NUM_HEADS) & (dims < HEAD_DIM) & (slot >= 0)
    k = tl.load(k_ptr + token * k_token_stride + heads * k_head_stride + dims, mask=mask)
    v = tl.load(v_ptr + token * v_token_stride + heads * v_head_stride + dims, mask=mask)
    k_dst = (
        k_cache_ptr + block * k_cache_block_stride + offset * k_cache_pos_stride + heads * k_cache_head_stride
    )
    v_dst = (
        v_cache_ptr + block * v_cache_block_stride + offset * v_cache_pos_stride + heads * v_cache_head_stride
    )
    tl.store(k_dst + dims, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_dst + dims, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Writes k, v [T, Hk, D] into the caches [num_blocks, block_size, Hk, D] at the flat slots
    slot_mapping [T] int64 (slot = block * block_size + offset); a negative slot skips its row."""
    check_store_kv_inputs(k, v, k_cache, v_cache, slot_mapping)
    tokens, heads, head_dim = k.shape
    if tokens == 0:
        return
    _store_kv_kernel[(tokens,)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        NUM_HEADS=heads,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=k_cache.shape[1],
        BLOCK_HEADS=triton.next_power_of_2(heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=4,
    )
