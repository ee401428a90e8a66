"""The model's shape, read once from a Hugging Face ``config.json`` and validated.

Llama, Mistral and Qwen2 share one decoder; they differ only in biases, rope scaling and sliding
windows, which this config spells out so the model code never looks at the architecture name.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trellis.core import presets
from trellis.core.errors import ModelError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
ROPE_TYPES = ("default", "linear", "llama3")
# "org/name" with no leading "/" or "./": what a Hugging Face hub id looks like, not a path.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass(frozen=True)
class RopeScaling:
    kind: str  # "linear" or "llama3"
    factor: float
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_proj_bias: bool
    mlp_bias: bool
    sliding_windows: tuple[int | None, ...]  # per layer; None means full causal attention
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    dtype: str | None  # the checkpoint's dtype name, e.g. "bfloat16"

    def q_heads_per_rank(self, tp: int) -> int:
        return self.num_attention_heads // tp

    def kv_heads_per_rank(self, tp: int) -> int:
        # With more ranks than kv heads, each rank keeps one (replicated) kv head.
        return max(1, self.num_key_value_heads // tp)


def load_model_config(source: str | Path | Mapping[str, Any]) -> ModelConfig:
    """Parse a config from a dict, a model directory or a ``config.json`` path."""
    raw = source if isinstance(source, Mapping) else _read_config_json(Path(source))
    return _parse(raw)


def load_model_source(path: str | Path | None, preset: str | None) -> ModelConfig:
    """The config of a model given as a directory or as a built-in preset (exactly one of them):
    what every process reads before it lays out or loads a model. Raises ModelError."""
    if (path is None) == (preset is None):
        raise ModelError("give exactly one of a model directory or a preset")
    if preset is not None:
        try:
            return load_model_config(presets.model_config(preset))
        except presets.UnknownPresetError as e:
            raise ModelError(str(e)) from None
    return load_model_config(path)


def check_parallel(cfg: ModelConfig, tp: int, layers: tuple[int, int]) -> None:
    """Raise ModelError when ``tp`` ranks cannot split this model or ``layers`` is out of range."""
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    if tp < 1:
        raise ModelError(f"tensor parallel size must be >= 1, got {tp}")
    if heads % tp:
        raise ModelError(f"tensor parallel size {tp} does not divide the {heads} attention heads")
    if kv_heads >= tp and kv_heads % tp:
        raise ModelError(f"tensor parallel size {tp} does not divide the {kv_heads} key/value heads")
    if kv_heads < tp and tp % kv_heads:
        raise ModelError(
            f"tensor parallel size {tp} must be a multiple of the {kv_heads} key/value heads "
            "to replicate them"
        )
    if cfg.intermediate_size % tp:
        raise ModelError(
            f"tensor parallel size {tp} does not divide intermediate_size {cfg.intermediate_size}"
        )
    start, end = layers
    if not 0 <= start < end <= cfg.num_hidden_layers:
        raise ModelError(
            f"layer range [{start}, {end}) is not a non-empty part of [0, {cfg.num_hidden_layers})"
        )


def model_dir_problem(path: str | Path) -> str | None:
    """Why `path` is no local model directory (a hub id and a missing path each get their own
    advice), or None when it exists."""
    if Path(path).exists():
        return None
    if _HUB_ID.fullmatch(str(path)):
        return (
            f"{path} is not a directory; Trellis loads local checkpoints: download it first "
            f"(huggingface-cli download {path} --local-dir DIR) and pass DIR"
        )
    return f"model path {path} does not exist; give the directory that holds config.json"


def _read_config_json(path: Path) -> Mapping[str, Any]:
    if problem := model_dir_problem(path):
        raise ModelError(problem)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ModelError(f"no config.json in model directory {path}")
    try:
        raw = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{file} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ModelError(f"{file} must hold a JSON object, got {type(raw).__name__}")
    return raw


def _parse(raw: Mapping[str, Any]) -> ModelConfig:
    archs = raw.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelError(
            f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if raw.get("hidden_act", "silu") != "silu":
        raise ModelError(f"unsupported hidden_act {raw['hidden_act']!r}; only 'silu' is supported")
    heads = _positive_int(raw, "num_attention_heads")
    hidden = _positive_int(raw, "hidden_size")
    num_layers = _positive_int(raw, "num_hidden_layers")
    kv_heads = _positive_int(raw, "num_key_value_heads", default=heads)
    if heads % kv_heads:
        raise ModelError(f"num_key_value_heads {kv_heads} does not divide num_attention_heads {heads}")
    head_dim = raw.get("head_dim") or hidden // heads
    rope_theta, rope_scaling = _parse_rope(raw)
    is_qwen2 = arch == "Qwen2ForCausalLM"
    attention_bias = bool(raw.get("attention_bias", False))
    eos = raw.get("eos_token_id")
    return ModelConfig(
        architecture=arch,
        vocab_size=_positive_int(raw, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_positive_int(raw, "intermediate_size"),
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=int(head_dim),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=_positive_int(raw, "max_position_embeddings", default=2048),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=is_qwen2 or attention_bias,
        o_proj_bias=attention_bias and not is_qwen2,
        mlp_bias=bool(raw.get("mlp_bias", False)),
        sliding_windows=_sliding_windows(raw, arch, num_layers),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),)),
        dtype=raw.get("dtype") or raw.get("torch_dtype"),
    )


def _positive_int(raw: Mapping[str, Any], key: str, default: int | None = None) -> int:
    value = raw.get(key, default)
    if value is None:
        raise ModelError(f"config.json lacks {key!r}")
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ModelError(f"config.json {key!r} must be a positive integer, got {value!r}")
    return value


def _parse_rope(raw: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    # transformers 5 writes everything under rope_parameters; older configs use rope_theta + rope_scaling.
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind not in ROPE_TYPES:
        raise ModelError(f"unsupported rope type {kind!r}; supported: {', '.join(ROPE_TYPES)}")
    if kind == "default":
        return theta, None
    if "factor" not in params:
        raise ModelError(f"rope scaling {kind!r} needs a 'factor'")
    if kind == "linear":
        return theta, RopeScaling(kind="linear", factor=float(params["factor"]))
    original = params.get("original_max_position_embeddings") or raw.get("max_position_embeddings", 8192)
    return theta, RopeScaling(
        kind="llama3",
        factor=float(params["factor"]),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(original),
    )


def _sliding_windows(raw: Mapping[str, Any], arch: str, num_layers: int) -> tuple[int | None, ...]:
    window = raw.get("sliding_window")
    if arch == "LlamaForCausalLM" or window is None:
        return (None,) * num_layers
    if arch == "MistralForCausalLM":
        return (int(window),) * num_layers
    # Qwen2: sliding only when enabled, and then per layer (layer_types, or from max_window_layers on).
    if not raw.get("use_sliding_window", False):
        return (None,) * num_layers
    types = raw.get("layer_types")
    if not types:
        first = int(raw.get("max_window_layers", num_layers))
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
    return tuple(int(window) if t == "sliding_attention" else None for t in types)
