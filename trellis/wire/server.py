"""The gRPC server every service runs: its servicers, grpc.health.v1, and the error tree as statuses.

`build_server(host, port, register)` binds only `host` (port 0 picks a free one) and answers health
NOT_SERVING until the service says `set_serving(True)`, so no caller is sent to a process that is
still loading. An interceptor turns what a handler raises into a status, once for every service:

    InvalidRequest -> INVALID_ARGUMENT      Overloaded -> RESOURCE_EXHAUSTED
    Unavailable -> UNAVAILABLE              DeadlineExceeded -> DEADLINE_EXCEEDED
    ConfigError, any other TrellisError -> FAILED_PRECONDITION
    anything unexpected -> logged with its traceback, answered UNAVAILABLE (never UNKNOWN)
    request bytes that do not parse -> INVALID_ARGUMENT naming the message type (and the field)

The detail is always one line, for a person.
"""

from __future__ import annotations

import errno
import inspect
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from trellis.core import log
from trellis.core.errors import (
    ConfigError,
    DeadlineExceeded,
    InvalidRequest,
    Overloaded,
    TrellisError,
    Unavailable,
)
from trellis.wire.safe_deserialize import Undecodable, checked

Register = Callable[[grpc.aio.Server], None]

# Most specific first: the first branch an error belongs to decides its status.
_STATUS_OF: tuple[tuple[type[TrellisError], grpc.StatusCode], ...] = (
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
)


def status_for(error: TrellisError) -> grpc.StatusCode:
    """The status a client gets for an error of the tree (ConfigError and the rest: FAILED_PRECONDITION)."""
    return next(
        (code for kind, code in _STATUS_OF if isinstance(error, kind)), grpc.StatusCode.FAILED_PRECONDITION
    )


def one_line(error: BaseException) -> str:
    """An error's message as one line (its type's name when it has none)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


async def _abort_for(error: Exception, method: str, context: grpc.aio.ServicerContext) -> None:
    if isinstance(error, TrellisError):
        await context.abort(status_for(error), one_line(error))
    log.get(method=method).exception("handler failed unexpectedly")
    await context.abort(
        grpc.StatusCode.UNAVAILABLE, f"{method} failed: {type(error).__name__}: {one_line(error)}"
    )


def _guard_unary(behavior: Callable[..., Awaitable[Any]], method: str) -> Callable[..., Awaitable[Any]]:
    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.detail)
        try:
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise  # the handler chose its own status
        except Exception as e:
            await _abort_for(e, method, context)

    return guarded


def _guard_stream(
    behavior: Callable[..., AsyncIterator[Any]], method: str
) -> Callable[..., AsyncIterator[Any]]:
    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.detail)
        try:
            async for response in behavior(request, context):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            await _abort_for(e, method, context)

    return guarded


class ErrorStatusInterceptor(grpc.aio.ServerInterceptor):
    """Maps the error tree raised out of unary-unary and unary-stream handlers to statuses.

    It also checks their request deserializers (trellis/wire/safe_deserialize.py): grpc.aio answers a
    raising deserializer UNKNOWN before any handler runs, so bad bytes must be caught inside it."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        ser = {
            "request_deserializer": checked(handler.request_deserializer, handler_call_details.method),
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(_guard_unary(handler.unary_unary, method), **ser)
        if handler.unary_stream is not None:
            behavior = handler.unary_stream
            # A stream handler is an async generator, or a coroutine that writes via context.write.
            guarded = (
                _guard_stream(behavior, method)
                if inspect.isasyncgenfunction(behavior)
                else _guard_unary(behavior, method)
            )
            return grpc.unary_stream_rpc_method_handler(guarded, **ser)
        return handler  # client-streaming methods: none in Trellis today


class WireServer:
    """A built server: `start()`, then `set_serving(True)` once ready; `stop(grace)` at the end.

    `port` is the port actually bound (the one asked for, or the free one picked for 0).
    """

    def __init__(self, server: grpc.aio.Server, health: health_aio.HealthServicer, port: int) -> None:
        self._server = server
        self._health = health
        self.port = port

    async def start(self) -> None:
        await self.set_serving(False)  # before the first call can arrive
        await self._server.start()

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self._health.set("", status)

    async def stop(self, grace: float | None) -> None:
        await self.set_serving(False)
        await self._server.stop(grace)

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()


def build_server(host: str, port: int, register: Register, *, field: str = "port") -> WireServer:
    """A server on host:port only, with `register(server)`'s servicers, health and the error mapping.

    The port is this server's alone (no SO_REUSEPORT, which would let a second server share a busy
    port silently); a busy one raises ConfigError naming `field` (the spec's path of the port).
    """
    if port and (problem := bind_problem(host, port)):
        raise ConfigError(f"{field}: cannot listen on {host}:{port}: {problem}")
    server = grpc.aio.server(interceptors=[ErrorStatusInterceptor()], options=[("grpc.so_reuseport", 0)])
    register(server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:  # grpc's "Failed to bind": lost a race for the port since the probe
        bound = 0
    if bound == 0:
        raise ConfigError(f"{field}: cannot listen on {host}:{port} (is the port in use? pick another)")
    return WireServer(server, health, bound)


def bind_problem(host: str, port: int) -> str | None:
    """Why host:port cannot be bound (probed with a plain socket, as gRPC binds it), or None.

    Probing first keeps gRPC's own multi-line bind error off stderr."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC: TIME_WAIT is no owner
        try:
            probe.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return "the port is already in use (stop what holds it, or pick another port)"
            return e.strerror or str(e)
    return None
