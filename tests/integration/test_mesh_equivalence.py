"""Issue 3 acceptance: a 2 replicas x 2 stages x TP 2 mesh of real processes answers 64 concurrent greedy
requests of mixed lengths with exactly transformers' tokens, and both replicas take traffic."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from tests.checkpoints import reference_generate
from tests.mesh_fixtures import StreamResult, collect, head_address, stage_stats
from trellis.deploy.mesh import Mesh
from trellis.wire.router_client import RouterClient

pytestmark = pytest.mark.timeout(600)

NUM_REQUESTS = 64
MAX_NEW_TOKENS = 16
TEXT_PROMPTS = ["Pipeline parallelism gives each node", "café au lait, 日本", "The router", "é"]


def test_64_concurrent_greedy_streams_match_transformers(
    serving_mesh: Mesh, tokenized_ckpt: Path, demo_tokenizer: Tokenizer
) -> None:
    rng = random.Random(3)
    vocab = demo_tokenizer.get_vocab_size()
    prompts: list[str | list[int]] = [
        [rng.randrange(2, vocab) for _ in range(rng.choice([1, 2, 7, 16, 17, 33, 60, 120]))]
        for _ in range(NUM_REQUESTS - len(TEXT_PROMPTS))
    ]
    prompts += TEXT_PROMPTS  # tokenized by the router
    max_tokens = [rng.randint(1, MAX_NEW_TOKENS) for _ in prompts]

    with RouterClient(serving_mesh.router.address) as client, ThreadPoolExecutor(NUM_REQUESTS) as pool:

        def run(i: int) -> StreamResult:
            return collect(client.stream(prompts[i], max_tokens=max_tokens[i], ignore_eos=True, timeout=300))

        results = list(pool.map(run, range(NUM_REQUESTS)))

    for i, r in enumerate(results):
        assert r.details == "" and r.finish_reason == "length", (i, r.code, r.details)
    prompt_ids = [r.prompt_token_ids for r in results]
    for p, ids in zip(prompts, prompt_ids, strict=True):
        assert ids == (demo_tokenizer.encode(p).ids if isinstance(p, str) else p)

    want = reference_generate(tokenized_ckpt, prompt_ids, MAX_NEW_TOKENS)
    mismatched = [i for i, r in enumerate(results) if r.token_ids != want[i][: max_tokens[i]]]
    assert not mismatched, (
        f"{len(mismatched)} of {NUM_REQUESTS} streams differ from transformers: {mismatched}"
    )
    assert [r.completion_tokens for r in results] == max_tokens
    assert {r.replica for r in results} == {"r0", "r1"}, "both replicas should have taken traffic"
    for replica in ("r0", "r1"):  # every stage's compute time came back to the head with its steps
        busy = stage_stats(head_address(serving_mesh, replica)).stage_busy_s
        assert len(busy) == 2 and all(seconds > 0 for seconds in busy), (replica, list(busy))
