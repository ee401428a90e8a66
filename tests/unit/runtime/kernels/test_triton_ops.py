"""The fused Triton kernels (RMSNorm, add + RMSNorm, rotary, SiLU-and-mul, KV store, rotary + KV
store) against the plain PyTorch reference path. On CPU they run in Triton's interpreter, in float32
(the interpreter truncates float32 -> bfloat16 instead of rounding, so bfloat16 is checked against
the reference on GPU only: tests/gpu/test_triton_ops_gpu.py reuses the ``check_*`` helpers below)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # must be set before triton is first imported
pytest.importorskip("triton")

from trellis.runtime import kernels
from trellis.runtime.model.norm import RMSNorm
from trellis.runtime.model.rotary import RotaryEmbedding, apply_rotary

DEVICE = torch.device("cpu")
EPS = 1e-5


def reference_norm(weight: torch.Tensor) -> RMSNorm:
    norm = RMSNorm(weight.shape[0], eps=EPS, dtype=weight.dtype).to(weight.device)
    norm.weight.data.copy_(weight)
    return norm


def check_rms_norm(device: torch.device, dtype: torch.dtype, *, rtol: float, atol: float) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 100, generator=gen).to(device, dtype)  # hidden not a power of 2
    weight = torch.randn(100, generator=gen).to(device, dtype)
    expected = reference_norm(weight)(x)
    got = kernels.rms_norm(x, weight, EPS)
    assert got.dtype == dtype and got.shape == x.shape
    torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)


def check_add_rms_norm(device: torch.device, dtype: torch.dtype, *, rtol: float, atol: float) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 96, generator=gen).to(device, dtype)
    residual = torch.randn(6, 96, generator=gen).to(device, dtype)
    weight = torch.randn(96, generator=gen).to(device, dtype)
    x_before, residual_before = x.clone(), residual.clone()
    out, summed = kernels.add_rms_norm(x, residual, weight, EPS)
    assert torch.equal(summed, x_before + residual_before)  # one rounding of the sum, as the reference
    torch.testing.assert_close(out, reference_norm(weight)(x_before + residual_before), rtol=rtol, atol=atol)
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before)  # inputs untouched


def check_rotary(device: torch.device, dtype: torch.dtype, *, rtol: float, atol: float) -> None:
    tokens, q_heads, kv_heads, head_dim = 5, 6, 2, 16
    gen = torch.Generator().manual_seed(2)
    # q and k are strided views of the fused qkv output, as the attention layer hands them over.
    qkv = torch.randn(tokens, (q_heads + 2 * kv_heads) * head_dim, generator=gen).to(device, dtype)
    q = qkv[:, : q_heads * head_dim].view(tokens, q_heads, head_dim)
    k = qkv[:, q_heads * head_dim : (q_heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    v_before = qkv[:, (q_heads + kv_heads) * head_dim :].clone()
    positions = torch.tensor([0, 3, 17, 200, 4095], device=device)
    cos, sin = RotaryEmbedding(head_dim, 500000.0, None).to(device)(positions, dtype)
    expected_q, expected_k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    got_q, got_k = kernels.apply_rotary(q, k, cos, sin)
    assert got_q.data_ptr() == q.data_ptr() and got_k.data_ptr() == k.data_ptr()  # in place
    torch.testing.assert_close(got_q, expected_q, rtol=rtol, atol=atol)
    torch.testing.assert_close(got_k, expected_k, rtol=rtol, atol=atol)
    assert torch.equal(qkv[:, (q_heads + kv_heads) * head_dim :], v_before)  # v untouched


def check_silu_and_mul(device: torch.device, dtype: torch.dtype, *, rtol: float, atol: float) -> None:
    gen = torch.Generator().manual_seed(3)
    wide = 4 * torch.randn(4, 2 * 40 + 8, generator=gen).to(device, dtype)
    gate_up = wide[:, 8:]  # strided rows: row stride 88, 2I = 80
    gate, up = gate_up.chunk(2, dim=-1)
    got = kernels.silu_and_mul(gate_up)
    assert got.shape == (4, 40) and got.dtype == dtype
    torch.testing.assert_close(got, F.silu(gate) * up, rtol=rtol, atol=atol)


def check_store_kv(device: torch.device, dtype: torch.dtype, block_size: int) -> None:
    tokens, kv_heads, head_dim, num_blocks = 7, 2, 16, 6
    gen = torch.Generator().manual_seed(4)
    kv = torch.randn(tokens, 2 * kv_heads * head_dim + 4, generator=gen).to(device, dtype)
    k = kv[:, : kv_heads * head_dim].view(tokens, kv_heads, head_dim)  # strided views
    v = kv[:, kv_heads * head_dim : 2 * kv_heads * head_dim].view(tokens, kv_heads, head_dim)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens].to(device)
    slots[3] = -1  # a padding row: must write nothing
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(device, dtype)
    v_cache = torch.randn(shape, generator=gen).to(device, dtype)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    keep = slots >= 0
    expected_k.view(-1, kv_heads, head_dim)[slots[keep]] = k[keep]
    expected_v.view(-1, kv_heads, head_dim)[slots[keep]] = v[keep]
    kernels.store_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


def qkv_views(
    qkv: torch.Tensor, q_heads: int, kv_heads: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v [T, heads, D] as the attention layer makes them: strided views of the qkv output."""
    sizes = [q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
    q, k, v = qkv.split(sizes, dim=-1)
    return tuple(t.view(qkv.shape[0], -1, head_dim) for t in (q, k, v))


def check_rotary_store_kv(
    device: torch.device,
    dtype: torch.dtype,
    *,
    block_size: int,
    q_heads: int = 6,
    kv_heads: int = 2,
    head_dim: int = 16,
    cache_dtype: torch.dtype | None = None,
    rtol: float,
    atol: float,
) -> None:
    """The fused kernel against the PyTorch reference (rotary.py, then an indexed cache write)
    within (rtol, atol), and against the two kernels it replaces (apply_rotary, then store_kv)
    bit for bit, in any dtype: same roundings, same casts."""
    tokens, num_blocks = 7, 8
    cache_dtype = cache_dtype or dtype
    gen = torch.Generator().manual_seed(7)
    qkv = torch.randn(tokens, (q_heads + 2 * kv_heads) * head_dim, generator=gen).to(device, dtype)
    positions = torch.tensor([0, 3, 17, 200, 4095, 1, 9], device=device)
    cos, sin = RotaryEmbedding(head_dim, 500000.0, None).to(device)(positions, dtype)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens].to(device)
    slots[3] = -1  # a padding row: rotated like the others, but nothing goes to the cache
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(device, cache_dtype)
    v_cache = torch.randn(shape, generator=gen).to(device, cache_dtype)

    ref_q, ref_k, ref_v = qkv_views(qkv.clone(), q_heads, kv_heads, head_dim)
    expected_q, expected_k = apply_rotary(ref_q, cos, sin), apply_rotary(ref_k, cos, sin)
    expected_k_cache, expected_v_cache = k_cache.clone(), v_cache.clone()
    keep = slots >= 0
    expected_k_cache.view(-1, kv_heads, head_dim)[slots[keep]] = expected_k[keep].to(cache_dtype)
    expected_v_cache.view(-1, kv_heads, head_dim)[slots[keep]] = ref_v[keep].to(cache_dtype)

    two_kernels = qkv.clone()
    two_k_cache, two_v_cache = k_cache.clone(), v_cache.clone()
    q2, k2, v2 = qkv_views(two_kernels, q_heads, kv_heads, head_dim)
    kernels.apply_rotary(q2, k2, cos, sin)
    kernels.store_kv(k2, v2, two_k_cache, two_v_cache, slots)

    q, k, v = qkv_views(qkv, q_heads, kv_heads, head_dim)
    got_q, got_k = kernels.rotary_store_kv(q, k, v, cos, sin, k_cache, v_cache, slots)
    assert got_q.data_ptr() == q.data_ptr() and got_k.data_ptr() == k.data_ptr()  # in place
    assert torch.equal(qkv, two_kernels)  # q, k rotated as apply_rotary does; v untouched
    assert torch.equal(k_cache, two_k_cache) and torch.equal(v_cache, two_v_cache)
    torch.testing.assert_close(got_q, expected_q, rtol=rtol, atol=atol)
    torch.testing.assert_close(got_k, expected_k, rtol=rtol, atol=atol)
    assert torch.equal(v, ref_v)
    torch.testing.assert_close(k_cache, expected_k_cache, rtol=rtol, atol=atol)
    assert torch.equal(v_cache, expected_v_cache)  # v is only copied


