"""What the kernel wrappers accept: every input check, each failure a KernelInputError in one line.

A kernel trusts its pointers and strides, so a wrong shape, dtype or layout would read or write
the wrong memory silently; the wrappers check first, on the host, from shapes and dtypes only (no
device sync, so the checks are CUDA-graph safe too).
"""

from __future__ import annotations

import torch


class KernelInputError(ValueError):
    """A tensor handed to a kernel wrapper has the wrong shape, dtype or layout, told in one line."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise KernelInputError(message)


def require_unit_last_stride(name: str, t: torch.Tensor) -> None:
    require(t.stride(-1) == 1, f"{name} must be contiguous in its last dim, got strides {t.stride()}")


def check_rms_norm_inputs(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor) -> None:
    """x [T, H] and residual [T, H] (same dtype) with unit last strides; weight [H] contiguous."""
    require(x.dim() == 2, f"x must be [tokens, hidden], got shape {tuple(x.shape)}")
    require(weight.shape == (x.shape[1],), f"weight must be [{x.shape[1]}], got shape {tuple(weight.shape)}")
    require_unit_last_stride("x", x)
    require(weight.is_contiguous(), "weight must be contiguous")
    if residual is not None:
        require(residual.shape == x.shape, f"residual shape {tuple(residual.shape)} != x {tuple(x.shape)}")
        require(residual.dtype == x.dtype, f"residual dtype {residual.dtype} != x dtype {x.dtype}")
        require_unit_last_stride("residual", residual)


def check_rotary_inputs(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """q [T, Hq, D], k [T, Hk, D] (strided, unit last stride, one dtype) and cos/sin [T, D]."""
    require(
        q.dim() == 3 and k.dim() == 3, f"q, k must be [T, heads, D], got {tuple(q.shape)}, {tuple(k.shape)}"
    )
    tokens, _, head_dim = q.shape
    require(
        k.shape[0] == tokens and k.shape[2] == head_dim,
        f"k {tuple(k.shape)} does not match q {tuple(q.shape)}",
    )
    require(head_dim % 2 == 0, f"head_dim must be even, got {head_dim}")
    for name, angles in (("cos", cos), ("sin", sin)):
        require(
            angles.shape == (tokens, head_dim),
            f"{name} must be [{tokens}, {head_dim}], got {tuple(angles.shape)}",
        )
        require_unit_last_stride(name, angles)
    require_unit_last_stride("q", q)
    require_unit_last_stride("k", k)
    require(q.dtype == k.dtype, f"q dtype {q.dtype} != k dtype {k.dtype}")


def check_silu_and_mul_inputs(gate_up: torch.Tensor) -> None:
    """gate_up [T, 2I] (gate then up) with a unit last stride."""
    require(
        gate_up.dim() == 2 and gate_up.shape[1] % 2 == 0,
        f"gate_up must be [T, 2I], got {tuple(gate_up.shape)}",
    )
    require_unit_last_stride("gate_up", gate_up)


def check_store_kv_inputs(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """k, v [T, Hk, D], caches [blocks, block_size, Hk, D], slot_mapping [T] int64; unit last strides."""
    require(
        k.dim() == 3 and k.shape == v.shape,
        f"k, v must be equal [T, Hk, D], got {tuple(k.shape)}, {tuple(v.shape)}",
    )
    require(
        k_cache.dim() == 4 and k_cache.shape == v_cache.shape and k_cache.shape[2:] == k.shape[1:],
        f"caches {tuple(k_cache.shape)}, {tuple(v_cache.shape)} must be [blocks, block_size, Hk, D] "
        f"with Hk, D = {tuple(k.shape[1:])}",
    )
    require(
        slot_mapping.shape == (k.shape[0],) and slot_mapping.dtype == torch.int64,
        f"slot_mapping must be int64 [{k.shape[0]}], got {slot_mapping.dtype} {tuple(slot_mapping.shape)}",
    )
    for name, t in (("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        require_unit_last_stride(name, t)


def check_paged_decode_inputs(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    sliding_window: int | None,
    out: torch.Tensor | None,
) -> None:
    """q [B, Hq, D], caches [blocks, block_size, Hk, D] (Hq a multiple of Hk, one dtype, same
    strides), block_tables [B, W] int32, context_lens [B] int32, out None or like q."""
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
        require_unit_last_stride(name, t)
    require(
        out is None or (out.shape == q.shape and out.dtype == q.dtype and out.stride(-1) == 1),
        f"out must be {q.dtype} {tuple(q.shape)} with unit last stride",
    )
