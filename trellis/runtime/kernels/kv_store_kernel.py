"""The KV-cache write as one Triton kernel: K and V of a step's tokens into their paged slots."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from trellis.runtime.kernels.triton_ops import _require, _require_unit_last_stride

# --- K and V into the paged cache --------------------------------------------------------------


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


def check_store_kv_inputs(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """k, v [T, Hk, D], caches [blocks, block_size, Hk, D], slot_mapping [T] int64; unit last strides."""
    _require(
        k.dim() == 3 and k.shape == v.shape,
        f"k, v must be equal [T, Hk, D], got {tuple(k.shape)}, {tuple(v.shape)}",
    )
    _require(
        k_cache.dim() == 4 and k_cache.shape == v_cache.shape and k_cache.shape[2:] == k.shape[1:],
        f"caches {tuple(k_cache.shape)}, {tuple(v_cache.shape)} must be [blocks, block_size, Hk, D] "
        f"with Hk, D = {tuple(k.shape[1:])}",
    )
    _require(
        slot_mapping.shape == (k.shape[0],) and slot_mapping.dtype == torch.int64,
        f"slot_mapping must be int64 [{k.shape[0]}], got {slot_mapping.dtype} {tuple(slot_mapping.shape)}",
    )
    for name, t in (("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        _require_unit_last_stride(name, t)


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
