"""SiLU(gate) * up, the gated MLP's activation, as one Triton kernel.

gate_up [T, 2I] holds gate then up per row; out [T, I] = silu(gate) * up with
silu(g) = g / (1 + exp(-g)) rounded to the model dtype before the multiply, as F.silu's output is.
"""

from __future__ import annotations

import torch

from trellis.runtime.kernels.checks import check_silu_and_mul_inputs
from trellis.runtime.kernels.triton_setup import tl, triton


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
    check_silu_and_mul_inputs(gate_up)
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
