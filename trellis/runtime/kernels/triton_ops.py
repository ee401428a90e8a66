"""Triton kernels for the GPU decode path: each small op of a layer becomes ONE kernel launch.

RMSNorm (alone or fused with the residual add), rotary, SiLU-and-mul and the KV-cache write are
memory bound: one program reads a row once, computes in float32 and writes once. Each kernel
rounds to the model dtype at the same points as the PyTorch reference (norm.py, rotary.py,
``F.silu(gate) * up``), and runs without FMA contraction, so float32 results match the reference to
the last bit or ulp and bfloat16 ones round the same way. No kernel syncs with the host or shapes
anything by data, so all are CUDA-graph safe. Without CUDA they run in Triton's interpreter
(``TRITON_INTERPRET=1``), which is how the unit tests check them on CPU.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # No GPU: only Triton's interpreter can run these kernels. Triton reads the variable as it
    # decorates its own library (tl.sum, tl.cdiv...) and ours, so it must be set before triton is
    # first imported; an explicit TRITON_INTERPRET setting is kept.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton
import triton.language as tl


class KernelInputError(ValueError):
    """A tensor handed to a kernel wrapper has the wrong shape, dtype or layout, told in one line."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise KernelInputError(message)


def _require_unit_last_stride(name: str, t: torch.Tensor) -> None:
    _require(t.stride(-1) == 1, f"{name} must be contiguous in its last dim, got strides {t.stride()}")


def _row_warps(block: int) -> int:
    """Warps for a program that owns one row of ``block`` elements: 1 for tiny rows, 4-8 for 4k-8k."""
    return min(max(block // 1024, 1), 8)


# --- RMSNorm, optionally fused with the residual add --------------------------------------------


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [T, H]
    residual_ptr,  # [T, H], read only when HAS_RESIDUAL
    weight_ptr,  # [H]
    out_ptr,  # [T, H]
    residual_out_ptr,  # [T, H] receives x + residual, written only when HAS_RESIDUAL
    x_row_stride,
    residual_row_stride,
    out_row_stride,
    residual_out_row_stride,
    eps,
    HIDDEN: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < HIDDEN
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * residual_row_stride + cols, mask=mask, other=0.0)
        # The reference adds in the model dtype, then normalizes the rounded sum.
        x = (x + residual.to(tl.float32)).to(dtype)
        tl.store(residual_out_ptr + row * residual_out_row_stride + cols, x, mask=mask)
        x = x.to(tl.float32)
    mean_square = tl.div_rn(tl.sum(x * x, axis=0), float(HIDDEN))
    # Correctly rounded sqrt and division: torch's CPU rsqrt is 1 / sqrt with both ops exact.
    inv_rms = tl.div_rn(1.0, tl.sqrt_rn(mean_square + eps))
    normed = (x * inv_rms).to(dtype)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    out = (weight.to(tl.float32) * normed.to(tl.float32)).to(dtype)
    tl.store(out_ptr + row * out_row_stride + cols, out, mask=mask)


def _launch_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    _require(x.dim() == 2, f"x must be [tokens, hidden], got shape {tuple(x.shape)}")
    _require(weight.shape == (x.shape[1],), f"weight must be [{x.shape[1]}], got shape {tuple(weight.shape)}")
    _require_unit_last_stride("x", x)
    _require(weight.is_contiguous(), "weight must be contiguous")
    if residual is not None:
        _require(residual.shape == x.shape, f"residual shape {tuple(residual.shape)} != x {tuple(x.shape)}")
        _require(residual.dtype == x.dtype, f"residual dtype {residual.dtype} != x dtype {x.dtype}")
        _require_unit_last_stride("residual", residual)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    residual_out = torch.empty_like(out) if residual is not None else None
    tokens, hidden = x.shape
    if tokens == 0:
        return out, residual_out
    block = triton.next_power_of_2(hidden)
    _rms_norm_kernel[(tokens,)](
        x,
        residual if residual is not None else x,
        weight,
        out,
        residual_out if residual_out is not None else out,
        x.stride(0),
        residual.stride(0) if residual is not None else 0,
        out.stride(0),
        residual_out.stride(0) if residual_out is not None else 0,
        eps,
        HIDDEN=hidden,
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        num_warps=_row_warps(block),
        enable_fp_fusion=False,
    )
    return out, residual_out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, H] -> RMSNorm(x) * weight [T, H] in x.dtype, as norm.RMSNorm computes it."""
    out, _ = _launch_rms_norm(x, None, weight, eps)
    return out


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [T, H] -> (RMSNorm(s) * weight, s) with s = x + residual rounded to x.dtype: the
    decoder layer's residual add and the next norm in one pass."""
    out, summed = _launch_rms_norm(x, residual, weight, eps)
    assert summed is not None
    return out, summed


