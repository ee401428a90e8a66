"""What only the router checks, before a prompt is tokenized: the request id and the prompt's form.

Everything about the request itself (the prompt's tokens and length, sampling, stop strings,
max_tokens) is checked by the one validator, trellis.core.request; these are the checks that
exist because the router takes text: a prompt given as text needs the model's tokenizer, and so
do stop strings (they match text). Every problem is one line naming the field.
"""

from __future__ import annotations

from collections.abc import Sequence

from trellis.core.errors import InvalidRequest
from trellis.core.request import MAX_REQUEST_ID_LEN

Prompt = str | Sequence[int]  # text, or token ids


def router_problem(
    request_id: str, prompt: Prompt | None, stop: Sequence[str], *, has_tokenizer: bool
) -> str | None:
    """What is wrong with the router-only parts of a request (None when they are fine)."""
    if len(request_id) > MAX_REQUEST_ID_LEN:
        return f"request_id is longer than {MAX_REQUEST_ID_LEN} characters"
    if prompt is None:
        return "prompt is missing: set text or token_ids"
    if isinstance(prompt, str):
        if not prompt:
            return "prompt text is empty"
        if not has_tokenizer:
            return "this model has no tokenizer: send the prompt as token_ids"
    elif not prompt:
        return "prompt token_ids is empty"
    if stop and not has_tokenizer:
        return "stop strings need the model's tokenizer, which this model lacks; use sampling.stop_token_ids"
    return None


def check_router_request(
    request_id: str, prompt: Prompt | None, stop: Sequence[str], *, has_tokenizer: bool
) -> None:
    """Raise InvalidRequest for the first router-only problem."""
    problem = router_problem(request_id, prompt, stop, has_tokenizer=has_tokenizer)
    if problem:
        raise InvalidRequest(problem)
