"""Issue 2 acceptance: the offline engine (real processes, UCX between stages, gloo inside a stage)
gives transformers' greedy tokens and first-step logits for every TP x PP split, on a GQA Llama with
llama3 rope scaling and a vocabulary no split divides, a Llama with tied embeddings and a Qwen2 with
q/k/v biases. Each checkpoint and its reference are made once; each split runs one engine."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.checkpoints import make_checkpoint, reference_generate, reference_logits
from tests.integration.engine_cases import (
    GREEDY,
    LOGITS_RTOL,
    NEW_TOKENS,
    make_prompts,
    relative_error,
    shrink_vocab,
    small_cpu_env,
)
from trellis.core.model_config import load_model_config
from trellis.engine import Engine, EngineArgs

# 997 is odd and prime: no TP split divides it, so the vocab-parallel shards need padding.
ODD_VOCAB = 997
KINDS = ("llama-gqa", "llama-tied", "qwen2")
SPLITS = ((1, 1), (2, 1), (4, 1), (1, 2), (1, 3), (2, 2))
PROMPT_LENGTHS = (1, 2, 9, 16, 41, 77, 150, 200)  # a batch of mixed lengths, up to 200 tokens


@dataclass(frozen=True)
class ModelCase:
    kind: str
    path: Path
    vocab_size: int
    prompts: list[list[int]]
    want_tokens: list[list[int]]
    want_logits: list[torch.Tensor]


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with small_cpu_env():
        yield


@pytest.fixture(scope="module", params=KINDS)
def model_case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> ModelCase:
    kind: str = request.param
    path = make_checkpoint(kind, tmp_path_factory.mktemp(kind) / "ckpt", seed=3)
    if kind == "llama-gqa":
        shrink_vocab(path, ODD_VOCAB)
    cfg = load_model_config(path)
    assert cfg.max_position_embeddings > max(PROMPT_LENGTHS) + NEW_TOKENS
    prompts = make_prompts(cfg.vocab_size, PROMPT_LENGTHS, seed=5)
    return ModelCase(
        kind=kind,
        path=path,
        vocab_size=cfg.vocab_size,
        prompts=prompts,
        want_tokens=reference_generate(path, prompts, NEW_TOKENS),
        want_logits=[reference_logits(path, p) for p in prompts],
    )


def test_checkpoints_cover_the_required_features(model_case: ModelCase) -> None:
    """Guard the test matrix itself: each checkpoint has the feature it stands for."""
    cfg = load_model_config(model_case.path)
    if model_case.kind == "llama-gqa":
        assert cfg.num_key_value_heads < cfg.num_attention_heads
        assert cfg.rope_scaling is not None and cfg.rope_scaling.kind == "llama3"
        assert cfg.vocab_size % 4 != 0
    elif model_case.kind == "llama-tied":
        assert cfg.tie_word_embeddings
    else:
        assert cfg.architecture == "Qwen2ForCausalLM" and cfg.qkv_bias
    assert cfg.num_hidden_layers >= max(pp for _, pp in SPLITS)


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("tp", "pp"), SPLITS, ids=[f"tp{tp}-pp{pp}" for tp, pp in SPLITS])
def test_engine_matches_transformers(model_case: ModelCase, tp: int, pp: int) -> None:
    args = EngineArgs(model=str(model_case.path), tp=tp, pp=pp, return_logits=True)
    with Engine(args) as engine:
        outs = engine.generate(model_case.prompts, GREEDY)

    for i, (out, want) in enumerate(zip(outs, model_case.want_tokens, strict=True)):
        assert out.prompt_token_ids == model_case.prompts[i]
        assert out.token_ids == want, f"prompt {i} ({len(out.prompt_token_ids)} tokens): tokens differ"
        assert out.finish_reason == "length"
    for i, (out, want) in enumerate(zip(outs, model_case.want_logits, strict=True)):
        assert out.first_logits is not None
        assert out.first_logits.dtype == torch.float32
        assert out.first_logits.shape == (model_case.vocab_size,)  # vocab padding dropped
        err = relative_error(out.first_logits, want)
        assert err <= LOGITS_RTOL, f"prompt {i}: first-step logits off by {err:.2e} relative"
