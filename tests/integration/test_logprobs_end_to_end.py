"""Logprobs end to end, against transformers: the offline engine over two pipeline stages (real
processes, UCX), and the mesh (2 replicas x 2 stages x TP 2) through the gRPC router client. Each
reported logprob is log_softmax of the model's raw logits at that position (within 1e-4), the top-k
ids are transformers' topk, a request that does not ask gets none, and asking never changes the
tokens a seeded sampled request draws."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.checkpoints import make_checkpoint
from tests.integration.engine_cases import small_cpu_env
from trellis.core.plan import TokenLogprob
from trellis.core.sampling import SamplingParams
from trellis.deploy.mesh import Mesh
from trellis.engine import Engine, EngineArgs
from trellis.wire.router_client import RouterClient

pytestmark = pytest.mark.timeout(300)

ATOL = 1e-4
K = 5
NEW_TOKENS = 8


@torch.inference_mode()
def reference_logprobs(path: Path, prompt: Sequence[int], tokens: Sequence[int]) -> torch.Tensor:
    """transformers' log_softmax [len(tokens), vocab] of the logits that predicted each new token."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor([[*prompt, *tokens]], dtype=torch.int64)
    n = len(prompt)
    return model(ids).logits[0, n - 1 : n - 1 + len(tokens)].double().log_softmax(dim=-1)


def assert_matches_reference(
    path: Path, prompt: Sequence[int], tokens: Sequence[int], logprobs: Sequence[TokenLogprob], k: int
) -> None:
    want = reference_logprobs(path, prompt, tokens)
    assert [lp.token_id for lp in logprobs] == list(tokens)
    for j, lp in enumerate(logprobs):
        assert lp.logprob == pytest.approx(want[j, lp.token_id].item(), abs=ATOL), f"token {j}"
        values, ids = want[j].topk(k)
        assert [t for t, _ in lp.top] == ids.tolist(), f"token {j}: top-{k} ids differ"
        assert [v for _, v in lp.top] == pytest.approx(values.tolist(), abs=ATOL)


# ---- the offline engine, two pipeline stages ------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint("llama-gqa", tmp_path_factory.mktemp("logprobs") / "ckpt", seed=3)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with small_cpu_env():
        yield


def test_engine_logprobs_match_transformers_over_two_stages(ckpt: Path) -> None:
    prompt, other = [5, 9, 2, 7, 1, 3, 8], [11, 4]
    sampled = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True, temperature=0.8, seed=17)
    params = [
        SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=K),
        SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True),
        dataclasses.replace(sampled, logprobs=2),
        sampled,
    ]
    with Engine(EngineArgs(model=str(ckpt), pp=2)) as engine:
        greedy, plain, sampled_lp, sampled_plain = engine.generate([prompt, other, prompt, prompt], params)

    assert len(greedy.token_ids) == NEW_TOKENS
    assert_matches_reference(ckpt, prompt, greedy.token_ids, greedy.logprobs, K)
    assert all(lp.top[0][0] == lp.token_id for lp in greedy.logprobs)  # greedy: each token is the best
    assert plain.logprobs == []
    # Sampled at temperature 0.8, yet reported under the model's own (untempered) distribution.
    assert sampled_lp.token_ids == sampled_plain.token_ids
    assert_matches_reference(ckpt, prompt, sampled_lp.token_ids, sampled_lp.logprobs, 2)
    assert sampled_plain.logprobs == []


# ---- the mesh, through the gRPC router ------------------------------------------------------------


def test_mesh_streams_logprobs_only_to_requests_that_ask(serving_mesh: Mesh, tokenized_ckpt: Path) -> None:
    prompt = [7, 300, 41, 100, 5, 12]
    with RouterClient(serving_mesh.router.address) as client:
        asked = client.generate(prompt, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=K, timeout=120)
        text = client.generate("The router", max_tokens=4, ignore_eos=True, logprobs=0, timeout=120)
        plain_responses = list(client.stream(prompt, max_tokens=NEW_TOKENS, ignore_eos=True, timeout=120))
        seeded = dict(max_tokens=NEW_TOKENS, ignore_eos=True, temperature=1.0, seed=5, timeout=120)
        drawn = client.generate(prompt, **seeded)
        drawn_lp = client.generate(prompt, logprobs=1, **seeded)

    assert asked.finish_reason == "length" and len(asked.token_ids) == NEW_TOKENS
    assert_matches_reference(tokenized_ckpt, prompt, asked.token_ids, asked.logprobs, K)
    assert_matches_reference(tokenized_ckpt, text.prompt_token_ids, text.token_ids, text.logprobs, 0)
    assert all(len(r.logprobs) == 0 for r in plain_responses)
    assert [t for r in plain_responses for t in r.token_ids] == asked.token_ids
    assert drawn.logprobs == [] and drawn_lp.token_ids == drawn.token_ids
    assert_matches_reference(tokenized_ckpt, prompt, drawn_lp.token_ids, drawn_lp.logprobs, 1)
