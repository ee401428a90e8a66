"""What the router needs of one stage of a replica: submit to the head, ask health and stats, close.

The router's logic is written against these protocols only, so it runs over gRPC in a mesh
(trellis/wire/stage_client.py) and over an in-process fake in unit tests. The contract:

- `submit` starts a request on the head and returns its stream of chunks at once; the last chunk
  carries the head's finish reason ("stop", "length", "too_long", "abort"). Failures surface from
  iterating the stream as the error tree: InvalidRequest, Overloaded, DeadlineExceeded, or
  Unavailable for anything wrong with the replica.
- `StageStream.cancel()` ends the request upstream and frees its KV blocks there; it may be called
  at any time, from any task, and more than once (once the stream has ended it does nothing).
  A stream cancelled this way just ends (no error) for whoever iterates it, so the one who
  cancelled decides what the reader is told.
- Every call takes a deadline in seconds (no call waits forever).
- P/D hand-off (trellis/core/handoff_api.py; the head only): `reserve_handoff` on the decode replica
  answers where the prefill replica copies the prompt's KV (Overloaded when it has no room);
  `attach_handoff` tells the prefill replica that target (None: decode it here, aggregated);
  `abort_handoff` frees whatever a side holds for the transfer (idempotent; False: nothing was
  held). Their failures are the same error tree as `submit`'s, raised by the call itself.

The plain data (StageRequest, StageChunk, StageStats) lives in trellis.core.stage_api, a floor
below, so the wire's gRPC client can build it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from typing import Protocol

from trellis.core.handoff_api import HandoffRef, HandoffTarget
from trellis.core.stage_api import StageChunk, StageHealth, StageRequest, StageStats

__all__ = [
    "HandoffRef",
    "HandoffTarget",
    "StageChunk",
    "StageClient",
    "StageClientFactory",
    "StageHealth",
    "StageRequest",
    "StageStats",
    "StageStream",
]


class StageStream(Protocol):
    """One request's chunks, in order; see the module docstring for cancel()."""

    def __aiter__(self) -> AsyncIterator[StageChunk]: ...

    def cancel(self) -> None: ...


class StageClient(Protocol):
    """One stage's control API (only the head, stage 0, takes `submit`)."""

    @property
    def address(self) -> str: ...

    def submit(self, request: StageRequest, *, timeout_s: float) -> StageStream: ...

    async def health(self, *, timeout_s: float) -> StageHealth:
        """SERVING / DRAINING (answers NOT_SERVING) / DOWN (no answer within the deadline); never raises."""
        ...

    async def stats(self, *, timeout_s: float) -> StageStats: ...

    async def match_prefix(self, hashes: Sequence[int], *, timeout_s: float) -> int:
        """The head only: how many of these block names, from the first, its prefix cache holds."""
        ...

    async def reserve_handoff(
        self, transfer_id: str, epoch: int, prompt_ids: Sequence[int], ttl_s: float, *, timeout_s: float
    ) -> HandoffTarget:
        """The decode head: reserve blocks and staging slots for the prompt's blocks it lacks, held
        ttl_s unless the decode half comes; Overloaded (RESOURCE_EXHAUSTED) when it has no room."""
        ...

    async def attach_handoff(
        self, transfer_id: str, epoch: int, target: HandoffTarget | None, *, timeout_s: float
    ) -> bool:
        """The prefill head: copy the request's KV to target (None: decode it here). False: the
        request is gone on that head (finished or cancelled)."""
        ...

    async def abort_handoff(self, transfer_id: str, epoch: int, *, timeout_s: float) -> bool:
        """Either head: free what it holds for the transfer now. False: nothing was held there."""
        ...

    async def close(self) -> None: ...


StageClientFactory = Callable[[str], StageClient]  # a stage's address (host:port) -> its client
