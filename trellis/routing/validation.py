"""Request validation at the router: every problem named, before anything reaches a replica."""

from __future__ import annotations

import math
from dataclasses import dataclass

from trellis.v1 import router_pb2

MAX_STOP_STRINGS = 16
MAX_STOP_LEN = 256
MAX_REQUEST_ID_LEN = 256


@dataclass(frozen=True)
class Limits:
    vocab_size: int
    max_model_len: int
    default_max_tokens: int
    has_tokenizer: bool


class InvalidRequest(ValueError):
    """What is wrong with a request, in one line (becomes INVALID_ARGUMENT)."""


def check_request(req: router_pb2.GenerateRequest, limits: Limits) -> None:
    """Raise InvalidRequest for the first problem with everything but the prompt's length."""
    if len(req.request_id) > MAX_REQUEST_ID_LEN:
        raise InvalidRequest(f"request_id is longer than {MAX_REQUEST_ID_LEN} characters")
    which = req.WhichOneof("prompt")
    if which is None:
        raise InvalidRequest("prompt is missing: set text or token_ids")
    if which == "text":
        if not req.text:
            raise InvalidRequest("prompt text is empty")
        if not limits.has_tokenizer:
            raise InvalidRequest("this model has no tokenizer: send the prompt as token_ids")
    elif not req.token_ids.ids:
        raise InvalidRequest("prompt token_ids is empty")
    else:
        bad = next((t for t in req.token_ids.ids if not 0 <= t < limits.vocab_size), None)
        if bad is not None:
            raise InvalidRequest(f"prompt token id {bad} is outside the vocabulary [0, {limits.vocab_size})")
    _check_sampling(req.sampling, limits)
    if req.stop and not limits.has_tokenizer:  # stop strings match text, which needs the tokenizer
        raise InvalidRequest(
            "stop strings need the model's tokenizer, which this model lacks; use sampling.stop_token_ids"
        )
    if len(req.stop) > MAX_STOP_STRINGS:
        raise InvalidRequest(f"stop has {len(req.stop)} strings; at most {MAX_STOP_STRINGS} are allowed")
    for s in req.stop:
        if not s:
            raise InvalidRequest("stop contains an empty string")
        if len(s) > MAX_STOP_LEN:
            raise InvalidRequest(f"a stop string is longer than {MAX_STOP_LEN} characters")


def _check_sampling(sp: router_pb2.SamplingParams, limits: Limits) -> None:
    if not math.isfinite(sp.temperature) or sp.temperature < 0:
        raise InvalidRequest(f"sampling.temperature must be a finite number >= 0, got {sp.temperature}")
    if sp.HasField("top_p") and not (math.isfinite(sp.top_p) and 0 < sp.top_p <= 1):
        raise InvalidRequest(f"sampling.top_p must be in (0, 1], got {sp.top_p}")
    if sp.top_k < 0:
        raise InvalidRequest(f"sampling.top_k must be >= 0 (0 disables it), got {sp.top_k}")
    if sp.HasField("max_tokens") and sp.max_tokens <= 0:
        raise InvalidRequest(f"sampling.max_tokens must be > 0, got {sp.max_tokens}")
    if sp.HasField("max_tokens") and sp.max_tokens >= limits.max_model_len:
        raise InvalidRequest(
            f"sampling.max_tokens {sp.max_tokens} is past the context of {limits.max_model_len}"
        )
    if sp.HasField("seed") and sp.seed >= 2**63:
        raise InvalidRequest(f"sampling.seed must be < 2^63, got {sp.seed}")
    bad = next((t for t in sp.stop_token_ids if not 0 <= t < limits.vocab_size), None)
    if bad is not None:
        raise InvalidRequest(
            f"sampling.stop_token_ids: {bad} is outside the vocabulary [0, {limits.vocab_size})"
        )


def check_length(prompt_len: int, max_tokens: int | None, limits: Limits) -> int:
    """The max_tokens to ask for; raises when the prompt (plus max_tokens) does not fit the context."""
    if prompt_len >= limits.max_model_len:
        raise InvalidRequest(f"the prompt has {prompt_len} tokens; the context is {limits.max_model_len}")
    room = limits.max_model_len - prompt_len
    if max_tokens is None:
        return min(limits.default_max_tokens, room)
    if max_tokens > room:
        raise InvalidRequest(
            f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) is past the "
            f"context of {limits.max_model_len}"
        )
    return max_tokens
