"""UCX links (through ucxx): framed messages of a protobuf header and an optional raw tensor.

A frame is three UCX tag messages on one endpoint: a 16-byte prefix (header length, payload
length), the header bytes, then the payload straight from/into a tensor's memory (host memory
on CPU; device memory on GPU, where UCX moves it over cuda_ipc or RDMA). Nothing is pickled.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import numpy as np
import torch

from trellis.core import log

_PREFIX = np.dtype("<u8")


def _ucxx() -> Any:
    # Imported on first use: only processes that move activations pay for UCX's start-up.
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    # Connection attempts to a listener that is not up yet are retried here; UCXX would log each.
    os.environ.setdefault("UCXX_LOG_LEVEL", "FATAL")
    # ucxx's peer-info exchange gives up after 5 s by default; a loaded host can take longer.
    os.environ.setdefault("UCXPY_CONNECT_TIMEOUT", "60")
    import ucxx

    return ucxx


def _as_buffer(t: torch.Tensor) -> Any:
    """An object ucxx can read/write in place: numpy view on host, the tensor itself on GPU."""
    t = t.contiguous()
    return t.view(torch.uint8).numpy() if t.device.type == "cpu" else t.view(torch.uint8)


class LinkClosed(ConnectionError):
    """The peer went away (closed, crashed or unreachable)."""


class Link:
    """One UCX endpoint carrying frames in order. Sends are serialized; one reader at a time."""

    def __init__(self, ep: Any, recv_device: torch.device) -> None:
        self._ep = ep
        self._recv_device = recv_device
        self._send_lock = asyncio.Lock()
        self._recv_lock = asyncio.Lock()
        # Payload bytes moved so far (tensors, not headers): what the hand-off really carried.
        self.payload_bytes_sent = 0
        self.payload_bytes_received = 0

    async def send(self, header: bytes, payload: torch.Tensor | None = None) -> None:
        nbytes = 0 if payload is None else payload.numel() * payload.element_size()
        prefix = np.array([len(header), nbytes], dtype=_PREFIX)
        async with self._send_lock:
            try:
                await self._ep.send(prefix)
                await self._ep.send(
                    np.frombuffer(header, dtype=np.uint8) if header else np.zeros(0, np.uint8)
                )
                if nbytes:
                    if payload.device.type == "cuda":
                        torch.cuda.current_stream(payload.device).synchronize()
                    await self._ep.send(_as_buffer(payload))
            except Exception as e:  # ucxx raises its own error types
                raise LinkClosed(f"send failed: {e}") from e
            self.payload_bytes_sent += nbytes

    async def recv(self) -> tuple[bytes, torch.Tensor | None]:
        """The next frame: header bytes and the payload as a flat uint8 tensor (or None)."""
        async with self._recv_lock:
            try:
                prefix = np.empty(2, dtype=_PREFIX)
                await self._ep.recv(prefix)
                header = np.empty(int(prefix[0]), dtype=np.uint8)
                await self._ep.recv(header)
                payload = None
                if prefix[1]:
                    payload = torch.empty(int(prefix[1]), dtype=torch.uint8, device=self._recv_device)
                    await self._ep.recv(_as_buffer(payload))
            except Exception as e:
                raise LinkClosed(f"receive failed: {e}") from e
            self.payload_bytes_received += int(prefix[1])
        return header.tobytes(), payload

    @property
    def alive(self) -> bool:
        return not self._ep.closed

    async def close(self) -> None:
        if not self._ep.closed:
            try:
                await self._ep.close()
            except Exception as e:
                log.get().debug("ucx close", error=str(e))


class Listener:
    """Accepts links on a port; `accept()` hands them out in arrival order."""

    def __init__(self, port: int, recv_device: torch.device) -> None:
        self._links: asyncio.Queue[Link] = asyncio.Queue()
        self._recv_device = recv_device

        async def on_connect(ep: Any) -> None:
            await self._links.put(Link(ep, recv_device))

        self._listener = _ucxx().create_listener(on_connect, port=port)

    @property
    def port(self) -> int:
        return self._listener.port

    async def accept(self, timeout: float | None = None) -> Link:
        return await asyncio.wait_for(self._links.get(), timeout)

    def close(self) -> None:
        self._listener.close()


WAIT_LOG_EVERY_S = 10.0  # while a successor is still loading, say so this often


async def connect(
    host: str, port: int, recv_device: torch.device, *, timeout: float = 60.0, peer: str = "the listener"
) -> Link:
    """Connect to a listener (`peer` names it in the log), retrying until it is up or `timeout`
    seconds pass; a line every WAIT_LOG_EVERY_S while waiting, and LinkClosed naming the address."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    deadline = start + timeout
    next_log = start + WAIT_LOG_EVERY_S
    delay = 0.05
    while True:
        try:
            ep = await _ucxx().create_endpoint(host, port)
            return Link(ep, recv_device)
        except Exception as e:
            now = loop.time()
            if now >= next_log:  # before giving up, too: a line that is due is never skipped
                log.get().info(f"waiting for {peer} at {host}:{port} ({now - start:.0f} s of {timeout:.0f})")
                next_log = now + WAIT_LOG_EVERY_S
            if now + delay > deadline:
                raise LinkClosed(
                    f"cannot reach {peer} at {host}:{port} over UCX within {timeout:.0f} s "
                    f"(engine.link_timeout_s): is it running, and is the port reachable? ({e})"
                ) from e
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)


def shutdown() -> None:
    """Stop ucxx's notifier thread (python-future mode), which would otherwise keep the process
    alive after its links are closed. A no-op where UCX was never used."""
    import sys

    ucxx = sys.modules.get("ucxx")
    if ucxx is not None:
        try:
            ucxx.stop_notifier_thread()
        except Exception as e:  # already stopped, or never started
            log.get().debug("ucx notifier stop", error=str(e))
