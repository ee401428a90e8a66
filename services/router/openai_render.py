"""The OpenAI response shapes: whole responses, stream chunks, usage and logprobs, from the Router's deltas.

Invariant: a choice's streamed texts add up to its text in the whole response (both are the Router's
deltas concatenated); usage counts each prompt once and every choice's completion tokens.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tokenizers import Tokenizer

from trellis.core.plan import TokenLogprob
from trellis.routing.router import Delta


def delta_logprobs(delta: Delta) -> tuple[TokenLogprob, ...]:
    """The per-token logprobs a delta carries (none unless the request asked)."""
    return delta.logprobs


@dataclass
class Choice:
    """What one choice has produced so far."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, delta: Delta) -> None:
        self.text += delta.text
        self.token_ids.extend(delta.token_ids)
        self.logprobs.extend(delta_logprobs(delta))
        if delta.finish_reason:
            self.finish_reason = delta.finish_reason
        if delta.usage is not None:
            self.prompt_tokens = delta.usage.prompt_tokens
            self.completion_tokens = delta.usage.completion_tokens


def usage(choices: Sequence[Choice], n: int) -> dict[str, int]:
    """Choices come n per prompt (index = prompt * n + i): each prompt counts once."""
    prompt = sum(c.prompt_tokens for i, c in enumerate(choices) if i % n == 0)
    completion = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class Shapes:
    """What both endpoints share: the id, the clock, the model, the token strings."""

    object_name = ""
    chunk_object = ""

    def __init__(
        self, response_id: str, model: str, tokenizer: Tokenizer | None, want_logprobs: bool
    ) -> None:
        self.id, self.model, self.tokenizer = response_id, model, tokenizer
        self.created = int(time.time())
        self.want_logprobs = want_logprobs

    def token(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def response(self, choices: Sequence[Choice], n: int) -> dict[str, Any]:
        body = self._head(self.object_name)
        body["choices"] = [self.choice(i, c) for i, c in enumerate(choices)]
        body["usage"] = usage(choices, n)
        return body

    def usage_chunk(self, choices: Sequence[Choice], n: int) -> dict[str, Any]:
        return {**self._head(self.chunk_object), "choices": [], "usage": usage(choices, n)}

    def chunk(self, index: int, delta: Delta, first: bool, with_usage: bool) -> dict[str, Any] | None:
        """The stream chunk for one delta (None when it has nothing to tell)."""
        lps = delta_logprobs(delta) if self.want_logprobs else ()
        if not (delta.text or delta.finish_reason or lps or first):
            return None
        body = self._head(self.chunk_object)
        body["choices"] = [self.chunk_choice(index, delta, first, lps)]
        if with_usage:
            body["usage"] = None
        return body

    def choice(self, index: int, c: Choice) -> dict[str, Any]:
        raise NotImplementedError

    def chunk_choice(
        self, index: int, delta: Delta, first: bool, lps: Sequence[TokenLogprob]
    ) -> dict[str, Any]:
        raise NotImplementedError


class CompletionShapes(Shapes):
    object_name = chunk_object = "text_completion"

    def logprobs(self, lps: Sequence[TokenLogprob], offset: int) -> dict[str, Any] | None:
        if not self.want_logprobs:
            return None
        tokens = [self.token(lp.token_id) for lp in lps]
        offsets, at = [], offset
        for t in tokens:
            offsets.append(at)
            at += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{self.token(t): p for t, p in lp.top} for lp in lps],
            "text_offset": offsets,
        }

    def choice(self, index: int, c: Choice) -> dict[str, Any]:
        return {
            "index": index,
            "text": c.text,
            "logprobs": self.logprobs(c.logprobs, 0),
            "finish_reason": c.finish_reason,
        }

    def chunk_choice(
        self, index: int, delta: Delta, first: bool, lps: Sequence[TokenLogprob]
    ) -> dict[str, Any]:
        return {
            "index": index,
            "text": delta.text,
            "logprobs": self.logprobs(lps, 0),
            "finish_reason": delta.finish_reason or None,
        }


class ChatShapes(Shapes):
    object_name, chunk_object = "chat.completion", "chat.completion.chunk"

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self.token(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    def logprobs(self, lps: Sequence[TokenLogprob]) -> dict[str, Any] | None:
        if not self.want_logprobs:
            return None
        content = [
            {**self._entry(lp.token_id, lp.logprob), "top_logprobs": [self._entry(t, p) for t, p in lp.top]}
            for lp in lps
        ]
        return {"content": content}

    def choice(self, index: int, c: Choice) -> dict[str, Any]:
        return {
            "index": index,
            "message": {"role": "assistant", "content": c.text},
            "logprobs": self.logprobs(c.logprobs),
            "finish_reason": c.finish_reason,
        }

    def chunk_choice(
        self, index: int, delta: Delta, first: bool, lps: Sequence[TokenLogprob]
    ) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant"} if first else {}
        if delta.text or first:
            message["content"] = delta.text
        return {
            "index": index,
            "delta": message,
            "logprobs": self.logprobs(lps),
            "finish_reason": delta.finish_reason or None,
        }
