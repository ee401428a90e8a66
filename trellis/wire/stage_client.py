"""The router's StageClient protocol (trellis/routing/stage_client.py) over gRPC: a stage's control API.

Every call has a deadline; the caller's trace context travels as metadata. What the stage answers
becomes the error tree: INVALID_ARGUMENT -> InvalidRequest, RESOURCE_EXHAUSTED -> Overloaded,
DEADLINE_EXCEEDED -> DeadlineExceeded, anything else -> Unavailable naming the stage's address.

The P/D hand-off's plain data (trellis.core.handoff_api) converts here, both ways: the router's
client and the stage's servicer use the same `handoff_to_pb` / `handoff_from_pb` and `target_to_pb` /
`target_from_pb`. On the wire, Handoff.first_token is always written (-1: the prefill half), since
proto3 cannot tell an unset 0 from token 0.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from trellis.core.errors import DeadlineExceeded, InvalidRequest, Overloaded, TrellisError, Unavailable
from trellis.core.handoff_api import HandoffError, HandoffRef, HandoffTarget
from trellis.core.stage_api import StageChunk, StageHealth, StageRequest, StageStats
from trellis.v1 import stage_pb2, stage_pb2_grpc
from trellis.wire.plan_codec import logprobs_from_pb, sampling_to_pb


def pack_hashes(hashes: Sequence[int]) -> bytes:
    """Block names as the wire carries them: little-endian uint64, in order."""
    try:
        return struct.pack(f"<{len(hashes)}Q", *hashes)
    except struct.error:
        raise ValueError("block hashes must be integers in [0, 2**64)") from None


def unpack_hashes(data: bytes) -> list[int]:
    """The inverse of `pack_hashes`; ValueError if the bytes are not whole uint64s."""
    if len(data) % 8:
        raise ValueError(f"packed block hashes: {len(data)} bytes is not a multiple of 8")
    return list(struct.unpack(f"<{len(data) // 8}Q", data))


def handoff_to_pb(ref: HandoffRef) -> stage_pb2.Handoff:
    pb = stage_pb2.Handoff(transfer_id=ref.transfer_id, epoch=ref.epoch, block_sums=ref.block_sums)
    if ref.is_decode_half:  # unset on the wire for the prefill half
        pb.first_token = ref.first_token
    return pb


def handoff_from_pb(pb: stage_pb2.Handoff) -> HandoffRef | None:
    """A request's hand-off, or None when the message is unset (or names no transfer)."""
    if not pb.transfer_id:
        return None
    first = pb.first_token if pb.HasField("first_token") else -1
    if pb.HasField("first_token") and first < 0:
        raise HandoffError(f"a decode half's first token must be a token id, got {first}")
    return HandoffRef(pb.transfer_id, pb.epoch, first, tuple(pb.block_sums))


def target_to_pb(target: HandoffTarget) -> stage_pb2.HandoffTarget:
    return stage_pb2.HandoffTarget(
        slab=target.slab,
        first_block=target.first_block,
        slots=target.slots,
        block_size=target.block_size,
        fingerprint=target.fingerprint,
        deadline=target.deadline,
    )


def target_from_pb(pb: stage_pb2.HandoffTarget) -> HandoffTarget:
    """A target as sent; HandoffError if it cannot be one (a negative index, no block size, slots
    without a slab)."""
    slots = tuple(pb.slots)
    if pb.first_block < 0 or pb.block_size <= 0 or any(s < 0 for s in slots) or (slots and not pb.slab):
        raise HandoffError(
            f"bad hand-off target: first_block {pb.first_block}, block_size {pb.block_size}, "
            f"{len(slots)} slots, slab {pb.slab!r}"
        )
    return HandoffTarget(pb.slab, pb.first_block, slots, pb.block_size, pb.fingerprint, pb.deadline)


def upstream_error(e: grpc.aio.AioRpcError, address: str) -> TrellisError:
    """A stage's failed call as an error of the tree, in one line."""
    code = e.code()
    detail = (e.details() or code.name.lower()).strip().splitlines()[0]
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidRequest(detail)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return Overloaded(detail)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(detail)
    return Unavailable(f"{detail} (from the stage at {address})")


