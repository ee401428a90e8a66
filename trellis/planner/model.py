"""A model's shape as the planner sees it: parameter counts, weight bytes per stage, KV bytes per token.

Read from a Hugging Face ``config.json`` (a path) or a built-in preset (``trellis.core.presets``). Only
the Llama-family decoder is modelled (Llama, Mistral, Qwen2): attention with grouped KV heads, a
gated MLP, two RMS norms per layer, an embedding and an LM head (tied or not).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from trellis.core import presets
from trellis.planner.errors import PlanError

# Bytes per weight of the layers' linear maps. With fp8 the embedding, LM head, norms and biases
# stay 16-bit (as in public fp8 checkpoints); activations are always 16-bit.
WEIGHT_DTYPES = ("bf16", "fp16", "fp8")
DTYPE_BYTES = MappingProxyType({"bf16": 2, "fp16": 2, "fp8": 1})
ACTIVATION_BYTES = 2


@dataclass(frozen=True)
class ModelShape:
    name: str  # the preset name or the config path, as given
    preset: str | None  # set when the model is a built-in preset
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool
    qkv_bias: bool
    max_len: int

    # ---- parameters ---------------------------------------------------------------------------
    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def layer_linear_params(self) -> int:
        """Weights of one layer's matrices: q, k, v, o and the gated MLP (gate, up, down)."""
        attn = self.hidden * (self.q_width + 2 * self.kv_width) + self.q_width * self.hidden
        return attn + 3 * self.hidden * self.intermediate

    def layer_small_params(self) -> int:
        """Two RMS norm weights, plus the q/k/v biases where the model has them (Qwen2)."""
        bias = self.q_width + 2 * self.kv_width if self.qkv_bias else 0
        return 2 * self.hidden + bias

    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    def total_params(self) -> int:
        head = 0 if self.tied_embeddings else self.vocab * self.hidden
        per_layer = self.layer_linear_params() + self.layer_small_params()
        return self.layers * per_layer + self.embedding_params() + head + self.hidden

    def weight_bytes(self, dtype: str) -> int:
        """The whole checkpoint's weight bytes in ``dtype`` (fp8: matrices only, the rest 16-bit)."""
        linear = self.layers * self.layer_linear_params()
        return linear * DTYPE_BYTES[dtype] + (self.total_params() - linear) * ACTIVATION_BYTES

    # ---- tensor parallel split ----------------------------------------------------------------
    def kv_heads_per_rank(self, tp: int) -> int:
        # With more ranks than KV heads each rank keeps one KV head (replicated), as the engine does.
        return max(1, self.kv_heads // tp)

    def tp_problem(self, tp: int) -> str | None:
        """Why ``tp`` ranks cannot split this model, or None when they can."""
        if self.heads % tp:
            return f"TP {tp} does not divide the {self.heads} attention heads"
        if self.kv_heads >= tp and self.kv_heads % tp:
            return f"TP {tp} does not divide the {self.kv_heads} KV heads"
        if self.kv_heads < tp and tp % self.kv_heads:
            return f"TP {tp} is not a multiple of the {self.kv_heads} KV heads"
        if self.intermediate % tp:
            return f"TP {tp} does not divide intermediate_size {self.intermediate}"
        return None

    def kv_bytes_per_token(self, kv_bytes: int, layers: int | None = None, tp: int = 1) -> int:
        """K and V of one token: 2 x layers x KV heads (per rank) x head_dim x bytes."""
        n = self.layers if layers is None else layers
        return 2 * n * self.kv_heads_per_rank(tp) * self.head_dim * kv_bytes


def from_config(raw: dict[str, Any], name: str, preset: str | None = None) -> ModelShape:
    """Build the shape from a ``config.json`` dict; a missing or bad field is one clear error."""

    def need(key: str, default: int | None = None) -> int:
        value = raw.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            got = "missing" if value is None else repr(value)
            raise PlanError(f"{name}: config.json field {key!r} must be a positive integer ({got})")
        return value

    heads = need("num_attention_heads")
    hidden = need("hidden_size")
    kv_heads = need("num_key_value_heads", heads)
    if heads % kv_heads:
        raise PlanError(f"{name}: num_key_value_heads {kv_heads} does not divide num_attention_heads {heads}")
    arch = (raw.get("architectures") or [""])[0]
    return ModelShape(
        name=name,
        preset=preset,
        layers=need("num_hidden_layers"),
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=need("head_dim", hidden // heads),
        intermediate=need("intermediate_size"),
        vocab=need("vocab_size"),
        tied_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=arch == "Qwen2ForCausalLM" or bool(raw.get("attention_bias", False)),
        max_len=need("max_position_embeddings", 2048),
    )


def load_model(source: str) -> ModelShape:
    """A preset name, a model directory holding ``config.json``, or a ``config.json`` path."""
    if source in presets.PRESETS:
        return from_config(presets.model_config(source), source, preset=source)
    path = Path(source)
    if not path.exists():
        raise PlanError(
            f"unknown model {source!r}: not a preset ({', '.join(presets.PRESETS)}) and no such path"
        )
    file = path / "config.json" if path.is_dir() else path
    try:
        raw = json.loads(file.read_text())
    except OSError as e:
        raise PlanError(f"{file}: cannot read the model config ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PlanError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise PlanError(f"{file}: expected a JSON object")
    return from_config(raw, source)
