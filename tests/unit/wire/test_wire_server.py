"""The server builder: health starts NOT_SERVING, and the error tree becomes statuses (never UNKNOWN)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from trellis.core.errors import (
    ConfigError,
    DeadlineExceeded,
    InvalidRequest,
    Overloaded,
    TrellisError,
    Unavailable,
)
from trellis.v1 import router_pb2, router_pb2_grpc
from trellis.wire.server import build_server

# What the tiny servicer raises, chosen by the request id.
RAISES: dict[str, Exception] = {
    "invalid": InvalidRequest("sampling.top_k must be >= 0"),
    "unavailable": Unavailable("no replica is serving"),
    "overloaded": Overloaded("the router is at its limit"),
    "deadline": DeadlineExceeded("the deadline passed"),
    "config": ConfigError("model.path: no such file"),
    "other": TrellisError("something refused"),
    "bug": KeyError("oops\nsecond line"),
}
EXPECTED = {
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "overloaded": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "deadline": grpc.StatusCode.DEADLINE_EXCEEDED,
    "config": grpc.StatusCode.FAILED_PRECONDITION,
    "other": grpc.StatusCode.FAILED_PRECONDITION,
    "bug": grpc.StatusCode.UNAVAILABLE,
}


class Tiny(router_pb2_grpc.RouterServicer):
    async def Generate(
        self, request: router_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[router_pb2.GenerateResponse]:
        yield router_pb2.GenerateResponse(request_id=request.request_id, token_ids=[1])
        if request.request_id in RAISES:
            raise RAISES[request.request_id]
        yield router_pb2.GenerateResponse(request_id=request.request_id, finish_reason="stop")

    async def Info(
        self, request: router_pb2.InfoRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.InfoResponse:
        model = dict(context.invocation_metadata() or ()).get("raise", "")
        if model in RAISES:
            raise RAISES[model]
        return router_pb2.InfoResponse(model="tiny")


def test_errors_map_to_statuses_and_health_waits_to_be_told() -> None:
    async def scenario() -> None:
        server = build_server(
            "127.0.0.1", 0, lambda s: router_pb2_grpc.add_RouterServicer_to_server(Tiny(), s)
        )
        await server.start()
        assert server.port > 0
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
                health = health_pb2_grpc.HealthStub(ch)
                check = health_pb2.HealthCheckRequest()
                assert (
                    await health.Check(check, timeout=5)
                ).status == health_pb2.HealthCheckResponse.NOT_SERVING
                await server.set_serving(True)
                assert (await health.Check(check, timeout=5)).status == health_pb2.HealthCheckResponse.SERVING

                stub = router_pb2_grpc.RouterStub(ch)
                assert (await stub.Info(router_pb2.InfoRequest(), timeout=5)).model == "tiny"
                ok = [r async for r in stub.Generate(router_pb2.GenerateRequest(request_id="ok"), timeout=5)]
                assert ok[-1].finish_reason == "stop"
                for name, code in EXPECTED.items():
                    # unary-stream: raised after a first message was sent
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        _ = [
                            r
                            async for r in stub.Generate(
                                router_pb2.GenerateRequest(request_id=name), timeout=5
                            )
                        ]
                    assert err.value.code() == code, name
                    assert "\n" not in err.value.details()
                    # unary-unary
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await stub.Info(router_pb2.InfoRequest(), timeout=5, metadata=[("raise", name)])
                    assert err.value.code() == code, name
                    assert "\n" not in err.value.details()
                    if name != "bug":
                        assert err.value.details() == str(RAISES[name])
                    else:
                        assert "Info failed: KeyError" in err.value.details()
        finally:
            await server.stop(None)

    asyncio.run(scenario())