# --- Rotary (neox style), q and k of a token in one program, in place --------------------------


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


def check_rotary_inputs(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """q [T, Hq, D], k [T, Hk, D] (strided, unit last stride, one dtype) and cos/sin [T, D]."""
    _require(
        q.dim() == 3 and k.dim() == 3, f"q, k must be [T, heads, D], got {tuple(q.shape)}, {tuple(k.shape)}"
    )
    tokens, _, head_dim = q.shape
    _require(
        k.shape[0] == tokens and k.shape[2] == head_dim,
        f"k {tuple(k.shape)} does not match q {tuple(q.shape)}",
    )
    _require(head_dim % 2 == 0, f"head_dim must be even, got {head_dim}")
    for name, angles in (("cos", cos), ("sin", sin)):
        _require(
            angles.shape == (tokens, head_dim),
            f"{name} must be [{tokens}, {head_dim}], got {tuple(angles.shape)}",
        )
        _require_unit_last_stride(name, angles)
    _require_unit_last_stride("q", q)
    _require_unit_last_stride("k", k)
    _require(q.dtype == k.dtype, f"q dtype {q.dtype} != k dtype {k.dtype}")


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q [T, Hq, D] and k [T, Hk, D] IN PLACE by cos/sin [T, D] (neox style, as rotary.py's
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


# --- SiLU(gate) * up -------------------------------------------------------------------------


@triton.jit
def _silu_and_mul_kernel(
    gate_up_ptr,  # [T, 2I]: gate then up
    out_ptr,  # [T, I]
    gate_up_row_stride,
    out_row_stride,
    INTERMEDIATE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < INTERMEDIATE
    gate_ptr = gate_up_ptr + row * gate_up_row_stride + cols
    gate = tl.load(gate_ptr, mask=mask, other=0.0)
    up = tl.load(gate_ptr + INTERMEDIATE, mask=mask, other=0.0)
    dtype = gate.dtype
    gate = gate.to(tl.float32)
    silu = tl.div_rn(gate, 1.0 + tl.exp(-gate)).to(dtype)  # rounded, as F.silu's output
    tl.store(
        out_ptr + row * out_row_stride + cols, (silu.to(tl.float32) * up.to(tl.float32)).to(dtype), mask=mask
    )


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2I] -> silu(gate) * up [T, I]."""
    _require(
        gate_up.dim() == 2 and gate_up.shape[1] % 2 == 0,
        f"gate_up must be [T, 2I], got {tuple(gate_up.shape)}",
    )
    _require_unit_last_stride("gate_up", gate_up)
    tokens, intermediate = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty((tokens, intermediate), dtype=gate_up.dtype, device=gate_up.device)
    if tokens == 0:
        return out
    # Column blocks as well as rows, so a batch of one still spreads over many SMs.
    block = min(triton.next_power_of_2(intermediate), 1024)
    _silu_and_mul_kernel[(tokens, triton.cdiv(intermediate, block))](
        gate_up, out, gate_up.stride(0), out.stride(0), INTERMEDIATE=intermediate, BLOCK=block, num_warps=4
    )
    return out


# The KV-cache write, alone or fused with rotary, lives in its own files; it is part of this module's API.
from trellis.runtime.kernels.kv_store_kernel import store_kv  # noqa: E402, F401
from trellis.runtime.kernels.rotary_kv_store_kernel import rotary_store_kv  # noqa: E402, F401
