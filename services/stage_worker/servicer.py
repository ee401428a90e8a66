"""The stage leader's gRPC control API: Submit (head only), Stats, Drain (health: trellis.wire.server).

Protobuf <-> domain only: a request is checked by the one validator (trellis.core.request) against
the service's limits, and the service's StageStats become the wire's.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator

import grpc

from services.stage_worker.handoff_rpcs import HandoffRpcs
from services.stage_worker.service import StageService
from trellis.core import log
from trellis.core.errors import InvalidRequest
from trellis.core.handoff_api import HandoffError
from trellis.core.request import check_request
from trellis.core.sampling import DEFAULT_MAX_TOKENS
from trellis.core.stage_api import StageStats, draining_refusal
from trellis.core.telemetry import incoming_context, span_attributes, tracer
from trellis.runtime.head import ReplicaFailed
from trellis.v1 import stage_pb2, stage_pb2_grpc
from trellis.wire.plan_codec import logprob_to_pb, sampling_from_pb
from trellis.wire.stage_client import handoff_from_pb, unpack_hashes

_TRACER = tracer("trellis.stage_worker")


class StageWorkerServicer(HandoffRpcs, stage_pb2_grpc.StageWorkerServicer):
    def __init__(self, service: StageService) -> None:
        self.service = service

    async def Submit(
        self, request: stage_pb2.SubmitRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[stage_pb2.SubmitResponse]:
        svc = self.service
        if not svc.is_head:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"stage {svc.launch.stage} is not a head stage; submit to stage 0",
            )
        head = svc.head
        if head is None or not svc.ready:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the replica is still starting")
        try:
            handoff = handoff_from_pb(request.handoff) if request.HasField("handoff") else None
        except HandoffError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        decode_half = handoff is not None and handoff.is_decode_half  # admitted at its reservation
        if svc.draining and not decode_half:  # the router sees "... is draining" and tries another
            await context.abort(grpc.StatusCode.UNAVAILABLE, draining_refusal(svc.launch.replica))
        prompt = list(request.prompt_ids)
        try:
            sampling = check_request(
                prompt,
                sampling_from_pb(request.sampling, default_max_tokens=DEFAULT_MAX_TOKENS),
                svc.limits,
                max_tokens_given=request.sampling.HasField("max_tokens"),
            )
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        logger = log.get(request_id=request.request_id)
        try:
            if handoff is None:
                stream = head.submit(prompt, sampling)
            elif handoff.is_decode_half:
                stream = svc.handoff.submit_decode(prompt, sampling, handoff)
            else:
                stream = svc.handoff.submit_prefill(prompt, sampling, handoff)
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
                    token_ids=delta.token_ids,
                    finish_reason=str(delta.finish_reason or ""),
                    logprobs=[logprob_to_pb(lp) for lp in delta.logprobs],
                    block_sums=delta.block_sums,
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
                head.abort(stream.seq_id)

    async def Stats(
        self, request: stage_pb2.StatsRequest, context: grpc.aio.ServicerContext
    ) -> stage_pb2.StageStats:
        return stats_to_pb(self.service.stats())

    async def MatchPrefix(
        self, request: stage_pb2.MatchPrefixRequest, context: grpc.aio.ServicerContext
    ) -> stage_pb2.MatchPrefixResponse:
        """The leading run of the given block names that this head's prefix cache holds."""
        if not self.service.is_head:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"stage {self.service.launch.stage} is not a head stage; ask stage 0",
            )
        try:
            hashes = unpack_hashes(request.hashes)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        run = self.service.cached_run(hashes)
        if inspect.isawaitable(run):  # the service may answer from its own task
            run = await run
        return stage_pb2.MatchPrefixResponse(run=run)

    async def Drain(
        self, request: stage_pb2.DrainRequest, context: grpc.aio.ServicerContext
    ) -> stage_pb2.DrainResponse:
        """Stop admitting (health NOT_SERVING) and wait, up to engine.drain_grace_s or the call's
        deadline, for the admitted requests; `drained`: none is left. The replica does not exit:
        it stays drained (refuses new requests) until it is restarted."""
        grace = self.service.launch.engine.drain_grace_s
        remaining = context.time_remaining()
        timeout = grace if remaining is None else min(grace, max(0.0, remaining - 0.5))
        drained = await self.service.drain(timeout=timeout)
        return stage_pb2.DrainResponse(drained=drained)


def stats_to_pb(s: StageStats) -> stage_pb2.StageStats:
    return stage_pb2.StageStats(
        replica=s.replica,
        stage=s.stage,
        draining=s.draining,
        ready=s.ready,
        num_blocks=s.num_blocks,
        free_blocks=s.free_blocks,
        running=s.running,
        waiting=s.waiting,
        in_flight_steps=s.in_flight_steps,
        steps=s.steps,
        generated_tokens=s.generated_tokens,
        stage_busy_s=s.stage_busy_s,
        kv_canary=s.kv_canary,
        prefix_hit_tokens=s.prefix_hit_tokens,
        store_loaded_blocks=s.store_loaded_blocks,
        store_voided_loads=s.store_voided_loads,
        pd_prefills=s.pd_prefills,
        pd_fallbacks=s.pd_fallbacks,
        pd_blocks_sent=s.pd_blocks_sent,
        pd_reserved=s.pd_reserved,
        pd_committed=s.pd_committed,
        pd_recomputed=s.pd_recomputed,
        pd_voided=s.pd_voided,
        pd_blocks_loaded=s.pd_blocks_loaded,
        pd_slots_free=s.pd_slots_free,
        pd_slots_held=s.pd_slots_held,
        pd_slots_quarantined=s.pd_slots_quarantined,
    )
