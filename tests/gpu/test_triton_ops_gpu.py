"""The Triton decode-path kernels compiled for the GPU: the CPU unit tests' comparisons against the
PyTorch reference, on CUDA in bfloat16 and float32, plus paged decode at Llama shapes, split-K
chosen from the GPU's SM count or forced (combined in-kernel by the last split), and replay inside a
CUDA graph, alone and after the fused rotary + KV store kernel."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # collected first on CPU: keep the unit tests' interpreter mode
pytest.importorskip("triton")

from tests.unit.runtime.kernels.test_paged_decode import (
    CASES,
    DecodeCase,
    check_decode,
    check_decode_layer_steps,
    check_splits_twice,
    decode_inputs,
)
from tests.unit.runtime.kernels.test_triton_ops import (
    check_add_rms_norm,
    check_rms_norm,
    check_rotary,
    check_rotary_store_kv,
    check_silu_and_mul,
    check_store_kv,
)
from trellis.runtime.kernels import paged_decode_attention
from trellis.runtime.model.attention_backend import TorchReferenceBackend

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda")
# (rtol, atol) per dtype: float32 is ulp-close to the reference; bfloat16 within a rounding step.
ELEMENTWISE_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1.6e-2, 1e-2)}
ATTENTION_TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (2e-2, 2e-2)}  # p goes to bf16 for P @ V
DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_elementwise_kernels(dtype: torch.dtype) -> None:
    rtol, atol = ELEMENTWISE_TOL[dtype]
    check_rms_norm(CUDA, dtype, rtol=rtol, atol=atol)
    check_add_rms_norm(CUDA, dtype, rtol=rtol, atol=atol)
    check_rotary(CUDA, dtype, rtol=rtol, atol=atol)
    check_silu_and_mul(CUDA, dtype, rtol=rtol, atol=atol)
    for block_size in (8, 16, 32):
        check_store_kv(CUDA, dtype, block_size)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "block_size, q_heads, kv_heads, head_dim",
    [(8, 6, 2, 16), (16, 32, 8, 128), (32, 4, 4, 24), (16, 8, 1, 64)],
    ids=["gqa3-block8", "llama8b-block16", "mha-block32-d24", "gqa8-block16-d64"],
)
def test_rotary_store_kv(
    dtype: torch.dtype, block_size: int, q_heads: int, kv_heads: int, head_dim: int
) -> None:
    rtol, atol = ELEMENTWISE_TOL[dtype]
    check_rotary_store_kv(
        CUDA,
        dtype,
        block_size=block_size,
        q_heads=q_heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        rtol=rtol,
        atol=atol,
    )


def test_rotary_store_kv_into_a_cache_of_another_dtype() -> None:
    rtol, atol = ELEMENTWISE_TOL[torch.bfloat16]  # one float16 rounding of the float32 result
    check_rotary_store_kv(CUDA, torch.float32, block_size=16, cache_dtype=torch.float16, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_splits", [1, 2, 3, 5, 16])
def test_paged_decode_forced_splits_twice_in_a_row(num_splits: int, dtype: torch.dtype) -> None:
    rtol, atol = ATTENTION_TOL[dtype]
    check_splits_twice(num_splits, CUDA, dtype, rtol=rtol, atol=atol)


def capture_in_cuda_graph(step: Callable[[], None]) -> Callable[[], None]:
    """Runs step twice on a side stream (compiles, makes the split counters), then captures it."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay  # holds the graph


@pytest.mark.parametrize("num_splits", [None, 3, 16])
def test_rotary_store_and_decode_replay_in_a_cuda_graph(num_splits: int | None) -> None:
    # Three replays with new positions, slots, block tables and context lengths, each into an
    # output filled with NaN: a split counter left nonzero by a replay would leave NaN behind.
    check_decode_layer_steps(
        CUDA,
        torch.bfloat16,
        num_splits=num_splits,
        capture=capture_in_cuda_graph,
        rtol=ATTENTION_TOL[torch.bfloat16][0],
        atol=ATTENTION_TOL[torch.bfloat16][1],
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(CASES))
def test_paged_decode_cases(name: str, dtype: torch.dtype) -> None:
    rtol, atol = ATTENTION_TOL[dtype]
    check_decode(CASES[name], CUDA, dtype, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [None, 700])
def test_paged_decode_llama_shapes_default_splits(dtype: torch.dtype, window: int | None) -> None:
    # head_dim 128, 4 query heads per kv head, long contexts: split-K picked from the SM count.
    case = DecodeCase(
        contexts=(1, 300, 2500), group=4, kv_heads=2, head_dim=128, sliding_window=window, num_splits=None
    )
    rtol, atol = ATTENTION_TOL[dtype]
    check_decode(case, CUDA, dtype, rtol=rtol, atol=atol)


def test_paged_decode_replays_in_a_cuda_graph() -> None:
    # Capture once, then change context lengths and block tables in place: the replay must follow.
    case = DecodeCase(contexts=(40, 90), group=4, kv_heads=2, head_dim=128, num_splits=None)
    meta, k_cache, v_cache, q, k, v = decode_inputs(case, CUDA, torch.bfloat16)
    reference = TorchReferenceBackend()
    reference.begin_step(meta)
    expected_first = reference.forward(q, k, v, (k_cache, v_cache), scale=0.1, sliding_window=None)
    block_tables, context_lens = meta.block_tables.clone(), meta.context_lens.clone()
    out = torch.empty_like(q)

    def step() -> None:
        paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale=0.1, out=out)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    torch.testing.assert_close(out, expected_first, rtol=2e-2, atol=2e-2)

    shorter = DecodeCase(contexts=(7, 61), group=4, kv_heads=2, head_dim=128)
    meta2, _, _, _, _, _ = decode_inputs(shorter, CUDA, torch.bfloat16, seed=5)
    block_tables.zero_()
    block_tables[:, : meta2.block_tables.shape[1]] = meta2.block_tables
    context_lens.copy_(meta2.context_lens)
    reference.begin_step(meta2)
    # The reference stores this step's k/v at the new slots of the same caches before attending.
    expected_second = reference.forward(q, k, v, (k_cache, v_cache), scale=0.1, sliding_window=None)
    graph.replay()
    torch.testing.assert_close(out, expected_second, rtol=2e-2, atol=2e-2)
