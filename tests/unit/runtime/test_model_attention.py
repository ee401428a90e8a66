"""Paged KV cache sizing and slots, the step metadata, and the reference attention backend against
dense causal attention written out by hand (GQA, chunked steps, sliding window)."""

from __future__ import annotations

import random

import pytest
import torch

from trellis.core.model_config import load_model_config
from trellis.runtime.model.attention_backend import TorchReferenceBackend
from trellis.runtime.model.attention_metadata import build_attention_metadata
from trellis.runtime.model.kv_cache import KVCache, kv_cache_bytes_per_block, slot_of

BLOCK = 4
Q_HEADS, KV_HEADS, HEAD_DIM = 6, 2, 8


def small_cfg(kv_heads: int = 2):
    return load_model_config(
        {
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": 100,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 6,
            "num_attention_heads": 8,
            "num_key_value_heads": kv_heads,
        }
    )


def test_bytes_per_block() -> None:
    cfg = small_cfg()  # head_dim 8
    assert kv_cache_bytes_per_block(cfg, (0, 6), 1, 16, torch.float32) == 6 * 2 * 16 * 2 * 8 * 4
    assert kv_cache_bytes_per_block(cfg, (2, 5), 2, 16, torch.bfloat16) == 3 * 2 * 16 * 1 * 8 * 2
    # Four ranks over two kv heads: each rank still stores one whole (replicated) head.
    assert kv_cache_bytes_per_block(cfg, (0, 6), 4, 16, torch.float32) == 6 * 2 * 16 * 1 * 8 * 4


def test_cache_shapes_by_global_layer() -> None:
    cache = KVCache(
        small_cfg(),
        layers=(2, 5),
        tp=2,
        block_size=16,
        num_blocks=10,
        dtype=torch.float16,
        device=torch.device("cpu"),
    )
    k, v = cache.layer(4)
    assert k.shape == v.shape == (10, 16, 1, 8) and k.dtype == torch.float16
    assert len(cache.k) == 3 and cache.layer(2)[0] is cache.k[0]


def test_metadata_slots_follow_block_tables() -> None:
    tables = [[7, 2], [5], [1, 3, 0]]
    meta = build_attention_metadata(
        [2, 0, 9], [3, 1, 2], tables, block_size=BLOCK, device=torch.device("cpu")
    )
    assert meta.positions.tolist() == [2, 3, 4, 0, 9, 10]
    assert meta.slot_mapping.tolist() == [30, 31, 8, 20, 1, 2]
    assert meta.slot_mapping.tolist()[0] == slot_of(tables[0], 2, BLOCK)
    assert meta.query_start.tolist() == [0, 3, 4, 6]
    assert meta.context_lens.tolist() == [5, 1, 11]
    assert meta.block_tables.tolist() == [[7, 2, 0], [5, 0, 0], [1, 3, 0]]
    assert (meta.num_seqs, meta.num_tokens) == (3, 6)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None) -> torch.Tensor:
    """q [n, q_heads, d], k/v [n, kv_heads, d] of one whole sequence, causal, written out."""
    n = q.shape[0]
    k = k.repeat_interleave(Q_HEADS // KV_HEADS, dim=1)
    v = v.repeat_interleave(Q_HEADS // KV_HEADS, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / HEAD_DIM**0.5
    distance = torch.arange(n)[:, None] - torch.arange(n)[None, :]
    allowed = (distance >= 0) & ((distance < window) if window is not None else True)
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, v)


@pytest.mark.parametrize("window", [None, 5])
def test_reference_backend_matches_dense_attention_over_steps(window: int | None) -> None:
    g = torch.Generator().manual_seed(0)
    lengths, first_chunk = [1, 9, 17], [1, 4, 11]  # the second step feeds the rest (possibly nothing)
    qs = [torch.randn(n, Q_HEADS, HEAD_DIM, generator=g) for n in lengths]
    ks = [torch.randn(n, KV_HEADS, HEAD_DIM, generator=g) for n in lengths]
    vs = [torch.randn(n, KV_HEADS, HEAD_DIM, generator=g) for n in lengths]
    blocks = list(range(16))
    random.Random(0).shuffle(blocks)
    tables = [[blocks.pop() for _ in range(-(-n // BLOCK))] for n in lengths]
    k_cache = torch.full((16, BLOCK, KV_HEADS, HEAD_DIM), float("nan"))  # unwritten slots must never be read
    v_cache = torch.full_like(k_cache, float("nan"))
    backend = TorchReferenceBackend()
    got: list[list[torch.Tensor]] = [[] for _ in lengths]
    for step in range(2):
        live = [i for i, n in enumerate(lengths) if (first_chunk[i] if step == 0 else n - first_chunk[i]) > 0]
        spans = [(0, first_chunk[i]) if step == 0 else (first_chunk[i], lengths[i]) for i in live]
        meta = build_attention_metadata(
            [a for a, _ in spans],
            [b - a for a, b in spans],
            [tables[i] for i in live],
            block_size=BLOCK,
            device=torch.device("cpu"),
        )
        backend.begin_step(meta)
        q = torch.cat([qs[i][a:b] for i, (a, b) in zip(live, spans, strict=True)])
        k = torch.cat([ks[i][a:b] for i, (a, b) in zip(live, spans, strict=True)])
        v = torch.cat([vs[i][a:b] for i, (a, b) in zip(live, spans, strict=True)])
        out = backend.forward(q, k, v, (k_cache, v_cache), scale=HEAD_DIM**-0.5, sliding_window=window)
        for i, part in zip(live, out.split([b - a for a, b in spans]), strict=True):
            got[i].append(part)
    for i in range(len(lengths)):
        want = dense_attention(qs[i], ks[i], vs[i], window)
        assert torch.allclose(torch.cat(got[i]), want, atol=1e-5)
