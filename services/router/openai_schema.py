"""The OpenAI request bodies this router accepts (pydantic), and the one rule for fields it does not.

Invariant: a request either maps exactly onto what the router runs, or is refused naming the field.
A field we do not know is refused (it might change what the client expects: `echo`, `suffix`,
`tools`, ...); a known field is accepted only at a value that changes nothing here (`echo: false`,
`presence_penalty: 0`, `best_of` equal to `n`, `user` anything). Sampling values themselves
(temperature range, top_p, the room left for max_tokens, ...) are the one validator's
(trellis.core.request), not repeated here.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from trellis.core.errors import InvalidRequest

MAX_LOGPROBS = 20  # OpenAI's limit for top_logprobs
OPENAI_DEFAULT_TEMPERATURE = 1.0  # what an OpenAI client expects when it does not say


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Common(BaseModel):
    """Fields both endpoints share (extensions as vLLM: top_k, ignore_eos, stop_token_ids)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Known, accepted only where they change nothing (see `unsupported`).
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    min_tokens: int | None = None

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def _common_unsupported(self) -> str | None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0):
                return f"{name}: only 0 is supported"
        if self.repetition_penalty not in (None, 1):
            return "repetition_penalty: only 1 is supported"
        if self.logit_bias:
            return "logit_bias: not supported"
        if self.min_tokens not in (None, 0):
            return "min_tokens: not supported"
        if self.stream_options is not None and not self.stream:
            return "stream_options: only allowed when stream is true"
        if self.stream_options is not None and self.stream_options.continuous_usage_stats:
            return "stream_options.continuous_usage_stats: not supported"
        return None


TokenIds = list[int]


class CompletionRequest(_Common):
    prompt: str | list[str] | TokenIds | list[TokenIds]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def prompts(self) -> list[str | tuple[int, ...]]:
        """Every prompt of the request: one text or token list, or a list of them."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [tuple(p)]  # type: ignore[arg-type]
        return [x if isinstance(x, str) else tuple(x) for x in p]  # type: ignore[union-attr]

    def unsupported(self) -> str | None:
        if self.echo:
            return "echo: not supported"
        if self.suffix:
            return "suffix: not supported"
        if self.best_of is not None and self.best_of != self.n:
            return "best_of: only best_of equal to n is supported"
        if not self.prompt:
            return "prompt: is empty"
        return self._common_unsupported()


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_template_input(self) -> dict[str, Any]:
        """The message as chat templates read it: role and content as one string."""
        content = self.content
        text = "".join(p.text for p in content) if isinstance(content, list) else (content or "")
        out: dict[str, Any] = {"role": self.role, "content": text}
        if self.name is not None:
            out["name"] = self.name
        return out


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    store: bool | None = None
    metadata: dict[str, str] | None = None

    def token_limit(self) -> int | None:
        """max_completion_tokens (the current name), else max_tokens (the deprecated one)."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def logprobs_k(self) -> int | None:
        """SamplingParams.logprobs: None unless logprobs is true; then the top_logprobs asked for."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def unsupported(self) -> str | None:
        if not self.messages:
            return "messages: is empty"
        if self.tools or self.functions:
            return "tools: tool calling is not supported"
        if self.tool_choice not in (None, "none") or self.function_call not in (None, "none"):
            return "tool_choice: tool calling is not supported"
        if self.response_format is not None and self.response_format.type != "text":
            return f"response_format: only type 'text' is supported, got {self.response_format.type!r}"
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs: needs logprobs to be true"
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            return "max_tokens: give max_completion_tokens or max_tokens, not both"
        return self._common_unsupported()


def check_supported(request: CompletionRequest | ChatCompletionRequest) -> None:
    """Raise InvalidRequest naming the first field set to something this router does not do."""
    problem = request.unsupported()
    if problem:
        raise InvalidRequest(problem)
