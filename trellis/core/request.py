"""The one request validator: what a request must satisfy before any replica sees it.

The router, the head stage's servicer and the offline engine all call `check_request` (the
scheduler trusts what passed it), so a request is refused with the same words wherever it enters.
Limits come from the model (vocabulary) and the deployment (context length). The room rule: a
prompt of n tokens leaves `max_model_len - n` positions, and max_tokens must fit in them; a request
that does not say max_tokens gets `min(DEFAULT_MAX_TOKENS, room)`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from trellis.core.errors import InvalidRequest
from trellis.core.sampling import DEFAULT_MAX_TOKENS, SamplingParams

MAX_STOP_STRINGS = 16
MAX_STOP_LEN = 256
MAX_REQUEST_ID_LEN = 256
MAX_SEED = 2**63
MAX_LOGPROBS = 20  # top alternatives per token, as OpenAI's top_logprobs allows


@dataclass(frozen=True)
class RequestLimits:
    vocab_size: int
    max_model_len: int


def prompt_problem(prompt_ids: Sequence[int], limits: RequestLimits) -> str | None:
    """What is wrong with a prompt given as token ids (None when it can be served)."""
    n = len(prompt_ids)
    if n == 0:
        return "the prompt is empty"
    if n >= limits.max_model_len:
        return f"the prompt has {n} tokens; the context is {limits.max_model_len}"
    bad = next((t for t in prompt_ids if not 0 <= t < limits.vocab_size), None)
    if bad is not None:
        return f"prompt token id {bad} is outside the vocabulary [0, {limits.vocab_size})"
    return None


def sampling_problem(sp: SamplingParams, vocab_size: int) -> str | None:
    """What is wrong with the sampling values themselves (None when valid); names the field. How
    many tokens fit the context is the room rule's (check_request), not a property of the values."""
    if not (math.isfinite(sp.temperature) and sp.temperature >= 0):
        return f"sampling.temperature must be a finite number >= 0, got {sp.temperature}"
    if not (math.isfinite(sp.top_p) and 0 < sp.top_p <= 1):
        return f"sampling.top_p must be in (0, 1], got {sp.top_p}"
    if sp.top_k < 0:
        return f"sampling.top_k must be >= 0 (0 disables it), got {sp.top_k}"
    if sp.max_tokens <= 0:
        return f"sampling.max_tokens must be > 0, got {sp.max_tokens}"
    if sp.seed is not None and not 0 <= sp.seed < MAX_SEED:
        return f"sampling.seed must be in [0, 2^63), got {sp.seed}"
    if sp.logprobs is not None and not 0 <= sp.logprobs <= MAX_LOGPROBS:
        return f"sampling.logprobs must be in [0, {MAX_LOGPROBS}] (unset: none), got {sp.logprobs}"
    bad = next((t for t in sp.stop_token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        return f"sampling.stop_token_ids: {bad} is outside the vocabulary [0, {vocab_size})"
    return None


def stop_problem(stop: Sequence[str]) -> str | None:
    """What is wrong with a request's stop strings (None when valid)."""
    if len(stop) > MAX_STOP_STRINGS:
        return f"stop has {len(stop)} strings; at most {MAX_STOP_STRINGS} are allowed"
    for s in stop:
        if not s:
            return "stop contains an empty string"
        if len(s) > MAX_STOP_LEN:
            return f"a stop string is longer than {MAX_STOP_LEN} characters"
    return None


def resolve_max_tokens(prompt_len: int, max_tokens: int | None, limits: RequestLimits) -> int:
    """The max_tokens to run with: the default where unset (cut to the room left), else as asked;
    raises InvalidRequest when the prompt plus max_tokens is past the context."""
    room = limits.max_model_len - prompt_len
    if max_tokens is None:
        return max(1, min(DEFAULT_MAX_TOKENS, room))
    if max_tokens > room:
        raise InvalidRequest(
            f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) is past the "
            f"context of {limits.max_model_len}"
        )
    return max_tokens


def check_request(
    prompt_ids: Sequence[int],
    sampling: SamplingParams,
    limits: RequestLimits,
    *,
    max_tokens_given: bool = True,
) -> SamplingParams:
    """Raise InvalidRequest for the first problem; return the sampling to run with.

    With max_tokens_given=False, sampling.max_tokens is ignored and the default applies (the room
    rule above); otherwise prompt + max_tokens must fit the context.
    """
    problem = prompt_problem(prompt_ids, limits) or sampling_problem(
        sampling if max_tokens_given else replace(sampling, max_tokens=1), limits.vocab_size
    )
    if problem:
        raise InvalidRequest(problem)
    if max_tokens_given and sampling.max_tokens >= limits.max_model_len:
        raise InvalidRequest(
            f"sampling.max_tokens {sampling.max_tokens} is past the context of {limits.max_model_len}"
        )
    max_tokens = resolve_max_tokens(
        len(prompt_ids), sampling.max_tokens if max_tokens_given else None, limits
    )
    return sampling if max_tokens == sampling.max_tokens else replace(sampling, max_tokens=max_tokens)
