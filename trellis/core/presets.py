"""Built-in model configs: each model's public Hugging Face ``config.json``, as plain data.

A preset has no weights: the stage workers build it with random weights (``load_format: dummy``)
for benchmarks, and the planner reads its shape. The values are copied from the published
``config.json`` of each repository (named in ``SOURCES``), so a preset and a real checkpoint of
the same model lay out identically.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any


class UnknownPresetError(ValueError):
    """A preset name that is not built in; the message lists the known ones."""


def _freeze(value: Any) -> Any:
    """Read-only view: mappings become MappingProxyType, lists become tuples."""
    if isinstance(value, dict):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    """A plain, mutable copy of a frozen value, as json.load would give it."""
    if isinstance(value, MappingProxyType):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


_LLAMA3_COMMON: MappingProxyType[str, Any] = _freeze(
    {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "model_type": "llama",
        "num_key_value_heads": 8,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": 128256,
    }
)


_CONFIGS: MappingProxyType[str, Any] = _freeze(
    {
        "llama-3-8b": {
            **_LLAMA3_COMMON,
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "max_position_embeddings": 8192,
            "num_attention_heads": 32,
            "num_hidden_layers": 32,
            "rope_scaling": None,
            "transformers_version": "4.40.0.dev0",
        },
        "llama-3-70b": {
            **_LLAMA3_COMMON,
            "hidden_size": 8192,
            "intermediate_size": 28672,
            "max_position_embeddings": 8192,
            "num_attention_heads": 64,
            "num_hidden_layers": 80,
            "rope_scaling": None,
            "transformers_version": "4.40.0.dev0",
        },
        "llama-3.1-405b": {
            **_LLAMA3_COMMON,
            "hidden_size": 16384,
            "intermediate_size": 53248,
            "max_position_embeddings": 131072,
            "mlp_bias": False,
            "num_attention_heads": 128,
            "num_hidden_layers": 126,
            "rope_scaling": {
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
                "rope_type": "llama3",
            },
            "transformers_version": "4.43.0.dev0",
        },
        "mistral-7b": {
            "architectures": ["MistralForCausalLM"],
            "bos_token_id": 1,
            "eos_token_id": 2,
            "hidden_act": "silu",
            "hidden_size": 4096,
            "initializer_range": 0.02,
            "intermediate_size": 14336,
            "max_position_embeddings": 32768,
            "model_type": "mistral",
            "num_attention_heads": 32,
            "num_hidden_layers": 32,
            "num_key_value_heads": 8,
            "rms_norm_eps": 1e-05,
            "rope_theta": 10000.0,
            "sliding_window": 4096,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "transformers_version": "4.34.0.dev0",
            "use_cache": True,
            "vocab_size": 32000,
        },
        "qwen2-72b": {
            "architectures": ["Qwen2ForCausalLM"],
            "attention_dropout": 0.0,
            "bos_token_id": 151643,
            "eos_token_id": 151643,
            "hidden_act": "silu",
            "hidden_size": 8192,
            "initializer_range": 0.02,
            "intermediate_size": 29568,
            "max_position_embeddings": 131072,
            "max_window_layers": 80,
            "model_type": "qwen2",
            "num_attention_heads": 64,
            "num_hidden_layers": 80,
            "num_key_value_heads": 8,
            "rms_norm_eps": 1e-05,
            "rope_theta": 1000000.0,
            "sliding_window": 131072,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "transformers_version": "4.40.1",
            "use_cache": True,
            "use_sliding_window": False,
            "vocab_size": 152064,
        },
    }
)

# Where each preset's values come from (the Hugging Face repository of the released model).
SOURCES: MappingProxyType[str, str] = MappingProxyType(
    {
        "llama-3-8b": "meta-llama/Meta-Llama-3-8B",
        "llama-3-70b": "meta-llama/Meta-Llama-3-70B",
        "llama-3.1-405b": "meta-llama/Llama-3.1-405B",
        "mistral-7b": "mistralai/Mistral-7B-v0.1",
        "qwen2-72b": "Qwen/Qwen2-72B",
    }
)

PRESETS: tuple[str, ...] = tuple(_CONFIGS)


def model_config(name: str) -> dict[str, Any]:
    """A fresh copy of the preset's ``config.json`` dict (callers may change it freely)."""
    try:
        frozen = _CONFIGS[name]
    except KeyError:
        raise UnknownPresetError(
            f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}"
        ) from None
    return _thaw(frozen)
