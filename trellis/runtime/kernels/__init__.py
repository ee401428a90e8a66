"""Triton kernels of the GPU path: each small op of a layer becomes ONE kernel launch.

RMSNorm (alone or fused with the residual add), rotary, SiLU-and-mul and the KV-cache write (alone
or fused with rotary) are memory bound: one program reads a row once, computes in float32 and
writes once. Each kernel rounds to the model dtype at the same points as the PyTorch reference
(model/norm.py, model/rotary.py, ``F.silu(gate) * up``), and runs without FMA contraction, so
float32 results match the reference to the last bit or ulp and bfloat16 ones round the same way.
Paged decode attention reads a sequence's K/V through its block table. No kernel syncs with the
host or shapes anything by data, so all are CUDA-graph safe. Without CUDA they run in Triton's
interpreter (triton_setup.py), which is how the unit tests check them on CPU.

One kernel per file; the wrappers' input checks are in checks.py. This module only re-exports.
"""

from trellis.runtime.kernels.checks import KernelInputError
from trellis.runtime.kernels.kv_blocks import gather_blocks, scatter_blocks
from trellis.runtime.kernels.kv_store import store_kv
from trellis.runtime.kernels.norm import add_rms_norm, rms_norm
from trellis.runtime.kernels.paged_decode import paged_decode_attention
from trellis.runtime.kernels.rotary import apply_rotary
from trellis.runtime.kernels.rotary_kv_store import rotary_store_kv
from trellis.runtime.kernels.silu_gate import silu_and_mul

__all__ = [
    "KernelInputError",
    "add_rms_norm",
    "apply_rotary",
    "gather_blocks",
    "paged_decode_attention",
    "rms_norm",
    "rotary_store_kv",
    "scatter_blocks",
    "silu_and_mul",
    "store_kv",
]
