"""A small synchronous client of the router's public API (used by the CLI, the demo and tests)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import grpc

from trellis.core.plan import TokenLogprob
from trellis.v1 import router_pb2, router_pb2_grpc, sampling_pb2
from trellis.wire.plan_codec import logprobs_from_pb

DEFAULT_TIMEOUT_S = 600.0


@dataclass
class Completion:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token when asked


class RouterClient:
    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = router_pb2_grpc.RouterStub(self.channel)

    def info(self, timeout: float = 5.0) -> router_pb2.InfoResponse:
        return self.stub.Info(router_pb2.InfoRequest(), timeout=timeout)

    def stream(
        self,
        prompt: str | Sequence[int],
        *,
        max_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float | None = None,
        top_k: int = 0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        ignore_eos: bool = False,
        logprobs: int | None = None,
        request_id: str = "",
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> Iterator[router_pb2.GenerateResponse]:
        """The response stream (cancel it with .cancel())."""
        sp = sampling_pb2.SamplingParams(
            temperature=temperature, top_k=top_k, ignore_eos=ignore_eos, stop_token_ids=list(stop_token_ids)
        )
        if max_tokens is not None:
            sp.max_tokens = max_tokens
        if top_p is not None:
            sp.top_p = top_p
        if seed is not None:
            sp.seed = seed
        if logprobs is not None:
            sp.logprobs = logprobs
        req = router_pb2.GenerateRequest(request_id=request_id, sampling=sp, stop=list(stop))
        if isinstance(prompt, str):
            req.text = prompt
        else:
            req.token_ids.ids.extend(prompt)
        return self.stub.Generate(req, timeout=timeout)

    def generate(self, prompt: str | Sequence[int], **kw: object) -> Completion:
        """Run to the end."""
        ids: list[int] = []
        logprobs: list[TokenLogprob] = []
        text, finish, prompt_ids = [], "", []
        for resp in self.stream(prompt, **kw):
            prompt_ids = prompt_ids or list(resp.prompt_token_ids)
            ids.extend(resp.token_ids)
            logprobs.extend(logprobs_from_pb(resp.logprobs))
            text.append(resp.text)
            finish = resp.finish_reason or finish
        return Completion(prompt_ids, ids, "".join(text), finish, logprobs)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> RouterClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
