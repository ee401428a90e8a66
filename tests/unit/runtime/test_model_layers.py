"""The building blocks: rotary and RMSNorm against transformers, and the TP layers' weight loaders
(each rank's shard, reassembled over the ranks, gives back the checkpoint tensor). Collectives across
ranks are exercised in tests/integration/test_tp_runner.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

from trellis.core.errors import ModelError
from trellis.core.model_config import load_model_config
from trellis.runtime.model.embedding import ParallelLMHead, VocabParallelEmbedding, padded_vocab_size
from trellis.runtime.model.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from trellis.runtime.model.norm import RMSNorm
from trellis.runtime.model.parallel import TPGroup
from trellis.runtime.model.rotary import RotaryEmbedding, apply_rotary

F32 = torch.float32
ROPES = [
    None,
    {"rope_type": "linear", "factor": 4.0},
    {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def ranks(size: int) -> list[TPGroup]:
    # Building and loading a shard needs no collective, so no process group here.
    return [TPGroup(rank, size) for rank in range(size)]


@pytest.mark.parametrize("rope", ROPES)
def test_rotary_matches_transformers(rope: dict | None) -> None:
    hf_cfg = LlamaConfig(
        hidden_size=128, num_attention_heads=4, rope_scaling=rope, max_position_embeddings=512
    )
    hf = LlamaRotaryEmbedding(hf_cfg)
    cfg = load_model_config({**hf_cfg.to_dict(), "architectures": ["LlamaForCausalLM"]})
    ours = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    assert torch.allclose(ours.inv_freq, hf.inv_freq, rtol=1e-6, atol=0)
    positions = torch.tensor([0, 1, 5, 63, 64, 300, 511])
    x = torch.randn(1, 4, len(positions), 32, generator=gen())  # HF layout [batch, heads, tokens, head_dim]
    hf_cos, hf_sin = hf(x, positions[None, :])
    cos, sin = ours(positions, F32)
    assert torch.allclose(cos, hf_cos[0], atol=1e-6) and torch.allclose(sin, hf_sin[0], atol=1e-6)
    want, _ = apply_rotary_pos_emb(x, x, hf_cos, hf_sin)
    got = apply_rotary(x[0].transpose(0, 1), cos, sin)  # ours: [tokens, heads, head_dim]
    assert torch.allclose(got, want[0].transpose(0, 1), atol=1e-6)


def test_rms_norm_matches_transformers() -> None:
    hf = LlamaRMSNorm(48, eps=1e-5)
    ours = RMSNorm(48, eps=1e-5, dtype=F32)
    weight = torch.randn(48, generator=gen())
    with torch.no_grad():
        hf.weight.copy_(weight)
    ours.weight.weight_loader(ours.weight, weight)
    x = torch.randn(5, 48, generator=gen(1)) * 3
    assert torch.allclose(ours(x), hf(x), atol=1e-6)


def test_column_and_row_shards_reassemble() -> None:
    w = torch.randn(12, 8, generator=gen())
    b = torch.randn(12, generator=gen(1))
    for tp in (1, 2, 4):
        cols = [ColumnParallelLinear(8, 12, bias=True, tp=g, dtype=F32) for g in ranks(tp)]
        for layer in cols:
            layer.weight.weight_loader(layer.weight, w)
            layer.bias.weight_loader(layer.bias, b)
        assert torch.equal(torch.cat([layer.weight for layer in cols]), w)
        assert torch.equal(torch.cat([layer.bias for layer in cols]), b)
        rows = [RowParallelLinear(12, 8, bias=True, tp=g, dtype=F32) for g in ranks(tp)]
        for layer in rows:
            layer.weight.weight_loader(layer.weight, w.T.contiguous())
            layer.bias.weight_loader(layer.bias, b[:8])
            assert torch.equal(layer.bias, b[:8])  # whole on every rank, added once after the reduce
        assert torch.equal(torch.cat([layer.weight for layer in rows], dim=1), w.T)


def test_single_rank_layers_compute_plain_linear() -> None:
    w, b = torch.randn(12, 8, generator=gen()), torch.randn(12, generator=gen(1))
    x = torch.randn(3, 8, generator=gen(2))
    col = ColumnParallelLinear(8, 12, bias=True, tp=TPGroup.single(), dtype=F32)
    row = RowParallelLinear(8, 12, bias=True, tp=TPGroup.single(), dtype=F32)
    for layer in (col, row):
        layer.weight.weight_loader(layer.weight, w)
        layer.bias.weight_loader(layer.bias, b)
        assert torch.allclose(layer(x), F.linear(x, w, b))


def test_merged_gate_up_shards() -> None:
    gate, up = torch.randn(16, 8, generator=gen()), torch.randn(16, 8, generator=gen(1))
    x = torch.randn(3, 8, generator=gen(2))
    outs_gate, outs_up = [], []
    for g in ranks(4):
        layer = MergedColumnParallelLinear(8, [16, 16], bias=False, tp=g, dtype=F32)
        layer.weight.weight_loader(layer.weight, gate, 0)
        layer.weight.weight_loader(layer.weight, up, 1)
        local_gate, local_up = layer(x).chunk(2, dim=-1)  # what the MLP does with it
        outs_gate.append(local_gate)
        outs_up.append(local_up)
    assert torch.allclose(torch.cat(outs_gate, dim=-1), x @ gate.T)
    assert torch.allclose(torch.cat(outs_up, dim=-1), x @ up.T)


@pytest.mark.parametrize(("tp", "heads", "kv_heads"), [(1, 8, 2), (2, 8, 2), (4, 8, 2), (8, 8, 2), (4, 8, 8)])
def test_qkv_shards_keep_each_q_head_with_its_kv_head(tp: int, heads: int, kv_heads: int) -> None:
    head_dim, hidden = 4, 16
    q = torch.randn(heads * head_dim, hidden, generator=gen())
    k = torch.randn(kv_heads * head_dim, hidden, generator=gen(1))
    v = torch.randn(kv_heads * head_dim, hidden, generator=gen(2))
    q_bias = torch.randn(heads * head_dim, generator=gen(3))
    group = heads // kv_heads  # q heads per kv head
    for g in ranks(tp):
        layer = QKVParallelLinear(hidden, head_dim, heads, kv_heads, bias=True, tp=g, dtype=F32)
        for shard_id, tensor in (("q", q), ("k", k), ("v", v)):
            layer.weight.weight_loader(layer.weight, tensor, shard_id)
        layer.bias.weight_loader(layer.bias, q_bias, "q")
        sizes = [layer.q_size, layer.kv_size, layer.kv_size]
        lq, lk, lv = layer.weight.split(sizes)  # rows: local q heads, then k, then v
        q_heads = lq.view(-1, head_dim, hidden)
        k_heads, v_heads = lk.view(-1, head_dim, hidden), lv.view(-1, head_dim, hidden)
        first_q = g.rank * (heads // tp)
        for i, head in enumerate(q_heads):
            global_q = first_q + i
            assert torch.equal(head, q.view(heads, head_dim, hidden)[global_q])
            # Local q head i uses local kv head i // local_group, which must be its global kv head.
            local_kv = i // (len(q_heads) // len(k_heads))
            assert torch.equal(k_heads[local_kv], k.view(kv_heads, head_dim, hidden)[global_q // group])
            assert torch.equal(v_heads[local_kv], v.view(kv_heads, head_dim, hidden)[global_q // group])
        want_bias = q_bias.view(heads, head_dim)[first_q : first_q + len(q_heads)].flatten()
        assert torch.equal(layer.bias.split(sizes)[0], want_bias)


def test_qkv_rejects_unknown_shard() -> None:
    layer = QKVParallelLinear(16, 4, 4, 4, bias=False, tp=TPGroup.single(), dtype=F32)
    with pytest.raises(ValueError, match="'q', 'k' or 'v'"):
        layer.weight.weight_loader(layer.weight, torch.zeros(16, 16), "x")


def test_shape_mismatch_is_a_model_error() -> None:
    layer = ColumnParallelLinear(8, 12, bias=False, tp=TPGroup.single(), dtype=F32)
    with pytest.raises(
        ModelError, match=r"shape mismatch: checkpoint gives \[12, 9\], model expects \[12, 8\]"
    ):
        layer.weight.weight_loader(layer.weight, torch.zeros(12, 9))


def test_padded_vocab_size() -> None:
    assert padded_vocab_size(1000, 1) == 1024
    assert padded_vocab_size(1000, 4) == 1024
    assert padded_vocab_size(1002, 2) == 1024
    assert padded_vocab_size(128256, 8) == 128512
    assert padded_vocab_size(64, 1) == 64


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_vocab_shards_reassemble_with_zero_padding(tp: int) -> None:
    table = torch.randn(1000, 8, generator=gen())
    shards = []
    for g in ranks(tp):
        emb = VocabParallelEmbedding(1000, 8, tp=g, dtype=F32)
        emb.weight.data.fill_(float("nan"))  # padding must be overwritten with zeros, not left as garbage
        emb.weight.weight_loader(emb.weight, table)
        shards.append(emb.weight)
    full = torch.cat(shards)
    assert full.shape == (1024, 8)
    assert torch.equal(full[:1000], table) and not full[1000:].any()


def test_single_rank_embedding_and_head() -> None:
    table = torch.randn(1000, 8, generator=gen())
    emb = VocabParallelEmbedding(1000, 8, tp=TPGroup.single(), dtype=F32)
    head = ParallelLMHead(1000, 8, tp=TPGroup.single(), dtype=F32)
    for module in (emb, head):
        module.weight.weight_loader(module.weight, table)
    ids = torch.tensor([0, 999, 5])
    assert torch.equal(emb(ids), table[ids])
    h = torch.randn(2, 8, generator=gen(1))
    logits = head(h)
    assert logits.shape == (2, 1000)  # padded columns dropped
    assert torch.allclose(logits, h @ table.T, atol=1e-5)
