"""ModelConfig parsing (old and transformers-5 rope layouts, biases, sliding windows) and its errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.checkpoints import make_checkpoint
from trellis.core.errors import ModelError
from trellis.core.model_config import RopeScaling, check_parallel, load_model_config


def llama_dict(**overrides: Any) -> dict[str, Any]:
    raw = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 128256,
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "max_position_embeddings": 131072,
        "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009],
        "torch_dtype": "bfloat16",
        "tie_word_embeddings": False,
    }
    raw.update(overrides)
    return raw


def test_llama3_70b_old_layout() -> None:
    cfg = load_model_config(llama_dict())
    assert (cfg.head_dim, cfg.num_key_value_heads, cfg.kv_heads_per_rank(8), cfg.q_heads_per_rank(8)) == (
        128,
        8,
        1,
        8,
    )
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    assert cfg.eos_token_ids == (128001, 128008, 128009) and cfg.bos_token_id == 128000
    assert cfg.dtype == "bfloat16"
    assert not (cfg.qkv_bias or cfg.o_proj_bias or cfg.mlp_bias or cfg.tie_word_embeddings)
    assert cfg.sliding_windows == (None,) * 80


def test_transformers5_rope_parameters_layout() -> None:
    raw = llama_dict(
        rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 1234.0}, dtype="float16"
    )
    del raw["rope_scaling"], raw["rope_theta"], raw["torch_dtype"]
    cfg = load_model_config(raw)
    assert cfg.rope_theta == 1234.0 and cfg.rope_scaling == RopeScaling("linear", 4.0)
    assert cfg.dtype == "float16"


def test_defaults_and_legacy_type_key() -> None:
    raw = llama_dict(rope_scaling={"type": "linear", "factor": 2.0}, eos_token_id=2)
    del raw["num_key_value_heads"]
    cfg = load_model_config(raw)
    assert cfg.num_key_value_heads == 64 and cfg.eos_token_ids == (2,)
    assert cfg.rope_scaling == RopeScaling("linear", 2.0)
    assert load_model_config(llama_dict(rope_scaling=None)).rope_scaling is None


@pytest.mark.parametrize(
    ("kind", "expect"),
    [
        ("llama-gqa", {"num_key_value_heads": 2, "head_dim": 8, "vocab_size": 1000, "qkv_bias": False}),
        ("llama-tied", {"tie_word_embeddings": True, "rope_scaling": RopeScaling("linear", 2.0)}),
        (
            "qwen2",
            {"qkv_bias": True, "o_proj_bias": False, "vocab_size": 1002, "sliding_windows": (None,) * 3},
        ),
        ("mistral", {"head_dim": 32, "sliding_windows": (16, 16), "architecture": "MistralForCausalLM"}),
    ],
)
def test_test_checkpoints_parse(tmp_path: Path, kind: str, expect: dict[str, Any]) -> None:
    cfg = load_model_config(make_checkpoint(kind, tmp_path))
    assert {key: getattr(cfg, key) for key in expect} == expect


def test_qwen2_sliding_window_only_when_enabled() -> None:
    base = llama_dict(architectures=["Qwen2ForCausalLM"], num_hidden_layers=4, sliding_window=8)
    assert load_model_config(base).sliding_windows == (None,) * 4
    enabled = load_model_config({**base, "use_sliding_window": True, "max_window_layers": 2})
    assert enabled.sliding_windows == (None, None, 8, 8)


def test_llama_attention_bias_covers_o_proj() -> None:
    cfg = load_model_config(llama_dict(attention_bias=True, mlp_bias=True))
    assert cfg.qkv_bias and cfg.o_proj_bias and cfg.mlp_bias


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"model path .*nowhere does not exist"):
        load_model_config(tmp_path / "nowhere")


def test_missing_config_json(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"no config\.json in model directory"):
        load_model_config(tmp_path)


def test_corrupt_config_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],')
    with pytest.raises(ModelError, match=r"config.json is not valid JSON"):
        load_model_config(tmp_path)


def test_unsupported_architecture_names_it_and_the_supported() -> None:
    with pytest.raises(ModelError) as err:
        load_model_config(llama_dict(architectures=["GPT2LMHeadModel"]))
    message = str(err.value)
    assert "'GPT2LMHeadModel'" in message and "LlamaForCausalLM" in message and "Qwen2ForCausalLM" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "unsupported rope type 'yarn'"),
        ({"rope_scaling": {"rope_type": "linear"}}, "needs a 'factor'"),
        ({"hidden_act": "gelu"}, "unsupported hidden_act 'gelu'"),
        ({"vocab_size": 0}, "'vocab_size' must be a positive integer"),
        ({"num_key_value_heads": 5}, "num_key_value_heads 5 does not divide"),
    ],
)
def test_bad_values(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ModelError, match=message):
        load_model_config(llama_dict(**overrides))


def test_missing_key() -> None:
    raw = llama_dict()
    del raw["hidden_size"]
    with pytest.raises(ModelError, match=r"config\.json lacks 'hidden_size'"):
        load_model_config(raw)


def test_config_json_file_path(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(llama_dict()))
    assert load_model_config(tmp_path / "config.json") == load_model_config(tmp_path)


def test_check_parallel_accepts_valid_splits() -> None:
    cfg = load_model_config(llama_dict())  # 64 heads, 8 kv heads, 80 layers
    for tp in (1, 2, 4, 8, 16, 64):  # past 8 ranks, kv heads are replicated
        check_parallel(cfg, tp, (0, 80))
    check_parallel(cfg, 8, (40, 80))


@pytest.mark.parametrize(
    ("tp", "layers", "message"),
    [
        (3, (0, 80), "tensor parallel size 3 does not divide the 64 attention heads"),
        (0, (0, 80), "must be >= 1"),
        (2, (0, 81), r"layer range \[0, 81\) is not a non-empty part of \[0, 80\)"),
        (2, (-1, 4), r"layer range \[-1, 4\)"),
        (2, (5, 5), r"layer range \[5, 5\)"),
    ],
)
def test_check_parallel_errors(tp: int, layers: tuple[int, int], message: str) -> None:
    with pytest.raises(ModelError, match=message):
        check_parallel(load_model_config(llama_dict()), tp, layers)


def test_check_parallel_kv_heads() -> None:
    cfg = load_model_config(
        llama_dict(num_attention_heads=12, num_key_value_heads=4, hidden_size=768, intermediate_size=3072)
    )
    check_parallel(cfg, 4, (0, 1))
    check_parallel(cfg, 12, (0, 1))  # 3 ranks share each kv head
    with pytest.raises(ModelError, match="does not divide the 4 key/value heads"):
        check_parallel(cfg, 3, (0, 1))
    with pytest.raises(ModelError, match="must be a multiple of the 4 key/value heads"):
        check_parallel(cfg, 6, (0, 1))
