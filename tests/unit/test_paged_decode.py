"""The Triton paged decode attention kernel against the reference backend (TorchReferenceBackend):
random caches, shuffled block tables, context lengths 1, non-multiples of the block size and more
than one tile, GQA groups 1-8, sliding windows, split-K, padding rows. On CPU it runs in Triton's
interpreter in float32; tests/gpu/test_triton_ops_gpu.py reuses ``check_decode`` on CUDA."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # must be set before triton is first imported
pytest.importorskip("triton")

from services.stage_worker.model.attention_backend import TorchReferenceBackend
from services.stage_worker.model.attention_metadata import build_attention_metadata
from services.stage_worker.model.paged_decode import choose_num_splits, paged_decode_attention
from services.stage_worker.model.triton_ops import KernelInputError

DEVICE = torch.device("cpu")


@dataclass(frozen=True)
class DecodeCase:
    contexts: tuple[int, ...] = (1, 37, 70)  # tokens attended per sequence, the current one included
    group: int = 2  # query heads per kv head
    kv_heads: int = 2
    head_dim: int = 16
    block_size: int = 16
    sliding_window: int | None = None
    num_splits: int | None = 1


def decode_inputs(case: DecodeCase, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """Random caches with shuffled block tables, this step's q/k/v, the step's metadata."""
    gen = torch.Generator().manual_seed(seed)
    needed = [-(-n // case.block_size) for n in case.contexts]
    num_blocks = sum(needed) + 3  # a few blocks nobody owns
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables, used = [], 0
    for n in needed:
        tables.append(order[used : used + n])
        used += n
    meta = build_attention_metadata(
        [n - 1 for n in case.contexts],
        [1] * len(case.contexts),
        tables,
        block_size=case.block_size,
        device=device,
    )
    shape = (num_blocks, case.block_size, case.kv_heads, case.head_dim)
    k_cache = torch.randn(shape, generator=gen).to(device, dtype)
    v_cache = torch.randn(shape, generator=gen).to(device, dtype)
    batch, q_heads = len(case.contexts), case.group * case.kv_heads
    q = torch.randn(batch, q_heads, case.head_dim, generator=gen).to(device, dtype)
    k = torch.randn(batch, case.kv_heads, case.head_dim, generator=gen).to(device, dtype)
    v = torch.randn(batch, case.kv_heads, case.head_dim, generator=gen).to(device, dtype)
    return meta, k_cache, v_cache, q, k, v


def check_decode(
    case: DecodeCase, device: torch.device, dtype: torch.dtype, *, rtol: float, atol: float
) -> torch.Tensor:
    meta, k_cache, v_cache, q, k, v = decode_inputs(case, device, dtype)
    scale = case.head_dim**-0.5
    reference = TorchReferenceBackend()
    reference.begin_step(meta)
    # The reference stores this step's k/v in the caches, as the kernel expects them to be.
    expected = reference.forward(q, k, v, (k_cache, v_cache), scale=scale, sliding_window=case.sliding_window)
    got = paged_decode_attention(
        q,
        k_cache,
        v_cache,
        meta.block_tables,
        meta.context_lens,
        scale=scale,
        sliding_window=case.sliding_window,
        num_splits=case.num_splits,
    )
    assert got.shape == q.shape and got.dtype == dtype
    torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)
    return got


CASES = {
    "mha": DecodeCase(group=1),
    "gqa2": DecodeCase(group=2),
    "gqa4": DecodeCase(group=4, kv_heads=1),
    "gqa8": DecodeCase(group=8, kv_heads=1),
    "block8": DecodeCase(block_size=8),
    "block32": DecodeCase(block_size=32, contexts=(1, 33, 95)),
    "head_dim24": DecodeCase(head_dim=24),
    "window": DecodeCase(group=4, sliding_window=20),
    "window1": DecodeCase(sliding_window=1),
    "split3": DecodeCase(contexts=(1, 150, 200), num_splits=3),
    "split4_window": DecodeCase(contexts=(9, 200), group=4, kv_heads=1, sliding_window=150, num_splits=4),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name: str) -> None:
    check_decode(CASES[name], DEVICE, torch.float32, rtol=1e-5, atol=1e-5)


def test_writes_into_strided_out_from_strided_q() -> None:
    case = DecodeCase()
    meta, k_cache, v_cache, q, k, v = decode_inputs(case, DEVICE, torch.float32, seed=1)
    reference = TorchReferenceBackend()
    reference.begin_step(meta)
    expected = reference.forward(q, k, v, (k_cache, v_cache), scale=0.3, sliding_window=None)
    batch, q_heads, head_dim = q.shape
    fused = torch.zeros(batch, q_heads + 3, head_dim)  # q as a view with a larger sequence stride
    fused[:, :q_heads] = q
    out_buffer = torch.full((batch, q_heads * head_dim + 5), -7.0)
    out = out_buffer[:, : q_heads * head_dim].view(batch, q_heads, head_dim)
    got = paged_decode_attention(
        fused[:, :q_heads], k_cache, v_cache, meta.block_tables, meta.context_lens, scale=0.3, out=out
    )
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert torch.all(out_buffer[:, q_heads * head_dim :] == -7.0)  # nothing written past the view


@pytest.mark.parametrize("num_splits", [1, 2])
def test_padding_rows_with_empty_context_give_zeros(num_splits: int) -> None:
    # A CUDA graph batch padded with rows that attend to nothing must stay finite (zeros).
    case = DecodeCase(contexts=(5, 21))
    meta, k_cache, v_cache, q, k, v = decode_inputs(case, DEVICE, torch.float32, seed=2)
    reference = TorchReferenceBackend()
    reference.begin_step(meta)
    expected = reference.forward(q, k, v, (k_cache, v_cache), scale=0.25, sliding_window=None)
    context_lens = meta.context_lens.clone()
    context_lens[0] = 0
    got = paged_decode_attention(
        q, k_cache, v_cache, meta.block_tables, context_lens, scale=0.25, num_splits=num_splits
    )
    assert torch.equal(got[0], torch.zeros_like(got[0]))
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-5)


def test_split_count_fills_the_gpu_from_shapes_only() -> None:
    # Batch 1 with 8 kv heads and a long table: split up to the cap; a full GPU: no split.
    assert choose_num_splits(batch=1, kv_heads=8, max_context=32768, num_sms=132) == 16
    assert choose_num_splits(batch=64, kv_heads=8, max_context=32768, num_sms=132) == 1
    # Short tables never get more splits than they have tiles to share.
    assert choose_num_splits(batch=1, kv_heads=8, max_context=512, num_sms=132) == 2
    assert choose_num_splits(batch=1, kv_heads=1, max_context=16, num_sms=132) == 1


def test_bad_inputs_raise_one_line_errors() -> None:
    meta, k_cache, v_cache, q, _, _ = decode_inputs(DecodeCase(), DEVICE, torch.float32)
    with pytest.raises(KernelInputError, match="no multiple"):
        paged_decode_attention(q[:, :3], k_cache, v_cache, meta.block_tables, meta.context_lens, scale=1.0)
    with pytest.raises(KernelInputError, match="block_tables must be int32"):
        paged_decode_attention(q, k_cache, v_cache, meta.block_tables.long(), meta.context_lens, scale=1.0)
    with pytest.raises(KernelInputError, match="sliding_window"):
        paged_decode_attention(
            q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale=1.0, sliding_window=0
        )
