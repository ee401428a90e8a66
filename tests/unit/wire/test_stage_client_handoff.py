"""GrpcStageClient's P/D calls over a real in-process server: the hand-off travels in Submit only when
set, block sums come back in the chunks, targets convert both ways, errors keep their branch."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from trellis.core.errors import DeadlineExceeded, InvalidRequest, Overloaded, Unavailable
from trellis.core.handoff_api import HandoffError, HandoffRef, HandoffTarget
from trellis.core.sampling import SamplingParams
from trellis.core.stage_api import StageRequest
from trellis.v1 import stage_pb2, stage_pb2_grpc
from trellis.wire.server import build_server
from trellis.wire.stage_client import (
    GrpcStageClient,
    handoff_from_pb,
    handoff_to_pb,
    target_from_pb,
    target_to_pb,
)

TARGET = HandoffTarget("/dev/shm/slab-d0", 2, (7, 3, 9), 16, "fp-key", 1_700_000_030.5)


class Stage(stage_pb2_grpc.StageWorkerServicer):
    def __init__(self) -> None:
        self.submits: list[stage_pb2.SubmitRequest] = []
        self.attaches: list[stage_pb2.AttachHandoffRequest] = []
        self.full = False

    async def Submit(
        self, request: stage_pb2.SubmitRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[stage_pb2.SubmitResponse]:
        self.submits.append(request)
        yield stage_pb2.SubmitResponse(token_ids=[5])
        yield stage_pb2.SubmitResponse(finish_reason="handoff", block_sums=[2**63 - 1, -4])

    async def ReserveHandoff(
        self, request: stage_pb2.ReserveHandoffRequest, context: grpc.aio.ServicerContext
    ) -> stage_pb2.ReserveHandoffResponse:
        if self.full:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "replica d0: no free staging slots")
        if request.transfer_id == "bad":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "transfer bad is already reserved here")
        if request.transfer_id == "empty":
            return stage_pb2.ReserveHandoffResponse()
        assert list(request.prompt_ids) == [1, 2, 3] and request.ttl_s == 30.0 and request.epoch == 1
        return stage_pb2.ReserveHandoffResponse(target=target_to_pb(TARGET))

    async def AttachHandoff(
        self, request: stage_pb2.AttachHandoffRequest, context: grpc.aio.ServicerContext
    ) -> stage_pb2.AttachHandoffResponse:
        self.attaches.append(request)
        return stage_pb2.AttachHandoffResponse(attached=request.transfer_id == "t1")

    async def AbortHandoff(
        self, request: stage_pb2.AbortHandoffRequest, context: grpc.aio.ServicerContext
    ) -> stage_pb2.AbortHandoffResponse:
        if request.transfer_id == "slow":
            await asyncio.sleep(5)
        return stage_pb2.AbortHandoffResponse(aborted=request.transfer_id == "t1")


def test_the_handoff_calls_over_grpc() -> None:
    async def scenario() -> None:
        stage = Stage()
        server = build_server(
            "127.0.0.1", 0, lambda s: stage_pb2_grpc.add_StageWorkerServicer_to_server(stage, s)
        )
        await server.start()
        client = GrpcStageClient(f"127.0.0.1:{server.port}")
        try:
            sp = SamplingParams(max_tokens=4)
            plain = [c async for c in client.submit(StageRequest("q", (1, 2, 3), sp), timeout_s=5)]
            ref = HandoffRef("t1", 1, first_token=0, block_sums=(2**63 - 1, -4))
            req = StageRequest("q", (1, 2, 3), sp, handoff=ref)
            halves = [c async for c in client.submit(req, timeout_s=5)]
            assert not stage.submits[0].HasField("handoff")  # an ordinary request carries none
            assert handoff_from_pb(stage.submits[1].handoff) == ref  # token 0 is a token, not "unset"
            assert handoff_from_pb(stage.submits[0].handoff) is None
            assert plain == halves and halves[-1].finish_reason == "handoff"
            assert halves[0].token_ids == (5,) and halves[-1].block_sums == (2**63 - 1, -4)

            assert await client.reserve_handoff("t1", 1, [1, 2, 3], 30.0, timeout_s=5) == TARGET
            assert await client.attach_handoff("t1", 1, TARGET, timeout_s=5) is True
            assert await client.attach_handoff("t2", 1, None, timeout_s=5) is False
            with_target, without = stage.attaches
            assert target_from_pb(with_target.target) == TARGET and not without.HasField("target")
            assert await client.abort_handoff("t1", 1, timeout_s=5) is True
            assert await client.abort_handoff("t9", 1, timeout_s=5) is False

            with pytest.raises(InvalidRequest, match="already reserved"):
                await client.reserve_handoff("bad", 1, [1, 2, 3], 30.0, timeout_s=5)
            with pytest.raises(Unavailable, match="no target"):
                await client.reserve_handoff("empty", 1, [1, 2, 3], 30.0, timeout_s=5)
            stage.full = True
            with pytest.raises(Overloaded, match="no free staging slots"):
                await client.reserve_handoff("t1", 1, [1, 2, 3], 30.0, timeout_s=5)
            with pytest.raises(DeadlineExceeded):
                await client.abort_handoff("slow", 1, timeout_s=0.05)
        finally:
            await client.close()
            await server.stop(grace=None)

    asyncio.run(scenario())


def test_conversions_both_ways_and_bad_targets() -> None:
    ref = HandoffRef("t", 2)
    pb = handoff_to_pb(ref)
    assert not pb.HasField("first_token")  # the prefill half leaves it unset on the wire
    assert handoff_from_pb(pb) == ref and not ref.is_decode_half
    assert handoff_from_pb(stage_pb2.Handoff()) is None
    assert target_from_pb(target_to_pb(TARGET)) == TARGET
    empty = HandoffTarget("", 4, (), 16, "fp")  # D holds every block already: nothing to copy
    assert target_from_pb(target_to_pb(empty)) == empty
    for bad in (
        stage_pb2.HandoffTarget(slab="s", first_block=-1, slots=[0], block_size=16),
        stage_pb2.HandoffTarget(slab="s", slots=[0], block_size=0),
        stage_pb2.HandoffTarget(slab="s", slots=[-2], block_size=16),
        stage_pb2.HandoffTarget(slab="", slots=[0], block_size=16),
    ):
        with pytest.raises(HandoffError, match="bad hand-off target"):
            target_from_pb(bad)
