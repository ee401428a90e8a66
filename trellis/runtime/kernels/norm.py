"""RMSNorm as one Triton kernel, optionally fused with the residual add before it.

A program owns one row: y = weight * (x * rsqrt(mean(x^2) + eps)), computed in float32 with the
reference's roundings (model/norm.py): the normalized row is rounded to the model dtype before the
weight multiplies it. Fused, x is first replaced by s = x + residual rounded to the model dtype,
and s is written out too: the decoder layer's residual add and the next norm in one pass.
"""

from __future__ import annotations

import torch

from trellis.runtime.kernels.checks import check_rms_norm_inputs
from trellis.runtime.kernels.triton_setup import tl, triton


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


def _row_warps(block: int) -> int:
    """Warps for a program that owns one row of ``block`` elements: 1 for tiny rows, 4-8 for 4k-8k."""
    return min(max(block // 1024, 1), 8)


def _launch_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    check_rms_norm_inputs(x, residual, weight)
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
    """x [T, H] -> RMSNorm(x) * weight [T, H] in x.dtype, as model/norm.py's RMSNorm computes it."""
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
