"""Publishes one location's block changes to the block index, batched, off the caller's path.

The holder (a head's block manager, a store tier) calls `added` / `removed` as blocks come and go:
plain set updates, no I/O, safe to call from the event loop's thread at any rate. A background task
sends the net changes: the first change after a quiet spell at once, then at most one flush per
``flush_s``, so the index is at most about ``flush_s`` (plus one registry call) behind.

Invariants:
- callers report transitions of presence: `added(h)` when the location starts holding h, `removed(h)`
  when it stops. Under that rule an add then a remove of the same hash before a flush (or a remove
  then an add) cancel out exactly: the index already says what it should;
- a registry failure is never raised into the holder: the batch is dropped (`dropped_batches`
  counts them; the index's entries then expire or get corrected by later changes), one warning
  when failures start and one info line when they end;
- `close()` stops the task and forgets the location (the holder's copies are gone with it).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable

from trellis.core import log
from trellis.registry.base import Registry

logger = log.get()

DEFAULT_FLUSH_S = 0.05


class BlockPublisher:
    def __init__(self, registry: Registry, location: str, flush_s: float = DEFAULT_FLUSH_S) -> None:
        if not flush_s > 0:
            raise ValueError(f"block publisher flush_s: must be > 0, got {flush_s!r}")
        self.registry = registry
        self.location = location
        self.flush_s = flush_s
        self.flushes = 0  # flushes that reached the registry
        self.dropped_batches = 0  # flushes that failed (their changes are lost)
        self._add: set[int] = set()
        self._remove: set[int] = set()
        self._dirty = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    # ---- the holder's side (sync, cheap) -------------------------------------------------------

    def added(self, hashes: Iterable[int]) -> None:
        """The location now holds these blocks."""
        add, remove = self._add, self._remove
        for h in hashes:
            if h in remove:
                remove.discard(h)  # removed then added back: the index still has it
            else:
                add.add(h)
        self._dirty.set()

    def removed(self, hashes: Iterable[int]) -> None:
        """The location no longer holds these blocks."""
        add, remove = self._add, self._remove
        for h in hashes:
            if h in add:
                add.discard(h)  # added then removed before a flush: never published
            else:
                remove.add(h)
        self._dirty.set()

    @property
    def pending(self) -> int:
        """Changes not yet sent."""
        return len(self._add) + len(self._remove)

    # ---- the task ------------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name=f"block-publisher-{self.location}")

    async def _run(self) -> None:
        while True:
            await self._dirty.wait()
            await self.flush()
            await asyncio.sleep(self.flush_s)  # at most one flush per flush_s

    async def flush(self) -> None:
        """Send the pending changes now (the task does this; tests and close may too)."""
        self._dirty.clear()
        add, remove = self._add, self._remove
        self._add, self._remove = set(), set()
        if not add and not remove:
            return
        try:
            if remove:
                await self.registry.remove_blocks(self.location, list(remove))
            if add:
                await self.registry.add_blocks(self.location, list(add))
        except Exception as e:  # the holder must never see the index's trouble
            self.dropped_batches += 1
            if not self._failing:
                self._failing = True
                logger.warning(
                    "block index updates failing; dropping them",
                    location=self.location,
                    error=str(e),
                )
            return
        self.flushes += 1
        if self._failing:
            self._failing = False
            logger.info(
                "block index updates recovered",
                location=self.location,
                dropped_batches=self.dropped_batches,
            )

    async def close(self) -> None:
        """Stop publishing and drop the location's entries from the index."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._add.clear()
        self._remove.clear()
        try:
            await self.registry.forget_location(self.location)
        except Exception as e:
            logger.warning("block index: cannot forget the location", location=self.location, error=str(e))