def test_rms_norm_matches_reference() -> None:
    check_rms_norm(DEVICE, torch.float32, rtol=1e-6, atol=1e-6)


def test_add_rms_norm_matches_reference() -> None:
    check_add_rms_norm(DEVICE, torch.float32, rtol=1e-6, atol=1e-6)


def test_norms_bit_exact_when_sums_are_exact() -> None:
    # Integer inputs make every sum of squares exact in any order, so only the per-element math is
    # left: it must round exactly as the reference (same sqrt, division, casts and multiply order).
    gen = torch.Generator().manual_seed(5)
    x = torch.randint(-8, 9, (4, 80), generator=gen).float()
    residual = torch.randint(-8, 9, (4, 80), generator=gen).float()
    weight = torch.randn(80, generator=gen)
    norm = reference_norm(weight)
    assert torch.equal(kernels.rms_norm(x, weight, EPS), norm(x))
    out, summed = kernels.add_rms_norm(x, residual, weight, EPS)
    assert torch.equal(summed, x + residual) and torch.equal(out, norm(x + residual))


def test_rms_norm_on_strided_rows_and_empty_batch() -> None:
    gen = torch.Generator().manual_seed(6)
    wide = torch.randn(3, 70, generator=gen)
    weight = torch.randn(64, generator=gen)
    x = wide[:, 3:67]  # row stride 70
    torch.testing.assert_close(
        kernels.rms_norm(x, weight, EPS), reference_norm(weight)(x), rtol=1e-6, atol=1e-6
    )
    assert kernels.rms_norm(torch.empty(0, 64), weight, EPS).shape == (0, 64)


