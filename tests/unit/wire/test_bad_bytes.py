"""Bytes that do not parse get INVALID_ARGUMENT naming the message type and the field, never UNKNOWN.

A real server from build_server, raw bytes sent with a generic (serializer-less) call, for every kind
of corruption protobuf refuses: truncation, a wire type that does not exist, bad UTF-8 in a string
field, a packed field cut short, random bytes; and the server keeps serving well-formed requests."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2

from trellis.v1 import router_pb2, router_pb2_grpc, stage_pb2, stage_pb2_grpc
from trellis.wire.server import build_server
from trellis.wire.wire_diagnosis import first_problem

GOOD = router_pb2.GenerateRequest(request_id="ok", text="hello", stop=["x"]).SerializeToString()
# bytes -> the words the detail must contain (the message type is always named too)
GENERATE_CASES: dict[bytes, str] = {
    GOOD[:-1]: "stop: its length says 1 bytes, 0 remain",  # truncated inside the last field
    GOOD[:1]: "request_id (its length): the bytes end inside a varint",
    b"\x0e": "request_id: wire type 6 does not exist",
    b"\x0f\x00": "request_id: wire type 7 does not exist",
    b"\x12\x02\xff\xfe": "text: a string that is not valid UTF-8",
    b"\x2a\x03ab\xc3": "stop: a string that is not valid UTF-8",
    b"\x1a\x02\x0a\x05": "token_ids.ids: its length says 5 bytes, 0 remain",
    b"\x1a\x03\x0a\x01\x80": "token_ids.ids: the bytes end inside a varint",  # packed, cut short
    b"\x22\x02\x15\x00": "sampling.top_p: the bytes end inside a 32-bit value",
    b"\x00": "field number 0",
    b"\x0c": "an end-group tag with no group open",
    b"\x08" + b"\xff" * 11: "a varint longer than 10 bytes",
}


class Router(router_pb2_grpc.RouterServicer):
    async def Generate(
        self, request: router_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[router_pb2.GenerateResponse]:
        yield router_pb2.GenerateResponse(request_id=request.request_id, finish_reason="stop")

    async def Info(
        self, request: router_pb2.InfoRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.InfoResponse:
        return router_pb2.InfoResponse(model="tiny")


class Stage(stage_pb2_grpc.StageWorkerServicer):
    async def Submit(
        self, request: stage_pb2.SubmitRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[stage_pb2.SubmitResponse]:
        yield stage_pb2.SubmitResponse(finish_reason="stop")

    async def Stats(
        self, request: stage_pb2.StatsRequest, context: grpc.aio.ServicerContext
    ) -> stage_pb2.StageStats:
        return stage_pb2.StageStats(ready=True)

    async def Drain(
        self, request: stage_pb2.DrainRequest, context: grpc.aio.ServicerContext
    ) -> stage_pb2.DrainResponse:
        return stage_pb2.DrainResponse(drained=True)


def _register(server: grpc.aio.Server) -> None:
    router_pb2_grpc.add_RouterServicer_to_server(Router(), server)
    stage_pb2_grpc.add_StageWorkerServicer_to_server(Stage(), server)


Status = tuple[grpc.StatusCode, str]
PREFIX = "the request is not a valid trellis.v1.GenerateRequest: "
OK = grpc.StatusCode.OK


async def _call(ch: grpc.aio.Channel, method: str, data: bytes, *, stream: bool) -> Status:
    """The status of sending `data` as the request to `method` (raw bytes: no serializer)."""
    try:
        if stream:
            _ = [r async for r in ch.unary_stream(method)(data, timeout=5)]
        else:
            await ch.unary_unary(method)(data, timeout=5)
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


def test_bad_bytes_are_invalid_argument_naming_type_and_field() -> None:
    async def scenario() -> None:
        server = build_server("127.0.0.1", 0, _register)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
                for data, words in GENERATE_CASES.items():
                    code, detail = await _call(ch, "/trellis.v1.Router/Generate", data, stream=True)
                    assert code == grpc.StatusCode.INVALID_ARGUMENT, (data, code, detail)
                    assert detail.startswith(PREFIX), detail
                    assert words in detail, (data, detail)

                bad = b"\x0a\x02\xff\xfe"  # field 1 of each: a string in some, an int or bool in others
                for method, type_name, stream in (
                    ("/trellis.v1.StageWorker/Submit", "trellis.v1.SubmitRequest", True),
                    ("/trellis.v1.StageWorker/Stats", "trellis.v1.StatsRequest", False),
                    ("/trellis.v1.StageWorker/Drain", "trellis.v1.DrainRequest", False),
                    ("/trellis.v1.Router/Info", "trellis.v1.InfoRequest", False),
                    ("/grpc.health.v1.Health/Check", "grpc.health.v1.HealthCheckRequest", False),
                ):
                    for data in (bad, b"\x0e", b"\x0a\x05ab"):
                        code, detail = await _call(ch, method, data, stream=stream)
                        if method.endswith(("Stats", "Drain", "Info")) and data == bad:
                            assert code == grpc.StatusCode.OK  # an unknown field 1: kept, not parsed
                            continue
                        assert code == grpc.StatusCode.INVALID_ARGUMENT, (method, data, code)
                        assert f"not a valid {type_name}: " in detail, detail

                rng = random.Random(14)
                for _ in range(200):
                    data = rng.randbytes(rng.randrange(1, 64))
                    code, detail = await _call(ch, "/trellis.v1.Router/Generate", data, stream=True)
                    assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), (data, code)
                    if code != grpc.StatusCode.OK:
                        assert "trellis.v1.GenerateRequest" in detail

                # Still serving: a well-formed request, through the same channel.
                assert await _call(ch, "/trellis.v1.Router/Generate", GOOD, stream=True) == (OK, "")
                check = health_pb2.HealthCheckRequest().SerializeToString()
                assert await _call(ch, "/grpc.health.v1.Health/Check", check, stream=False) == (OK, "")
        finally:
            await server.stop(None)

    asyncio.run(scenario())


def test_the_diagnosis_agrees_with_the_parser() -> None:
    """What upb accepts has no problem; what it refuses, the walk explains (for these message types)."""
    rng = random.Random(6)
    for _ in range(5000):
        data = rng.randbytes(rng.randrange(0, 24))
        try:
            router_pb2.GenerateRequest.FromString(data)
            parsed = True
        except Exception:
            parsed = False
        problem = first_problem(data, router_pb2.GenerateRequest.DESCRIPTOR)
        assert (problem is None) == parsed, (data, problem)
