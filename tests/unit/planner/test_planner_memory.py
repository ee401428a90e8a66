"""The memory model against hand-computed figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trellis.planner.errors import PlanError
from trellis.planner.hardware import cluster_from_args
from trellis.planner.layout import Layout, split_layers
from trellis.planner.memory import Budget, replica_memory, stage_weight_bytes
from trellis.planner.model import load_model

MIB = 1024 * 1024


def test_llama3_70b_weights_and_kv_per_token() -> None:
    m = load_model("llama-3-70b")
    # Per layer: q 8192x8192, k and v 8192x1024 each, o 8192x8192, MLP 3 x 8192x28672, two norms.
    per_layer = 8192 * 8192 * 2 + 2 * 8192 * 1024 + 3 * 8192 * 28672 + 2 * 8192
    total = 80 * per_layer + 2 * 128256 * 8192 + 8192  # + embedding, LM head, final norm
    assert m.total_params() == total == 70_553_706_496
    assert m.weight_bytes("bf16") == 2 * total  # "about 141 GB"
    assert round(m.weight_bytes("bf16") / 1e9, 1) == 141.1
    assert m.kv_bytes_per_token(2) == 2 * 80 * 8 * 128 * 2 == 327_680


def test_other_presets_parameter_counts() -> None:
    assert load_model("llama-3-8b").total_params() == 8_030_261_248
    assert load_model("mistral-7b").total_params() == 7_241_732_096
    # Qwen2 has q/k/v biases: 80 x (8192 + 2 x 1024) more than the same shape without.
    q = load_model("qwen2-72b")
    assert q.qkv_bias and q.total_params() == 72_706_203_648


def test_fp8_halves_only_the_layer_matrices() -> None:
    m = load_model("llama-3-70b")
    linear = 80 * (8192 * 8192 * 2 + 2 * 8192 * 1024 + 3 * 8192 * 28672)
    assert m.weight_bytes("fp8") == linear + 2 * (m.total_params() - linear)


def test_kv_per_gpu_is_gqa_aware() -> None:
    m = load_model("llama-3-70b")  # 8 KV heads
    assert [m.kv_bytes_per_token(2, tp=t) for t in (1, 2, 4, 8)] == [327_680, 163_840, 81_920, 40_960]
    # Past 8 ranks each rank keeps one (replicated) KV head: no further saving.
    assert m.kv_bytes_per_token(2, tp=16) == 40_960
    assert m.kv_bytes_per_token(2, layers=20, tp=4) == 2 * 20 * 2 * 128 * 2


def test_tp8_weights_per_gpu() -> None:
    m = load_model("llama-3-70b")
    vocab_slice = 128256 // 8 * 8192 * 2
    expected = 80 * 855_638_016 // 8 * 2 + 80 * 2 * 8192 * 2 + 2 * vocab_slice + 8192 * 2
    assert stage_weight_bytes(m, "bf16", (0, 80), 8, 1, True, True) == expected


def test_pipeline_stages_partition_the_weights() -> None:
    m = load_model("llama-3-8b")
    for pp in (1, 2, 3, 5):
        stages = split_layers(m.layers, pp)
        total = sum(
            stage_weight_bytes(m, "bf16", r, 1, pp, j == 0, j == pp - 1) for j, r in enumerate(stages)
        )
        assert total == m.weight_bytes("bf16")


def test_tied_lm_head_is_a_second_copy_only_across_stages(tmp_path: Path) -> None:
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 4,
        "vocab_size": 1000,
        "max_position_embeddings": 256,
        "tie_word_embeddings": True,
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    m = load_model(str(tmp_path))
    embed = 1000 * 64 * 2
    one = stage_weight_bytes(m, "bf16", (0, 4), 1, 1, True, True)
    two = sum(
        stage_weight_bytes(m, "bf16", r, 1, 2, j == 0, j == 1) for j, r in enumerate(split_layers(4, 2))
    )
    assert one == m.weight_bytes("bf16")
    assert two == one + embed


def test_split_layers_is_balanced_with_extras_first() -> None:
    assert split_layers(80, 3) == ((0, 27), (27, 54), (54, 80))
    assert split_layers(126, 4) == ((0, 32), (32, 64), (64, 95), (95, 126))
    assert split_layers(5, 5) == tuple((i, i + 1) for i in range(5))


def test_70b_fp16_on_one_h100_is_short_by_the_hand_computed_amount() -> None:
    m = load_model("llama-3-70b")
    gpu = cluster_from_args("h100-sxm", 1, 1).gpu
    budget = Budget(gpu.memory_bytes, 0.85, "fp16", 2, 2048, 1024, 1280)
    mem = replica_memory(m, Layout(1, 1, 1, 1, ((0, 80),)), budget)
    workspace = 2048 * (2 * 8192 + 2 * 8192 + 2 * 1024 + 3 * 28672) * 2 + 1024 * 128256 * 4
    need = 141_107_412_992 + workspace + 1280 * 327_680
    usable = 0.85 * 81559 * MIB
    assert not mem.fits
    assert mem.shortfall_bytes() == pytest.approx(need - usable)
    assert round(mem.shortfall_bytes() / 1e9, 1) == 69.9


def test_kv_room_in_tokens() -> None:
    m = load_model("llama-3-70b")
    gpu = cluster_from_args("h100-sxm").gpu
    budget = Budget(gpu.memory_bytes, 0.85, "bf16", 2, 2048, 256, 1280)
    mem = replica_memory(m, Layout(8, 1, 1, 8, ((0, 80),)), budget)
    s = mem.stages[0]
    assert mem.fits
    assert mem.kv_tokens == int((0.85 * 81559 * MIB - s.weight_bytes - s.workspace_bytes) // 40_960)


def test_bad_config_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(PlanError, match="num_attention_heads"):
        load_model(str(tmp_path))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        load_model(str(tmp_path / "bad.json"))
    with pytest.raises(PlanError, match=r"unknown model 'llama-9'.*llama-3-8b"):
        load_model("llama-9")
