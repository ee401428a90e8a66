"""The Triton paged decode attention kernel against the reference backend (TorchReferenceBackend):
random caches, shuffled block tables, context lengths 1, non-multiples of the block size and more
than one tile, GQA groups 1-8, sliding windows, split-K (combined in the same launch by the last
split, with counters that must be back at 0 after every launch), padding rows, and the decode
layer's rotary + KV store kernel feeding it over changing steps. On CPU it runs in Triton's
interpreter in float32; tests/gpu/test_triton_ops_gpu.py reuses the ``check_*`` helpers on CUDA."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # must be set before triton is first imported
pytest.importorskip("triton")

from tests.unit.runtime.kernels.test_triton_ops import qkv_views
from trellis.runtime.kernels import KernelInputError, paged_decode_attention, rotary_store_kv
from trellis.runtime.kernels.paged_decode import choose_num_splits, split_counters
from trellis.runtime.model.attention_backend import TorchReferenceBackend
from trellis.runtime.model.attention_metadata import build_attention_metadata
from trellis.runtime.model.rotary import RotaryEmbedding, apply_rotary

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
    case: DecodeCase,
    device: torch.device,
    dtype: torch.dtype,
    *,
    rtol: float,
    atol: float,
    seed: int = 0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    meta, k_cache, v_cache, q, k, v = decode_inputs(case, device, dtype, seed)
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
        out=out,
        num_splits=case.num_splits,
    )
    assert got.shape == q.shape and got.dtype == dtype
    torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)
    return got


def check_splits_twice(
    num_splits: int, device: torch.device, dtype: torch.dtype, *, rtol: float, atol: float
) -> None:
    """Forced split counts, two launches of one shape in a row into outputs filled with NaN: the
    last split of each (sequence, kv head) writes the output only if the counters started at 0,
    so the second launch passes only if the first put its counters back."""
    batch, kv_heads = 3, 2
    for seed, contexts in enumerate([(1, 150, 1100), (700, 3, 65)]):  # 1100: all 16 splits busy
        case = DecodeCase(contexts=contexts, group=4, kv_heads=kv_heads, num_splits=num_splits)
        out = torch.full((batch, 4 * kv_heads, case.head_dim), float("nan"), dtype=dtype, device=device)
        check_decode(case, device, dtype, rtol=rtol, atol=atol, seed=seed, out=out)
        assert not split_counters(device, batch * kv_heads).any()


def check_decode_layer_steps(
    device: torch.device,
    dtype: torch.dtype,
    *,
    num_splits: int | None,
    capture: Callable[[Callable[[], None]], Callable[[], None]],
    rtol: float,
    atol: float,
) -> None:
    """A decode layer's attention as the GPU path runs it (rotary + KV store in one kernel, then
    paged decode into a fixed output) made runnable by ``capture`` (a CUDA graph on GPU, the step
    itself on CPU) once, then run over 3 steps whose positions, slots, block tables and context
    lengths change in place: each against rotary.py + the reference backend on copies."""
    batch, q_heads, kv_heads, head_dim, block_size = 3, 8, 2, 16, 16
    steps = [(40, 90, 1), (7, 300, 61), (129, 2, 1000)]  # tokens attended per sequence
    width = max(-(-n // block_size) for contexts in steps for n in contexts)
    num_blocks = max(sum(-(-n // block_size) for n in contexts) for contexts in steps) + 2
    gen = torch.Generator().manual_seed(11)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(device, dtype)
    v_cache = torch.randn(shape, generator=gen).to(device, dtype)
    # The step's inputs, fixed in place as a captured graph needs them.
    qkv = torch.empty(batch, (q_heads + 2 * kv_heads) * head_dim, dtype=dtype, device=device)
    cos = torch.empty(batch, head_dim, dtype=dtype, device=device)
    sin = torch.empty_like(cos)
    slots = torch.empty(batch, dtype=torch.int64, device=device)
    block_tables = torch.zeros(batch, width, dtype=torch.int32, device=device)
    context_lens = torch.empty(batch, dtype=torch.int32, device=device)
    out = torch.empty(batch, q_heads, head_dim, dtype=dtype, device=device)
    rotary = RotaryEmbedding(head_dim, 10000.0, None).to(device)
    scale = head_dim**-0.5

    def step() -> None:
        q, k, v = qkv_views(qkv, q_heads, kv_heads, head_dim)
        rotary_store_kv(q, k, v, cos, sin, k_cache, v_cache, slots)
        paged_decode_attention(
            q, k_cache, v_cache, block_tables, context_lens, scale=scale, out=out, num_splits=num_splits
        )

    def load(contexts: tuple[int, ...]):
        order = torch.randperm(num_blocks, generator=gen).tolist()
        tables, used = [], 0
        for n in contexts:
            tables.append(order[used : used + -(-n // block_size)])
            used += len(tables[-1])
        meta = build_attention_metadata(
            [n - 1 for n in contexts], [1] * batch, tables, block_size=block_size, device=device
        )
        qkv.copy_(torch.randn(qkv.shape, generator=gen))
        step_cos, step_sin = rotary(meta.positions, dtype)
        cos.copy_(step_cos)
        sin.copy_(step_sin)
        slots.copy_(meta.slot_mapping)
        block_tables.zero_()
        block_tables[:, : meta.block_tables.shape[1]] = meta.block_tables
        context_lens.copy_(meta.context_lens)
        return meta

    load(steps[0])
    replay = capture(step)
    for contexts in steps:
        meta = load(contexts)
        q, k, v = qkv_views(qkv.clone(), q_heads, kv_heads, head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        expected_caches = (k_cache.clone(), v_cache.clone())
        reference = TorchReferenceBackend()
        reference.begin_step(meta)
        expected = reference.forward(q, k, v, expected_caches, scale=scale, sliding_window=None)
        out.fill_(float("nan"))
        replay()
        torch.testing.assert_close(out, expected, rtol=rtol, atol=atol)
        torch.testing.assert_close(k_cache, expected_caches[0], rtol=rtol, atol=atol)
        assert torch.equal(v_cache, expected_caches[1])
    assert not split_counters(device, batch * kv_heads).any()


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
    "split5_mha": DecodeCase(contexts=(1, 150, 300), group=1, num_splits=5),
    "split16_gqa8": DecodeCase(contexts=(2, 1100), group=8, kv_heads=1, num_splits=16),
    "split2_head_dim24": DecodeCase(contexts=(70, 129), head_dim=24, num_splits=2),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name: str) -> None:
    check_decode(CASES[name], DEVICE, torch.float32, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_splits", [1, 2, 3, 5, 16])
def test_forced_splits_match_reference_twice_in_a_row(num_splits: int) -> None:
    check_splits_twice(num_splits, DEVICE, torch.float32, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_splits", [1, 3, 16])
def test_rotary_store_then_decode_over_changing_steps(num_splits: int) -> None:
    # On CPU "capture" is the step itself: the same fixed buffers, refilled in place each step.
    check_decode_layer_steps(
        DEVICE, torch.float32, num_splits=num_splits, capture=lambda step: step, rtol=1e-5, atol=1e-5
    )


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
