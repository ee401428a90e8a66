"""The router's public gRPC API: validate, admit, pick a replica, stream detokenized tokens back."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator

import grpc
from opentelemetry import trace
from tokenizers import Tokenizer

from trellis.core import log
from trellis.core.telemetry import outgoing_metadata, span_attributes, tracer
from trellis.routing.detokenizer import IncrementalDetokenizer
from trellis.routing.replicas import ReplicaSet, ReplicaState
from trellis.routing.validation import InvalidRequest, Limits, check_length, check_request
from trellis.v1 import router_pb2, router_pb2_grpc, stage_pb2

_TRACER = tracer("trellis.router")
DEFAULT_TIMEOUT_S = 600.0  # a request without a deadline still gets one upstream
# What the head's finish reasons mean to a client.
FINISH = {"stop": "stop", "length": "length", "too_long": "length", "abort": "abort"}


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(
        self,
        replicas: ReplicaSet,
        limits: Limits,
        tokenizer: Tokenizer | None,
        *,
        model_name: str,
        max_queue: int,
    ) -> None:
        self.replicas = replicas
        self.limits = limits
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_queue = max_queue
        self.outstanding = 0
        self._ids = itertools.count()

    async def Generate(
        self, request: router_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[router_pb2.GenerateResponse]:
        request_id = request.request_id or uuid.uuid4().hex
        logger = log.get(request_id=request_id)
        try:
            check_request(request, self.limits)
            prompt = (
                self.tokenizer.encode(request.text).ids
                if request.WhichOneof("prompt") == "text"
                else list(request.token_ids.ids)
            )
            if not prompt:
                raise InvalidRequest("the prompt text encodes to no tokens")
            sp = request.sampling
            max_tokens = check_length(
                len(prompt), sp.max_tokens if sp.HasField("max_tokens") else None, self.limits
            )
        except InvalidRequest as e:
            logger.info("request rejected", reason=str(e))
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if self.outstanding >= self.max_queue:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the router is at its limit of {self.max_queue} requests in flight; retry later",
            )
        replica = self.replicas.pick()
        if replica is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no replica is serving")
        sampling = stage_pb2.SubmitRequest(request_id=request_id, prompt_ids=prompt).sampling
        sampling.CopyFrom(sp)
        sampling.max_tokens = max_tokens
        upstream = stage_pb2.SubmitRequest(request_id=request_id, prompt_ids=prompt, sampling=sampling)
        self.outstanding += 1
        replica.outstanding += 1
        key = next(self._ids)
        span = _TRACER.start_span(
            "router.generate",
            attributes=span_attributes(
                request_id=request_id, replica=replica.name, prompt_tokens=len(prompt), max_tokens=max_tokens
            ),
        )
        try:
            async for resp in self._stream(replica, key, upstream, request, context, len(prompt), span):
                if resp.finish_reason:
                    span.set_attributes(
                        span_attributes(
                            finish_reason=resp.finish_reason, completion_tokens=resp.usage.completion_tokens
                        )
                    )
                yield resp
        finally:
            span.end()
            self.outstanding -= 1
            replica.outstanding -= 1
            replica.calls.pop(key, None)

    async def _stream(
        self,
        replica: ReplicaState,
        key: int,
        upstream: stage_pb2.SubmitRequest,
        request: router_pb2.GenerateRequest,
        context: grpc.aio.ServicerContext,
        prompt_len: int,
        span: trace.Span,
    ) -> AsyncIterator[router_pb2.GenerateResponse]:
        remaining = context.time_remaining()
        call = replica.stub.Submit(
            upstream,
            timeout=remaining if remaining is not None else DEFAULT_TIMEOUT_S,
            metadata=outgoing_metadata(span),
        )
        replica.calls[key] = call
        detok = (
            IncrementalDetokenizer(self.tokenizer, upstream.prompt_ids, request.stop)
            if self.tokenizer is not None
            else None
        )
        completion, first = 0, True
        try:
            async for resp in call:
                completion += len(resp.token_ids)
                text = detok.add(resp.token_ids) if detok else ""
                finish = FINISH.get(resp.finish_reason, resp.finish_reason)
                if finish and detok is not None and not detok.stopped:
                    text += detok.flush()
                if detok is not None and detok.stopped:
                    finish = "stop"
                out = router_pb2.GenerateResponse(
                    request_id=upstream.request_id, token_ids=resp.token_ids, text=text, finish_reason=finish
                )
                if first:
                    out.replica, first = replica.name, False
                    out.prompt_token_ids.extend(upstream.prompt_ids)
                if finish:
                    out.usage.prompt_tokens, out.usage.completion_tokens = prompt_len, completion
                yield out
                if finish:
                    if not resp.finish_reason:
                        call.cancel()  # a stop string ended it here: free the replica's blocks
                    return
        except asyncio.CancelledError:
            call.cancel()
            if replica.healthy or context.cancelled():
                raise  # the client went away
            # The monitor cancelled the upstream call: this replica went down.
        except grpc.aio.AioRpcError as e:
            await self._upstream_failed(e, replica, context)
        await context.abort(
            grpc.StatusCode.UNAVAILABLE,
            f"replica {replica.name} went down: {replica.down_reason or 'its stream ended early'}",
        )

    async def _upstream_failed(
        self, e: grpc.aio.AioRpcError, replica: ReplicaState, context: grpc.aio.ServicerContext
    ) -> None:
        code = e.code()
        if code == grpc.StatusCode.CANCELLED and not replica.healthy:
            code, detail = (
                grpc.StatusCode.UNAVAILABLE,
                f"replica {replica.name} went down: {replica.down_reason}",
            )
        elif code in (
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.StatusCode.CANCELLED,
        ):
            detail = e.details() or code.name.lower()
        else:
            detail = e.details() or code.name.lower()
            if f"replica {replica.name}" not in detail:
                detail = f"replica {replica.name} failed: {detail}"
            code = grpc.StatusCode.UNAVAILABLE
        await context.abort(code, detail)

    async def Info(
        self, request: router_pb2.InfoRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.InfoResponse:
        out = router_pb2.InfoResponse(
            model=self.model_name, vocab_size=self.limits.vocab_size, max_model_len=self.limits.max_model_len
        )
        for r in self.replicas.replicas.values():
            out.replicas.append(
                router_pb2.ReplicaInfo(
                    name=r.name,
                    role=r.view.role,
                    outstanding=r.outstanding,
                    stages=[
                        router_pb2.StageInfo(
                            index=m.stage,
                            layer_start=m.layers[0],
                            layer_end=m.layers[1],
                            tp=m.tp,
                            address=m.grpc_address,
                            alive=r.healthy,
                        )
                        for m in r.view.stages
                    ],
                )
            )
        return out