def test_rotary_matches_reference_in_place() -> None:
    check_rotary(DEVICE, torch.float32, rtol=0, atol=0)  # same roundings, no FMA: bit-exact


def test_silu_and_mul_matches_reference() -> None:
    check_silu_and_mul(DEVICE, torch.float32, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("block_size", [8, 16])
def test_store_kv_writes_slots_and_skips_padding(block_size: int) -> None:
    check_store_kv(DEVICE, torch.float32, block_size)


@pytest.mark.parametrize(
    "block_size, q_heads, kv_heads, head_dim",
    [(8, 6, 2, 16), (16, 8, 1, 16), (32, 4, 4, 24), (1, 6, 3, 16)],
    ids=["gqa3-block8", "gqa8-block16", "mha-block32-d24", "block1"],
)
def test_rotary_store_kv_matches_reference(
    block_size: int, q_heads: int, kv_heads: int, head_dim: int
) -> None:
    check_rotary_store_kv(
        DEVICE,
        torch.float32,
        block_size=block_size,
        q_heads=q_heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        rtol=0,  # same roundings, no FMA: bit-exact
        atol=0,
    )


@pytest.mark.parametrize("dtype, cache_dtype", [(torch.bfloat16, None), (torch.float32, torch.float16)])
def test_rotary_store_kv_matches_the_two_kernels_in_other_dtypes(
    dtype: torch.dtype, cache_dtype: torch.dtype | None
) -> None:
    # The interpreter's float32 -> bfloat16 cast truncates, so the PyTorch reference is only
    # loosely comparable here (tests/gpu checks it tightly); the two kernels it replaces round
    # exactly as it does, in any dtype and with a cache of another dtype.
    check_rotary_store_kv(DEVICE, dtype, block_size=16, cache_dtype=cache_dtype, rtol=2e-2, atol=2e-2)


def test_bad_inputs_raise_one_line_errors() -> None:
    x = torch.randn(2, 8)
    with pytest.raises(kernels.KernelInputError, match="weight must be"):
        kernels.rms_norm(x, torch.randn(9), EPS)
    with pytest.raises(kernels.KernelInputError, match="residual dtype"):
        kernels.add_rms_norm(x, x.double(), torch.randn(8), EPS)
    with pytest.raises(kernels.KernelInputError, match="cos must be"):
        kernels.apply_rotary(torch.randn(2, 4, 8), torch.randn(2, 2, 8), torch.randn(2, 4), torch.randn(2, 8))
    with pytest.raises(kernels.KernelInputError, match="gate_up must be"):
        kernels.silu_and_mul(torch.randn(2, 7))
    k = torch.randn(3, 2, 8)
    cache = torch.zeros(4, 16, 2, 8)
    with pytest.raises(kernels.KernelInputError, match="slot_mapping must be int64"):
        kernels.store_kv(k, k, cache, cache, torch.zeros(3, dtype=torch.int32))
    angles = torch.randn(3, 8)
    with pytest.raises(kernels.KernelInputError, match="slot_mapping must be int64"):
        kernels.rotary_store_kv(
            torch.randn(3, 4, 8), k, k, angles, angles, cache, cache, torch.zeros(3, dtype=torch.int32)
        )
    with pytest.raises(kernels.KernelInputError, match="sin must be"):
        kernels.rotary_store_kv(
            torch.randn(3, 4, 8), k, k, angles, angles[:2], cache, cache, torch.zeros(3, dtype=torch.int64)
        )
