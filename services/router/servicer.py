"""The router's public gRPC API: protobuf in, the domain Router, protobuf out.

All the logic is in trellis.routing.router.Router; errors of the tree it raises become statuses in
the server's interceptor (trellis/wire/server.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc

from trellis.core.sampling import DEFAULT_MAX_TOKENS
from trellis.routing.router import Delta, Router
from trellis.routing.validation import Prompt
from trellis.v1 import router_pb2, router_pb2_grpc
from trellis.wire.plan_codec import logprob_to_pb, sampling_from_pb


def _prompt(request: router_pb2.GenerateRequest) -> Prompt | None:
    which = request.WhichOneof("prompt")
    if which == "text":
        return request.text
    if which == "token_ids":
        return tuple(request.token_ids.ids)
    return None


def _response(delta: Delta) -> router_pb2.GenerateResponse:
    out = router_pb2.GenerateResponse(
        request_id=delta.request_id,
        token_ids=delta.token_ids,
        text=delta.text,
        finish_reason=delta.finish_reason,
        replica=delta.replica,
        prompt_token_ids=delta.prompt_ids,
        logprobs=[logprob_to_pb(lp) for lp in delta.logprobs],
    )
    if delta.usage is not None:
        out.usage.prompt_tokens = delta.usage.prompt_tokens
        out.usage.completion_tokens = delta.usage.completion_tokens
    return out


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(self, router: Router) -> None:
        self.router = router

    async def Generate(
        self, request: router_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[router_pb2.GenerateResponse]:
        sp = request.sampling
        deltas = self.router.generate(
            _prompt(request),
            # An unset max_tokens is the router's to resolve (max_tokens_given=False).
            sampling_from_pb(sp, default_max_tokens=DEFAULT_MAX_TOKENS),
            max_tokens_given=sp.HasField("max_tokens"),
            stop=tuple(request.stop),
            request_id=request.request_id,
            deadline_s=context.time_remaining(),
        )
        async with contextlib.aclosing(deltas):
            async for delta in deltas:
                yield _response(delta)

    async def Info(
        self, request: router_pb2.InfoRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.InfoResponse:
        info = self.router.info()
        return router_pb2.InfoResponse(
            model=info.model,
            vocab_size=info.vocab_size,
            max_model_len=info.max_model_len,
            replicas=[
                router_pb2.ReplicaInfo(
                    name=r.name,
                    role=r.role,
                    outstanding=r.outstanding,
                    stages=[
                        router_pb2.StageInfo(
                            index=s.index,
                            layer_start=s.layer_start,
                            layer_end=s.layer_end,
                            tp=s.tp,
                            address=s.address,
                            alive=s.alive,
                        )
                        for s in r.stages
                    ],
                )
                for r in info.replicas
            ],
        )
