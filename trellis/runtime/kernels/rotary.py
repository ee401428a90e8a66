"""Rotary embedding (neox style) as one Triton kernel: a token's q and k heads rotated in place.

Each head's halves (x1, x2) become (x1 cos - x2 sin, x2 cos + x1 sin), every product rounded to the
model dtype before the add or subtraction, as model/rotary.py's apply_rotary computes
x * cos + cat(-x2, x1) * sin. rotate_halves and rotate_heads are shared with rotary_kv_store.py.
"""

from __future__ import annotations

import torch

from trellis.runtime.kernels.checks import check_rotary_inputs
from trellis.runtime.kernels.triton_setup import tl, triton


@triton.jit
def rotate_halves(x1, x2, cos, sin):
    """The two halves [heads, BLOCK_HALF] of heads in the model dtype -> their rotation, same dtype;
    cos/sin are [BLOCK_HALF] fp32. Shared by the rotary kernel and the rotary + KV store kernel."""
    dtype = x1.dtype
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    # Reference: x * cos + cat(-x2, x1) * sin, each product rounded to the model dtype before the add.
    x1_cos = (x1 * cos[None, :]).to(dtype).to(tl.float32)
    x2_sin = (x2 * sin[None, :]).to(dtype).to(tl.float32)
    x2_cos = (x2 * cos[None, :]).to(dtype).to(tl.float32)
    x1_sin = (x1 * sin[None, :]).to(dtype).to(tl.float32)
    return (x1_cos - x2_sin).to(dtype), (x2_cos + x1_sin).to(dtype)


@triton.jit
def rotate_heads(
    base_ptr,
    head_stride,
    cos,
    sin,
    dims,
    dim_mask,
    NUM_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
):
    """Rotates the [num_heads, 2 * half] heads at base_ptr in place; cos/sin are [BLOCK_HALF] fp32."""
    heads = tl.arange(0, BLOCK_HEADS)
    mask = (heads[:, None] < NUM_HEADS) & dim_mask[None, :]
    first = base_ptr + heads[:, None] * head_stride + dims[None, :]  # [BLOCK_HEADS, BLOCK_HALF]
    x1 = tl.load(first, mask=mask, other=0.0)
    x2 = tl.load(first + HALF, mask=mask, other=0.0)
    out1, out2 = rotate_halves(x1, x2, cos, sin)
    tl.store(first, out1, mask=mask)
    tl.store(first + HALF, out2, mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr,  # [T, Hq, D] with strides
    k_ptr,  # [T, Hk, D] with strides
    cos_ptr,  # [T, D], first half == second half
    sin_ptr,
    q_token_stride,
    q_head_stride,
    k_token_stride,
    k_head_stride,
    cos_token_stride,
    sin_token_stride,
    NUM_Q_HEADS: tl.constexpr,
    NUM_K_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_Q_HEADS: tl.constexpr,
    BLOCK_K_HEADS: tl.constexpr,
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
    rotate_heads(
        k_ptr + token * k_token_stride,
        k_head_stride,
        cos,
        sin,
        dims,
        dim_mask,
        NUM_K_HEADS,
        HALF,
        BLOCK_K_HEADS,
    )


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q [T, Hq, D] and k [T, Hk, D] IN PLACE by cos/sin [T, D] (neox style, as model/rotary.py's
    apply_rotary) and returns them. q and k may be strided views (e.g. of the fused qkv output) as
    long as each head's D values are contiguous."""
    check_rotary_inputs(q, k, cos, sin)
    tokens, _, head_dim = q.shape
    if tokens == 0:
        return q, k
    half = head_dim // 2
    _rotary_kernel[(tokens,)](
        q,
        k,
        cos,
        sin,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos.stride(0),
        sin.stride(0),
        NUM_Q_HEADS=q.shape[1],
        NUM_K_HEADS=k.shape[1],
        HALF=half,
        BLOCK_Q_HEADS=triton.next_power_of_2(q.shape[1]),
        BLOCK_K_HEADS=triton.next_power_of_2(k.shape[1]),
        BLOCK_HALF=triton.next_power_of_2(half),
        num_warps=4,
        enable_fp_fusion=False,
    )
    return q, k
