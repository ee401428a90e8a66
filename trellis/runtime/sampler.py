"""Choosing the next token from the last stage's logits: greedy, temperature, top-k, top-p.

Random choice uses the exponential race: with q ~ Exp(1) per token, argmax(p / q) is a draw from p.
For a request with a seed, q comes from a CPU generator seeded from (seed, output_index), so the
token is a pure function of (logits, params, seed, output_index): the same on any TP x PP split and
after a preemption recomputes the sequence. Requests without a seed draw q from the runner's generator.

Log-probabilities (``token_logprobs``) are only computed for the rows that asked, on the device, and
never change which token is drawn.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from trellis.core.plan import TokenLogprob
from trellis.core.sampling import SamplingParams

_MASK64 = (1 << 64) - 1


def noise_seed(seed: int, output_index: int) -> int:
    """A well-mixed 63-bit generator seed for one (request seed, output position) pair (splitmix64)."""
    z = (seed + (output_index + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask to -inf what top-k and then top-p cut: logits [rows, vocab], top_k [rows] (0 = off), top_p [rows].

    Top-k keeps every token at least as likely as the k-th (ties kept); top-p keeps the smallest set of
    the most likely tokens whose probability reaches top_p (the most likely token always stays).
    """
    vocab = logits.shape[-1]
    ordered, order = logits.sort(dim=-1, descending=True)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab).long()
    kth = ordered.gather(-1, (k - 1)[:, None])  # [rows, 1]
    ordered = ordered.masked_fill(ordered < kth, float("-inf"))
    probs = ordered.softmax(dim=-1)
    mass_above = probs.cumsum(dim=-1) - probs  # probability of the strictly more likely tokens
    cut = (mass_above >= top_p[:, None]) & (top_p[:, None] < 1.0)
    ordered = ordered.masked_fill(cut, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, ordered)


def sample_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    output_indices: Sequence[int],
    generator: torch.Generator | None = None,
) -> list[int]:
    """One token per row of float32 logits [rows, vocab]; ``generator`` serves unseeded random rows."""
    return pick_tokens(logits, params, output_indices, generator).tolist()


def pick_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    output_indices: Sequence[int],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``sample_tokens`` left on the device: int64 [rows]."""
    tokens = logits.argmax(dim=-1)  # greedy; ties go to the lowest id
    random_rows = [i for i, p in enumerate(params) if not p.greedy]
    if random_rows:
        picked = _sample_random(
            logits[random_rows],
            [params[i] for i in random_rows],
            [output_indices[i] for i in random_rows],
            generator,
        )
        tokens[random_rows] = picked
    return tokens


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, params: Sequence[SamplingParams]
) -> tuple[TokenLogprob | None, ...]:
    """Each asking row's chosen token and top-k under the model's own distribution.

    For a row r with ``params[r].logprobs = k``: lp = log_softmax(logits[r]) over the raw logits,
    before temperature, top-k and top-p (what OpenAI and vLLM report by default), so a token drawn
    at temperature T still gets log p(token), not log p_T(token). Reported: lp[tokens[r]] and the k
    largest (id, lp), best first. One log_softmax, gather and topk over just the asking rows (k the
    largest asked); only [asking rows, 1 + 2k] numbers reach the host. Empty when no row asked, else
    one entry per row, None for rows that did not ask.
    """
    asked = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not asked:
        return ()
    index = torch.tensor(asked, dtype=torch.int64, device=logits.device)
    lp = logits.index_select(0, index).float().log_softmax(dim=-1)
    picked = tokens.index_select(0, index)
    chosen = lp.gather(1, picked[:, None])[:, 0]
    k = min(max(params[i].logprobs or 0 for i in asked), lp.shape[-1])
    top_lp, top_ids = lp.topk(k, dim=-1)  # sorted, best first
    ids, values, token_ids, logprobs = top_ids.tolist(), top_lp.tolist(), picked.tolist(), chosen.tolist()
    out: list[TokenLogprob | None] = [None] * len(params)
    for j, i in enumerate(asked):
        want = params[i].logprobs or 0
        top = tuple(zip(ids[j][:want], values[j][:want], strict=True))
        out[i] = TokenLogprob(token_ids[j], logprobs[j], top)
    return tuple(out)


def _sample_random(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    output_indices: Sequence[int],
    generator: torch.Generator | None,
) -> torch.Tensor:
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], device=device, dtype=logits.dtype)
    top_k = torch.tensor([p.top_k for p in params], device=device)
    top_p = torch.tensor([p.top_p for p in params], device=device, dtype=logits.dtype)
    probs = apply_top_k_top_p(logits / temperature[:, None], top_k, top_p).softmax(dim=-1)
    noise = torch.empty_like(probs)
    unseeded = [i for i, p in enumerate(params) if p.seed is None]
    if unseeded:
        noise[unseeded] = torch.empty(
            len(unseeded), probs.shape[-1], device=device, dtype=probs.dtype
        ).exponential_(generator=generator)
    for i, p in enumerate(params):
        if p.seed is not None:
            cpu = torch.Generator().manual_seed(noise_seed(p.seed, output_indices[i]))
            noise[i] = torch.empty(probs.shape[-1], dtype=probs.dtype).exponential_(generator=cpu).to(device)
    return (probs / noise.clamp_min(torch.finfo(probs.dtype).tiny)).argmax(dim=-1)


class Sampler:
    """Holds the generator for unseeded requests; everything else is in ``sample_tokens``."""

    def __init__(self, seed: int, device: torch.device):
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def __call__(
        self, logits: torch.Tensor, params: Sequence[SamplingParams], output_indices: Sequence[int]
    ) -> list[int]:
        return sample_tokens(logits, params, output_indices, self.generator)

    def sample(
        self, logits: torch.Tensor, params: Sequence[SamplingParams], output_indices: Sequence[int]
    ) -> tuple[list[int], tuple[TokenLogprob | None, ...]]:
        """The tokens, and the logprobs of the rows whose params ask for them (see token_logprobs)."""
        tokens = pick_tokens(logits, params, output_indices, self.generator)
        return tokens.tolist(), token_logprobs(logits, tokens, params)
