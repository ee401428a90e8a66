"""Tiny random Hugging Face checkpoints for tests, written by transformers itself, and the
transformers reference outputs (greedy tokens, last-position logits) to compare against.

Weights are drawn with a wider spread than transformers' default init so logits are far apart and
greedy argmax has clear gaps (no near-ties that would flake across TP splits). Nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

WEIGHT_STD = 0.2
NORM_JITTER = 0.1


def _llama_gqa() -> PreTrainedModel:
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=1000,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=False,
            rms_norm_eps=1e-5,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
    )


def _llama_tied() -> PreTrainedModel:
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=1000,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            rms_norm_eps=1e-5,
            rope_scaling={"rope_type": "linear", "factor": 2.0},
        )
    )


def _qwen2() -> PreTrainedModel:
    return Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=1002,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=False,
            rms_norm_eps=1e-6,
            rope_theta=1_000_000.0,
            bos_token_id=1,
            eos_token_id=2,
        )
    )


def _mistral() -> PreTrainedModel:
    # head_dim 32 with 4 heads: q/o projections are wider than hidden (64), as some Mistrals have.
    # A short sliding window so long prompts exercise it.
    return MistralForCausalLM(
        MistralConfig(
            vocab_size=1000,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            max_position_embeddings=512,
            sliding_window=16,
            tie_word_embeddings=False,
            rms_norm_eps=1e-5,
        )
    )


KINDS: dict[str, Callable[[], PreTrainedModel]] = {
    "llama-gqa": _llama_gqa,
    "llama-tied": _llama_tied,
    "qwen2": _qwen2,
    "mistral": _mistral,
}


def make_checkpoint(kind: str, path: Path, *, seed: int = 0, shards: int = 1) -> Path:
    """Write a tiny random float32 checkpoint of ``kind`` into ``path``. With ``shards`` > 1 it is a
    sharded index over at least ``shards`` files (transformers packs whole tensors greedily)."""
    if kind not in KINDS:
        raise ValueError(f"unknown checkpoint kind {kind!r}; known: {', '.join(KINDS)}")
    torch.manual_seed(seed)
    model = KINDS[kind]().float()
    _randomize(model, seed)
    total_bytes = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    max_shard_size = total_bytes if shards <= 1 else total_bytes // shards + 1
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    return path


def _randomize(model: PreTrainedModel, seed: int) -> None:
    """Every weight from one seeded generator, in name order: wide matrices, jittered norms, random biases."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name:
                param.copy_(1.0 + NORM_JITTER * noise)
            elif name.endswith("bias"):
                param.copy_(0.1 * noise)
            else:
                param.copy_(WEIGHT_STD * noise)


def _load(path: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.inference_mode()
def reference_generate(
    path: Path, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, stop_at_eos: bool = False
) -> list[list[int]]:
    """transformers greedy ``generate``, one prompt at a time (no padding), float32: the new tokens of
    each prompt. By default exactly ``max_new_tokens`` per prompt (EOS does not stop it)."""
    model = _load(path)
    eos = model.generation_config.eos_token_id if stop_at_eos else None
    out = []
    for prompt in prompts:
        ids = torch.tensor([list(prompt)], dtype=torch.int64)
        generated = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=0,
        )
        out.append(generated[0, len(prompt) :].tolist())
    return out


@torch.inference_mode()
def reference_logits(path: Path, prompt: Sequence[int]) -> torch.Tensor:
    """transformers float32 logits [vocab] of a prompt's last position."""
    model = _load(path)
    return model(torch.tensor([list(prompt)], dtype=torch.int64)).logits[0, -1].float()