class GrpcStageStream:
    """One Submit call's responses as StageChunks; cancel() ends the call (the head frees the blocks)."""

    def __init__(self, call: grpc.aio.UnaryStreamCall, address: str) -> None:
        self._call = call
        self._address = address
        self._cancelled = False

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()  # does nothing once the call is over

    async def __aiter__(self) -> AsyncIterator[StageChunk]:
        try:
            async for resp in self._call:
                yield StageChunk(
                    tuple(resp.token_ids),
                    resp.finish_reason,
                    logprobs_from_pb(resp.logprobs),
                    tuple(resp.block_sums),
                )
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._cancelled and not (task is not None and task.cancelling()):
                return  # cancel() from another task (the replica went down): the stream just ends
            raise  # our own task is being cancelled (the client went away)
        except grpc.aio.AioRpcError as e:
            if self._cancelled and e.code() == grpc.StatusCode.CANCELLED:
                return
            raise upstream_error(e, self._address) from None


class GrpcStageClient:
    """A stage's StageWorker and health services over one channel."""

    def __init__(self, address: str) -> None:
        self._address = address
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = stage_pb2_grpc.StageWorkerStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    @property
    def address(self) -> str:
        return self._address

    def submit(self, request: StageRequest, *, timeout_s: float) -> GrpcStageStream:
        message = stage_pb2.SubmitRequest(
            request_id=request.request_id,
            prompt_ids=request.prompt_ids,
            sampling=sampling_to_pb(request.sampling),
        )
        if request.handoff is not None:  # unset on the wire: an ordinary request
            message.handoff.CopyFrom(handoff_to_pb(request.handoff))
        call = self._stub.Submit(message, timeout=timeout_s, metadata=list(request.trace_context))
        return GrpcStageStream(call, self._address)

    async def health(self, *, timeout_s: float) -> StageHealth:
        try:
            resp = await self._health.Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError:  # unreachable, or no answer within the deadline
            return StageHealth.DOWN
        if resp.status == health_pb2.HealthCheckResponse.SERVING:
            return StageHealth.SERVING
        return StageHealth.DRAINING  # it answers: NOT_SERVING means "no new work", not "dead"

    async def stats(self, *, timeout_s: float) -> StageStats:
        try:
            s = await self._stub.Stats(stage_pb2.StatsRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError as e:
            raise upstream_error(e, self._address) from None
        return StageStats(
            replica=s.replica,
            stage=s.stage,
            num_blocks=s.num_blocks,
            free_blocks=s.free_blocks,
            running=s.running,
            waiting=s.waiting,
            in_flight_steps=s.in_flight_steps,
            steps=s.steps,
            generated_tokens=s.generated_tokens,
            draining=s.draining,
            ready=s.ready,
            stage_busy_s=tuple(s.stage_busy_s),
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

    async def match_prefix(self, hashes: Sequence[int], *, timeout_s: float) -> int:
        """How many of ``hashes``, from the first, the head's prefix cache holds (MatchPrefix)."""
        request = stage_pb2.MatchPrefixRequest(hashes=pack_hashes(hashes))
        try:
            resp = await self._stub.MatchPrefix(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as e:
            raise upstream_error(e, self._address) from None
        return resp.run

    async def reserve_handoff(
        self, transfer_id: str, epoch: int, prompt_ids: Sequence[int], ttl_s: float, *, timeout_s: float
    ) -> HandoffTarget:
        request = stage_pb2.ReserveHandoffRequest(
            transfer_id=transfer_id, epoch=epoch, prompt_ids=prompt_ids, ttl_s=ttl_s
        )
        try:
            resp = await self._stub.ReserveHandoff(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as e:
            raise upstream_error(e, self._address) from None
        if not resp.HasField("target"):
            raise Unavailable(f"hand-off {transfer_id}: no target (from the stage at {self._address})")
        try:
            return target_from_pb(resp.target)
        except HandoffError as e:
            raise Unavailable(f"{e} (from the stage at {self._address})") from None

    async def attach_handoff(
        self, transfer_id: str, epoch: int, target: HandoffTarget | None, *, timeout_s: float
    ) -> bool:
        request = stage_pb2.AttachHandoffRequest(transfer_id=transfer_id, epoch=epoch)
        if target is not None:  # unset: decode it there
            request.target.CopyFrom(target_to_pb(target))
        try:
            resp = await self._stub.AttachHandoff(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as e:
            raise upstream_error(e, self._address) from None
        return resp.attached

    async def abort_handoff(self, transfer_id: str, epoch: int, *, timeout_s: float) -> bool:
        request = stage_pb2.AbortHandoffRequest(transfer_id=transfer_id, epoch=epoch)
        try:
            resp = await self._stub.AbortHandoff(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as e:
            raise upstream_error(e, self._address) from None
        return resp.aborted

    async def close(self) -> None:
        await self._channel.close()
