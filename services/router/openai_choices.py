"""The choices of one OpenAI request: several Router.generate streams run at once, merged as they come.

Invariant: when a ChoiceStreams is left (finished, failed, or cancelled because the client went
away), every stream has been closed, so each upstream request was cancelled and freed its KV blocks
(closing Router.generate does that). A failure of any choice fails the request and ends the others.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from types import TracebackType
from typing import TypeVar

from starlette.requests import Request

from trellis.routing.router import Delta

T = TypeVar("T")
_DONE = object()


class ChoiceStreams:
    def __init__(self, streams: Sequence[AsyncIterator[Delta]]) -> None:
        self._streams = list(streams)
        self._queue: asyncio.Queue[tuple[int, object]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._open = len(self._streams)
        self._held: list[tuple[int, Delta]] = []

    async def __aenter__(self) -> ChoiceStreams:
        self._tasks = [asyncio.create_task(self._pump(i, s)) for i, s in enumerate(self._streams)]
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _pump(self, index: int, stream: AsyncIterator[Delta]) -> None:
        try:
            async with contextlib.aclosing(stream):  # type: ignore[type-var]
                async for delta in stream:
                    await self._queue.put((index, delta))
        except Exception as e:  # the consumer raises it: the request fails
            await self._queue.put((index, e))
            return
        await self._queue.put((index, _DONE))

    async def _next(self) -> tuple[int, Delta] | None:
        """The next delta of any choice; None when all have ended; raises the first failure."""
        while self._open:
            index, item = await self._queue.get()
            if item is _DONE:
                self._open -= 1
                continue
            if isinstance(item, Exception):
                raise item
            assert isinstance(item, Delta)
            return index, item
        return None

    async def started(self) -> None:
        """Wait until every choice has its first delta (admitted, prompt read), raising the first
        failure: what lets a streamed response pick its status before it sends its headers."""
        seen: set[int] = set()
        while len(seen) < len(self._streams):
            item = await self._next()
            if item is None:
                return
            self._held.append(item)
            seen.add(item[0])

    async def __aiter__(self) -> AsyncIterator[tuple[int, Delta]]:
        held, self._held = self._held, []
        for item in held:
            yield item
        while (item := await self._next()) is not None:
            yield item


async def until_disconnect(request: Request, work: Awaitable[T], on_gone: Callable[[], T]) -> T:
    """Run work while watching the connection: if the client goes away first, cancel the work (which
    closes its streams upstream) and return on_gone(). Starlette does not cancel a handler whose client
    left, so a request that is not streamed needs this to stop generating for nobody."""
    job = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({job, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not job.done():
            job.cancel()
        await asyncio.gather(watch, return_exceptions=True)
    if job.cancelled() or not job.done():
        await asyncio.gather(job, return_exceptions=True)
        return on_gone()
    return job.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
