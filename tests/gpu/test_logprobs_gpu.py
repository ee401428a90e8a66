"""Log-probabilities on the GPU path (fused kernels, paged decode, CUDA graphs) against transformers.

fp32 with graphs: every greedy token's logprob and top-k as transformers' log_softmax (as on CPU);
bf16: within the bf16 tolerance of those values, and the sampled tokens unchanged by asking.
Run on a GPU machine: pytest -m gpu tests/gpu (skipped where there is no CUDA).
"""

from __future__ import annotations

import random

import pytest
import torch

from tests.checkpoints import make_checkpoint
from tests.integration.test_logprobs_end_to_end import K, assert_matches_reference, reference_logprobs
from trellis.core.engine_config import EngineConfig
from trellis.core.sampling import SamplingParams
from trellis.engine import Engine, EngineArgs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

NEW_TOKENS = 12
BF16_ATOL = 0.15  # logprobs of a bf16 forward against fp32 transformers (logits differ by ~1e-1)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint("llama-gqa", tmp_path_factory.mktemp("lp-gpu") / "ckpt", seed=3)


def prompts() -> list[list[int]]:
    rng = random.Random(11)
    return [[rng.randrange(1000) for _ in range(n)] for n in (3, 40, 150)]


def generate(ckpt, dtype: str, sampling: SamplingParams):
    args = EngineArgs(
        model=str(ckpt), device="cuda", dtype=dtype, engine=EngineConfig(num_blocks=256, cuda_graphs=True)
    )
    with Engine(args) as engine:
        return engine.generate(prompts(), sampling)


def test_fp32_logprobs_with_cuda_graphs_match_transformers(ckpt) -> None:
    outs = generate(ckpt, "float32", SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=K))
    for prompt, out in zip(prompts(), outs, strict=True):
        assert len(out.logprobs) == NEW_TOKENS
        assert_matches_reference(ckpt, prompt, out.token_ids, out.logprobs, K)


def test_bf16_logprobs_are_close_and_asking_changes_no_token(ckpt) -> None:
    plain = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True, temperature=0.8, seed=5)
    asked = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True, temperature=0.8, seed=5, logprobs=2)
    without, with_lp = generate(ckpt, "bfloat16", plain), generate(ckpt, "bfloat16", asked)
    for prompt, a, b in zip(prompts(), without, with_lp, strict=True):
        assert a.token_ids == b.token_ids and a.logprobs == []
        want = reference_logprobs(ckpt, prompt, b.token_ids)
        for j, lp in enumerate(b.logprobs):
            assert lp.token_id == b.token_ids[j]
            assert lp.logprob == pytest.approx(want[j, lp.token_id].item(), abs=BF16_ATOL), f"token {j}"
