"""Built-in model presets: the published config values, handed out as independent copies."""

from __future__ import annotations

import pytest

from trellis.core.presets import PRESETS, SOURCES, UnknownPresetError, model_config


def test_every_preset_has_a_source_and_a_llama_family_architecture() -> None:
    assert set(PRESETS) == {"llama-3-8b", "llama-3-70b", "llama-3.1-405b", "mistral-7b", "qwen2-72b"}
    for name in PRESETS:
        cfg = model_config(name)
        assert SOURCES[name]
        assert cfg["architectures"][0] in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
        assert cfg["hidden_size"] % cfg["num_attention_heads"] == 0


@pytest.mark.parametrize(
    ("name", "layers", "hidden", "inter", "heads", "kv", "vocab", "max_pos", "theta"),
    [
        ("llama-3-8b", 32, 4096, 14336, 32, 8, 128256, 8192, 500000.0),
        ("llama-3-70b", 80, 8192, 28672, 64, 8, 128256, 8192, 500000.0),
        ("llama-3.1-405b", 126, 16384, 53248, 128, 8, 128256, 131072, 500000.0),
        ("mistral-7b", 32, 4096, 14336, 32, 8, 32000, 32768, 10000.0),
        ("qwen2-72b", 80, 8192, 29568, 64, 8, 152064, 131072, 1000000.0),
    ],
)
def test_published_shapes(
    name: str,
    layers: int,
    hidden: int,
    inter: int,
    heads: int,
    kv: int,
    vocab: int,
    max_pos: int,
    theta: float,
) -> None:
    cfg = model_config(name)
    got = (
        cfg["num_hidden_layers"],
        cfg["hidden_size"],
        cfg["intermediate_size"],
        cfg["num_attention_heads"],
        cfg["num_key_value_heads"],
        cfg["vocab_size"],
        cfg["max_position_embeddings"],
        cfg["rope_theta"],
    )
    assert got == (layers, hidden, inter, heads, kv, vocab, max_pos, theta)


def test_llama31_rope_scaling_and_mistral_window() -> None:
    rope = model_config("llama-3.1-405b")["rope_scaling"]
    assert rope == {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    }
    assert model_config("mistral-7b")["sliding_window"] == 4096
    assert model_config("qwen2-72b")["use_sliding_window"] is False


def test_each_call_returns_an_independent_plain_copy() -> None:
    a = model_config("llama-3.1-405b")
    a["num_hidden_layers"] = 1
    a["rope_scaling"]["factor"] = 1.0
    a["architectures"].append("x")
    b = model_config("llama-3.1-405b")
    assert b["num_hidden_layers"] == 126 and b["rope_scaling"]["factor"] == 8.0
    assert b["architectures"] == ["LlamaForCausalLM"]
    assert type(b) is dict and type(b["rope_scaling"]) is dict


def test_unknown_preset_names_the_known_ones() -> None:
    with pytest.raises(UnknownPresetError, match=r"unknown model preset 'llama-9'.*llama-3-8b"):
        model_config("llama-9")
