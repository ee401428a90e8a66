"""The stage leader's P/D RPCs (a mixin of the servicer): ReserveHandoff, AttachHandoff, AbortHandoff.

Protobuf <-> the head's HandoffSide (trellis/runtime/handoff_side.py) only. Each answers on the head
stage only; no room is RESOURCE_EXHAUSTED (the router runs the request elsewhere), a call that
cannot be honoured is INVALID_ARGUMENT naming why, a replica starting or draining is UNAVAILABLE.
"""

from __future__ import annotations

import math
from typing import NoReturn

import grpc

from services.stage_worker.service import StageService
from trellis.core.handoff_api import HandoffError
from trellis.core.stage_api import draining_refusal
from trellis.runtime.handoff_side import HandoffSide, NoRoomError
from trellis.scheduling.scheduler import InvalidRequestError
from trellis.v1 import stage_pb2
from trellis.wire.stage_client import target_from_pb, target_to_pb


class HandoffRpcs:
    service: StageService

    async def ReserveHandoff(
        self, request: stage_pb2.ReserveHandoffRequest, context: grpc.aio.ServicerContext
    ) -> stage_pb2.ReserveHandoffResponse:
        side = await self._side(context, admitting=True)
        # Finite too: NaN and inf passed a plain `<= 0` check; an infinite ttl_s made a reservation
        # that never expires (its blocks and slots held for good), a NaN one a NaN timer in the
        # event loop's heap (it fired at once, out of order).
        if not (math.isfinite(request.ttl_s) and request.ttl_s > 0) or not request.transfer_id:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "a reservation needs a transfer_id and a finite ttl_s > 0"
            )
        try:
            target = side.reserve(request.transfer_id, list(request.prompt_ids), request.ttl_s)
        except NoRoomError as e:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"replica {self.service.launch.replica}: {e}"
            )
        except (InvalidRequestError, HandoffError) as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return stage_pb2.ReserveHandoffResponse(target=target_to_pb(target))

    async def AttachHandoff(
        self, request: stage_pb2.AttachHandoffRequest, context: grpc.aio.ServicerContext
    ) -> stage_pb2.AttachHandoffResponse:
        side = await self._side(context, admitting=False)
        try:
            target = target_from_pb(request.target) if request.HasField("target") else None
            attached = side.attach(request.transfer_id, target)
        except HandoffError as e:  # the request goes on here, aggregated
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return stage_pb2.AttachHandoffResponse(attached=attached)

    async def AbortHandoff(
        self, request: stage_pb2.AbortHandoffRequest, context: grpc.aio.ServicerContext
    ) -> stage_pb2.AbortHandoffResponse:
        side = await self._side(context, admitting=False)
        return stage_pb2.AbortHandoffResponse(aborted=side.abort(request.transfer_id))

    async def _side(self, context: grpc.aio.ServicerContext, *, admitting: bool) -> HandoffSide:
        svc = self.service
        if not svc.is_head:
            await _abort(
                context, grpc.StatusCode.FAILED_PRECONDITION, f"stage {svc.launch.stage} is not a head stage"
            )
        if svc.handoff is None or not svc.ready:
            await _abort(context, grpc.StatusCode.UNAVAILABLE, "the replica is still starting")
        if admitting and svc.draining:
            await _abort(context, grpc.StatusCode.UNAVAILABLE, draining_refusal(svc.launch.replica))
        assert svc.handoff is not None
        return svc.handoff


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("unreachable")  # context.abort raises
