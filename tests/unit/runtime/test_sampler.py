"""The sampler: greedy is argmax, top-k/top-p masks agree with transformers' warpers, seeded draws are a
pure function of (logits, params, seed, output_index) and follow the distribution."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from trellis.core.sampling import SamplingParams
from trellis.runtime.sampler import Sampler, apply_top_k_top_p, noise_seed, sample_tokens

GREEDY = SamplingParams()


def random_logits(rows: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax_with_ties_to_lowest_id() -> None:
    logits = random_logits(5, 50)
    logits[2, 7] = logits[2, 31] = logits[2].max() + 1.0
    tokens = sample_tokens(logits, [GREEDY] * 5, [0] * 5)
    assert tokens == logits.argmax(-1).tolist()
    assert tokens[2] == 7


@pytest.mark.parametrize(("top_k", "top_p"), [(0, 1.0), (1, 1.0), (5, 1.0), (0, 0.9), (0, 0.3), (10, 0.7)])
def test_masks_agree_with_transformers(top_k: int, top_p: float) -> None:
    logits = random_logits(4, 100, seed=top_k)
    want = logits.clone()
    if top_k:
        want = TopKLogitsWarper(top_k)(None, want)
    if top_p < 1.0:
        want = TopPLogitsWarper(top_p)(None, want)
    got = apply_top_k_top_p(logits, torch.full((4,), top_k), torch.full((4,), top_p))
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert torch.equal(got[~torch.isinf(got)], logits[~torch.isinf(got)])


def test_top_k_keeps_ties_and_top_p_keeps_the_smallest_set() -> None:
    logits = torch.tensor([[3.0, 1.0, 3.0, 2.0, 2.0]])
    kept = ~torch.isinf(apply_top_k_top_p(logits, torch.tensor([3]), torch.tensor([1.0])))
    assert kept.tolist() == [[True, False, True, True, True]]  # 2.0 ties with the 3rd largest
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    for top_p, expect in [(0.45, [1]), (0.75, [1, 3]), (0.9, [1, 2, 3]), (0.99, [0, 1, 2, 3])]:
        kept = ~torch.isinf(apply_top_k_top_p(probs.log(), torch.tensor([0]), torch.tensor([top_p])))
        assert kept[0].nonzero().flatten().tolist() == expect, top_p


def test_per_row_parameters() -> None:
    logits = random_logits(2, 20)
    masked = apply_top_k_top_p(logits, torch.tensor([2, 0]), torch.tensor([1.0, 1.0]))
    assert (~torch.isinf(masked[0])).sum() == 2 and not torch.isinf(masked[1]).any()


def test_seeded_draw_is_a_pure_function_of_seed_and_index() -> None:
    logits = random_logits(1, 200)
    params = SamplingParams(temperature=4.0, top_p=0.95, seed=1234)
    alone = [sample_tokens(logits, [params], [i])[0] for i in range(40)]
    # Same draws inside a batch, at another row, next to unseeded rows, whatever the generator's state.
    others = random_logits(2, 200, seed=9)
    unseeded = SamplingParams(temperature=1.0)
    for i in range(40):
        generator = torch.Generator().manual_seed(i)
        batch = torch.cat([others[:1], logits, others[1:]])
        got = sample_tokens(batch, [unseeded, params, GREEDY], [3, i, 0], generator)
        assert got[1] == alone[i]
        assert got[2] == others[1].argmax().item()
    assert len(set(alone)) > 10  # the output index really moves the noise
    other_seed = [
        sample_tokens(logits, [SamplingParams(temperature=4.0, top_p=0.95, seed=99)], [i])[0]
        for i in range(40)
    ]
    assert other_seed != alone


def test_seeded_draws_follow_the_distribution() -> None:
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    logits = (probs.log() * 2).repeat(8, 1)  # temperature 2 undoes the doubling
    params = [SamplingParams(temperature=2.0, seed=s) for s in range(8)]
    counts = torch.zeros(4)
    for index in range(500):
        for token in sample_tokens(logits, params, [index] * 8):
            counts[token] += 1
    freq = counts / counts.sum()
    sigma = (probs * (1 - probs) / 4000).sqrt()
    assert ((freq - probs).abs() < 5 * sigma).all(), freq


def test_top_k_draws_stay_in_the_top_k() -> None:
    logits = random_logits(1, 100)
    top3 = set(logits[0].topk(3).indices.tolist())
    params = SamplingParams(temperature=5.0, top_k=3, seed=0)
    drawn = {sample_tokens(logits, [params], [i])[0] for i in range(200)}
    assert drawn == top3


def test_unseeded_rows_use_the_runner_generator() -> None:
    logits = random_logits(3, 100)
    params = [SamplingParams(temperature=1.0)] * 3
    a, b = Sampler(7, torch.device("cpu")), Sampler(7, torch.device("cpu"))
    draws_a = [a(logits, params, [0, 0, 0]) for _ in range(10)]
    draws_b = [b(logits, params, [0, 0, 0]) for _ in range(10)]
    assert draws_a == draws_b
    assert len({tuple(d) for d in draws_a}) > 1  # the generator advances between steps


def test_cold_temperature_is_nearly_greedy() -> None:
    logits = random_logits(6, 300)
    params = [SamplingParams(temperature=1e-4, seed=s) for s in range(6)]
    assert sample_tokens(logits, params, list(range(6))) == logits.argmax(-1).tolist()


def test_noise_seed_mixes() -> None:
    seeds = {noise_seed(s, i) for s in range(20) for i in range(20)}
    assert len(seeds) == 400 and all(0 <= s < 2**63 for s in seeds)
    assert noise_seed(5, 3) == noise_seed(5, 3)
    assert math.isfinite(noise_seed(2**63 - 1, 10**9))


def test_empty_batch() -> None:
    assert sample_tokens(torch.zeros(0, 10), [], []) == []
