"""What every P/D hand-off of one router shares: the registry's transfer records, the calls fired off
the client's path (records, aborts), the metrics sink (trellis/routing/handoff_stream.py uses it).

Invariants:
- nothing here is awaited on a client's path: records and aborts run as tasks, each under a
  deadline, referenced here until they end (the event loop keeps only weak references to tasks);
- the registry is a soft dependency: a record that cannot be opened or closed costs a log line
  (one warning when failures start, one info line when they end), never the request; the record's
  lease (the hand-off's timeout) drops it anyway;
- a close never overtakes its open: it waits for the open to end first;
- an abort that fails is logged at debug and dropped: each side also frees on its own deadline.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

from trellis.core import log
from trellis.registry import TransferRecord

REGISTRY_TIMEOUT_S = 1.0  # a record's open or close
ABORT_TIMEOUT_S = 1.0  # an abort_handoff call


class TransferLog(Protocol):
    """The part of the registry the hand-offs use."""

    async def open_transfer(self, record: TransferRecord, ttl_s: float) -> None: ...

    async def close_transfer(self, transfer_id: str) -> None: ...


class HandoffSink(Protocol):
    """Where outcomes go (trellis.metrics.router_metrics.RouterMetrics)."""

    def handoff_ended(self, outcome: str) -> None: ...

    def handoff_latency(self, seconds: float) -> None: ...


class Aborter(Protocol):
    """A head's abort (trellis.routing.stage_client.StageClient has it)."""

    async def abort_handoff(self, transfer_id: str, epoch: int, *, timeout_s: float) -> bool: ...


class Transfers:
    def __init__(
        self,
        registry: TransferLog | None = None,
        *,
        timeout_s: float = 30.0,
        opened_by: str = "",
        sink: HandoffSink | None = None,
        registry_timeout_s: float = REGISTRY_TIMEOUT_S,
        abort_timeout_s: float = ABORT_TIMEOUT_S,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"handoff_timeout_s: must be > 0, got {timeout_s!r}")
        self.registry = registry
        self.timeout_s = timeout_s  # a hand-off's deadline: D's reservation and the record's lease
        self.opened_by = opened_by or f"router-{uuid.uuid4().hex[:12]}"
        self.sink = sink
        self.registry_timeout_s = registry_timeout_s
        self.abort_timeout_s = abort_timeout_s
        self.wall = wall
        self._tasks: set[asyncio.Task[None]] = set()
        self._failing = False
        self._log = log.get()

    @property
    def pending(self) -> int:
        """Calls fired and not ended yet."""
        return len(self._tasks)

    def open(self, transfer_id: str, epoch: int, prefill: str, decode: str) -> asyncio.Task[None] | None:
        """Open the transfer's record (a task; None without a registry)."""
        registry = self.registry
        if registry is None:
            return None
        record = TransferRecord(
            transfer_id, epoch, prefill, decode, self.wall() + self.timeout_s, self.opened_by
        )
        return self._spawn(self._registry("open", lambda: registry.open_transfer(record, self.timeout_s)))

    def close(self, transfer_id: str, opened: asyncio.Task[None] | None) -> None:
        """Close the transfer's record once its open (if any) has ended."""
        registry = self.registry
        if registry is None:
            return

        async def close() -> None:
            if opened is not None:
                await asyncio.wait([opened])  # how the open went is its own to log
            await self._registry("close", lambda: registry.close_transfer(transfer_id))

        self._spawn(close())

    def abort(self, side: str, head: Aborter, transfer_id: str, epoch: int) -> None:
        """Fire `abort_handoff` at one side; never awaited, its failure only logged at debug."""

        async def abort() -> None:
            try:
                async with asyncio.timeout(self.abort_timeout_s):
                    await head.abort_handoff(transfer_id, epoch, timeout_s=self.abort_timeout_s)
            except Exception as e:  # the side frees on its own deadline anyway
                self._log.debug("hand-off abort failed", replica=side, transfer_id=transfer_id, error=str(e))

        self._spawn(abort())

    def ended(self, outcome: str) -> None:
        if self.sink is not None:
            self.sink.handoff_ended(outcome)

    def latency(self, seconds: float) -> None:
        if self.sink is not None:
            self.sink.handoff_latency(seconds)

    async def drain(self, timeout_s: float) -> None:
        """Wait (at most timeout_s) for the calls in flight: at shutdown, and in tests."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout_s)

    async def _registry(self, what: str, call: Callable[[], Awaitable[None]]) -> None:
        try:
            async with asyncio.timeout(self.registry_timeout_s):
                await call()
        except Exception as e:  # a soft dependency: the hand-off goes on without its record
            if not self._failing:
                self._failing = True
                self._log.warning(
                    "transfer records unavailable; hand-offs go on without them",
                    call=what,
                    error=str(e) or type(e).__name__,
                )
            return
        if self._failing:
            self._failing = False
            self._log.info("transfer records available again")

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
        try:
            task = asyncio.get_running_loop().create_task(coro)
        except RuntimeError:  # no running loop (a stream finalized at exit): nothing can run it
            coro.close()
            return None
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
