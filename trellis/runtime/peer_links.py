"""A TP peer's own UCX links: its slice of the hidden states in from rank r of the previous stage,
and out to rank r of the next (see handoff.py).

The peer's compute runs on its main thread (which owns the CUDA device and the collectives, in
plan order); UCX needs an event loop, so the links live on a loop in a thread of their own and the
main thread waits for each transfer. Every wait has a deadline: a link that breaks or stalls
raises, and the peer exits (its leader then fails the replica).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any

import torch

from trellis.runtime.handoff import HandoffError, payload_tensor
from trellis.runtime.launch import StageLaunch
from trellis.transport.ucx import Link, Listener, connect
from trellis.wire import pipe

# As long as a collective of the stage may wait (rank.py's process-group timeout): the slice of a
# plan arrives when the previous stage finished that plan, which can take this long on a slow host.
SLICE_TIMEOUT_S = 600.0
CLOSE_TIMEOUT_S = 10.0


class PeerLinks:
    def __init__(self, launch: StageLaunch, rank: int, device: torch.device) -> None:
        self.launch = launch
        self.rank = rank
        self.device = device
        self.inbound: Link | None = None  # from rank `rank` of the previous stage
        self.outbound: Link | None = None  # to rank `rank` of the next stage
        self.slices_received = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="peer-links", daemon=True)
        self._thread.start()

    def _run_loop(self) -> None:
        if self.device.type == "cuda":  # UCX and the receive buffers work on this rank's GPU
            torch.cuda.set_device(self.device)
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def _wait(self, coro: Coroutine[Any, Any, Any], timeout: float) -> Any:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    # ---- start / stop --------------------------------------------------------------------------
    def open(self, timeout: float) -> None:
        """Listen for the previous stage's rank (unless first), connect to the next's (unless last)."""
        self._wait(self._open(timeout), timeout + 5.0)

    async def _open(self, timeout: float) -> None:
        launch, rank = self.launch, self.rank
        listener = None if launch.is_first else Listener(launch.ucx_ports[rank], self.device)
        try:
            outbound = (
                None
                if launch.is_last
                else connect(launch.next_host, launch.next_ucx_ports[rank], self.device, timeout=timeout)
            )
            inbound = None if listener is None else listener.accept(timeout=timeout)
            self.outbound, self.inbound = await asyncio.gather(_maybe(outbound), _maybe(inbound))
        finally:
            if listener is not None:
                listener.close()

    def close(self) -> None:
        async def close_all() -> None:
            for link in (self.outbound, self.inbound):
                if link is not None:
                    await link.close()

        try:
            self._wait(close_all(), CLOSE_TIMEOUT_S)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=CLOSE_TIMEOUT_S)

    # ---- the hand-off ----------------------------------------------------------------------------
    def recv_slice(self, step_id: int, shape: tuple[int, int]) -> torch.Tensor:
        """This rank's columns [tokens, hidden / tp] of plan `step_id`'s hidden states."""
        header, payload = self._wait(self.inbound.recv(), SLICE_TIMEOUT_S)
        msg = pipe.decode(header)
        want = (step_id, self.rank, self.launch.dtype, shape)
        if not isinstance(msg, pipe.HiddenSlice) or (msg.step_id, msg.rank, msg.dtype, msg.shape) != want:
            raise HandoffError(f"expected the slice (step, rank, dtype, shape) {want}, got {msg}")
        self.slices_received += 1
        return payload_tensor(payload, msg.dtype, shape)

    def send_slice(self, step_id: int, part: torch.Tensor) -> None:
        """No sync here: Link.send syncs the links' thread's current stream before the payload goes,
        and no thread of a peer sets a stream, so that is the default stream the kernels ran on."""
        header = pipe.encode(pipe.HiddenSlice(step_id, self.rank, self.launch.dtype, tuple(part.shape)))
        self._wait(self.outbound.send(header, part), SLICE_TIMEOUT_S)

    @property
    def bytes_received(self) -> int:
        return 0 if self.inbound is None else self.inbound.payload_bytes_received

    @property
    def bytes_sent(self) -> int:
        return 0 if self.outbound is None else self.outbound.payload_bytes_sent


async def _maybe(link: Coroutine[Any, Any, Link] | None) -> Link | None:
    return None if link is None else await link
