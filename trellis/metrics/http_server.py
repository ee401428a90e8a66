"""`GET /metrics` of one process: a tiny HTTP server on the service's own event loop.

On the loop, not in a thread (as prometheus_client.start_http_server would be), so the scrape-time
collectors read the scheduler between steps and never race it. It binds the configured host only;
port 0 means no server. A port that cannot be bound is a ConfigError naming the spec's field, for
the service to print in one line and exit 2.
"""

from __future__ import annotations

import asyncio
import errno
from http import HTTPStatus

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from trellis.core.errors import ConfigError

READ_TIMEOUT_S = 10.0  # a client that sends no request in this long is dropped
MAX_HEADER_LINES = 100


class MetricsServer:
    def __init__(self, server: asyncio.Server) -> None:
        self._server = server

    @property
    def port(self) -> int:
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        self._server.close()
        await self._server.wait_closed()


async def start_metrics_server(
    host: str, port: int, registry: CollectorRegistry, *, where: str
) -> MetricsServer | None:
    """Serve `registry` at http://host:port/metrics (None when port is 0); `where` names the spec's
    field in the error, e.g. "router.metrics_port"."""
    if port == 0:
        return None

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(await _answer(reader, registry))
            await writer.drain()
        except (TimeoutError, ConnectionError, ValueError):
            pass  # a client that went away, stalled or sent garbage gets nothing
        finally:
            writer.close()

    try:
        server = await asyncio.start_server(handle, host, port)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"{where}: {host}:{port} is already in use; pick a free port (or 0 for no /metrics)"
            ) from None
        raise ConfigError(f"{where}: cannot listen on {host}:{port}: {e.strerror or e}") from None
    return MetricsServer(server)


async def _answer(reader: asyncio.StreamReader, registry: CollectorRegistry) -> bytes:
    """The whole response to one request (HTTP/1.0 style: one request per connection)."""
    request_line = await asyncio.wait_for(reader.readline(), READ_TIMEOUT_S)
    accept = ""
    for _ in range(MAX_HEADER_LINES):
        line = await asyncio.wait_for(reader.readline(), READ_TIMEOUT_S)
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        if name.strip().lower() == "accept":
            accept = value.strip()
    parts = request_line.decode("latin-1").split()
    if len(parts) < 2:
        return _response(400, "text/plain", b"bad request\n")
    method, path = parts[0], parts[1].split("?", 1)[0]
    if path != "/metrics":
        return _response(404, "text/plain", b"only /metrics here\n")
    if method not in ("GET", "HEAD"):
        return _response(405, "text/plain", b"GET /metrics\n")
    encode, content_type = choose_encoder(accept)
    body = encode(registry)
    return _response(200, content_type, b"" if method == "HEAD" else body, length=len(body))


def _response(status: int, content_type: str, body: bytes, *, length: int | None = None) -> bytes:
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body) if length is None else length}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body
