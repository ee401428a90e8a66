"""The stage leader's gRPC control API: Submit (head only), Stats, Drain, plus grpc.health.v1."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc

from trellis.core import log
from trellis.core.telemetry import incoming_context, span_attributes, tracer
from trellis.runtime.head import Head, ReplicaFailed
from trellis.v1 import stage_pb2, stage_pb2_grpc
from trellis.wire.plan_codec import sampling_from_pb

if TYPE_CHECKING:
    from services.stage_worker.service import StageService


_TRACER = tracer("trellis.stage_worker")


class StageWorkerServicer(stage_pb2_grpc.StageWorkerServicer):
    def __init__(self, service: StageService) -> None:
        self.service = service

    @property
    def head(self) -> Head | None:
        return self.service.head

    async def Submit(
        self, request: stage_pb2.SubmitRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[stage_pb2.SubmitResponse]:
        svc = self.service
        if svc.launch.stage != 0:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"stage {svc.launch.stage} is not a head stage; submit to stage 0",
            )
        if self.head is None or not svc.ready:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the replica is still starting")
        if svc.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the replica is draining")
        problem = svc.request_problem(request)
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        sampling = sampling_from_pb(request.sampling, default_max_tokens=svc.default_max_tokens)
        logger = log.get(request_id=request.request_id)
        try:
            stream = self.head.submit(list(request.prompt_ids), sampling)
        except ReplicaFailed as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"replica {svc.launch.replica} failed: {e}")
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        logger.debug("request admitted", seq_id=stream.seq_id, prompt_tokens=len(request.prompt_ids))
        span = _TRACER.start_span(
            "stage.submit",
            context=incoming_context(context.invocation_metadata()),
            attributes=span_attributes(
                request_id=request.request_id,
                replica=svc.launch.replica,
                seq_id=stream.seq_id,
                prompt_tokens=len(request.prompt_ids),
            ),
        )
        finished, generated = False, 0
        try:
            async for delta in stream:
                finished = delta.finished
                generated += len(delta.token_ids)
                yield stage_pb2.SubmitResponse(
                    token_ids=delta.token_ids, finish_reason=str(delta.finish_reason or "")
                )
        except ReplicaFailed as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"replica {svc.launch.replica} failed: {e}")
        except asyncio.CancelledError:
            logger.info("request cancelled", seq_id=stream.seq_id)
            raise
        finally:
            span.set_attributes(span_attributes(generated_tokens=generated, finished=finished))
            span.end()
            if not finished:  # cancelled, deadline passed, or the stream broke: free its blocks
                self.head.abort(stream.seq_id)

    async def Stats(
        self, request: stage_pb2.StatsRequest, context: grpc.aio.ServicerContext
    ) -> stage_pb2.StageStats:
        return self.service.stats()

    async def Drain(
        self, request: stage_pb2.DrainRequest, context: grpc.aio.ServicerContext
    ) -> stage_pb2.DrainResponse:
        drained = await self.service.drain(timeout=max(0.0, (context.time_remaining() or 30.0) - 0.5))
        return stage_pb2.DrainResponse(drained=drained)
