"""One disaggregated request as one stream: P prefills and samples the first token, D decodes the rest.

`HandoffStream` is a StageStream (trellis/routing/stage_client.py) over a prefill replica P and a
decode replica D, so the router relays, detokenizes, cuts at stop strings and counts usage on it as
on one head's stream. The protocol (trellis/core/handoff_api.py), per request, a fresh transfer id:
1. at once, together: the transfer record opens (trellis/routing/transfers.py), D reserves
   (`reserve_handoff`) and P starts (`submit` with the HandoffRef);
2. the reservation answers: P is attached to its target; none (D refused, failed, was too slow, or
   P refused the target): P is attached to None and decodes the whole request itself;
3. P streams the first token, then ends with finish "handoff" and the slots' block sums; or its
   first token already finished the request (stop, length);
4. D gets the decode half (first token, block sums) and streams the tokens after the first.
The reader sees one stream: P's token, then D's, one finish.

Invariants:
- iterating it runs it (once); `cancel()` may come at any time, from any task, more than once;
  after it, or the end, nothing new is sent upstream;
- every path ends in one `_end`: the upstream streams still open are cancelled, an abort is fired
  (never awaited) at each side that may still hold something of the transfer, the record is
  closed, and the outcome is counted once (HANDOFF_OUTCOMES, trellis.metrics.router_metrics): how
  the request's path settled (D streaming: "handoff", whatever follows), else "failed" for an
  error, "cancelled" for a cancel or a reader gone (a stop string, a replica down, too);
- P failing (Unavailable, its stream ending early, a broken protocol) before any token reached
  the reader: D's reservation is aborted and the request runs whole on D, a plain submit; once a
  token was yielded, any failure is Unavailable naming the replica (the client may retry); before
  that, other refusals (InvalidRequest, Overloaded, DeadlineExceeded) are the reader's answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Protocol

from trellis.core import log
from trellis.core.errors import DeadlineExceeded, TrellisError, Unavailable
from trellis.core.handoff_api import HANDOFF_FINISH, HandoffRef, HandoffTarget
from trellis.routing.stage_client import StageChunk, StageClient, StageRequest, StageStream
from trellis.routing.transfers import Transfers


class Side(Protocol):
    """One replica of the pair (trellis.routing.replicas.Replica)."""

    @property
    def name(self) -> str: ...

    @property
    def head(self) -> StageClient: ...


class HandoffStream:
    def __init__(
        self,
        request: StageRequest,
        prefill: Side,
        decode: Side,
        *,
        timeout_s: float,
        transfers: Transfers,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.request = request
        self.prefill, self.decode = prefill, decode
        self.transfer_id, self.epoch = uuid.uuid4().hex, 1
        self.transfers = transfers
        self.clock = clock
        self._deadline = clock() + timeout_s
        self._streams: list[StageStream] = []  # every upstream stream opened, cancelled at the end
        self._prefill_stream: StageStream | None = None
        self._attach: asyncio.Task[None] | None = None
        self._attach_error: BaseException | None = None
        self._opened: asyncio.Task[None] | None = None
        self._started = self._ended = False
        self._p_holds = self._d_holds = False  # that side may hold something of the transfer
        self._fallback = False  # P was attached to None: it decodes the whole request
        self._yielded = False  # a token went to the reader
        self._first_at = 0.0  # when P's first token came
        self._marks: dict[str, float] = {"start": clock()}  # when each step of the hand-off ended
        # Called once per side ("prefill", "decode") that has nothing more to do with the request:
        # P once its part is done or abandoned, D once P decodes the request itself. The router then
        # stops tracking the stream there, so that side going down no longer cancels it.
        self.on_release: Callable[[str], None] = lambda side: None
        self._released: set[str] = set()
        self._settled = ""  # how the request's path settled (an outcome), once it did
        self._log = log.get(request_id=request.request_id, transfer_id=self.transfer_id)

    def cancel(self) -> None:
        self._end("cancelled")

    async def __aiter__(self) -> AsyncIterator[StageChunk]:
        if self._started or self._ended:
            return
        self._started = True
        outcome = "failed"
        try:
            async with contextlib.aclosing(self._serve()) as chunks:
                async for chunk in chunks:
                    yield chunk
            outcome = "cancelled"  # an end without a settled path is a cancel
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "cancelled"
            raise
        finally:
            self._end(outcome)

    async def _serve(self) -> AsyncIterator[StageChunk]:
        p_side, d_side = self.prefill, self.decode
        self._opened = self.transfers.open(self.transfer_id, self.epoch, p_side.name, d_side.name)
        self._p_holds = self._d_holds = True
        p = self._submit(p_side, replace(self.request, handoff=HandoffRef(self.transfer_id, self.epoch)))
        if p is None:
            return
        self._prefill_stream = p
        self._attach = asyncio.create_task(self._reserve_then_attach())
        self._attach.add_done_callback(self._attach_done)
        handoff: StageChunk | None = None
        first_token, tokens, finish = -1, 0, ""
        failure: TrellisError | None = None
        try:
            async for chunk in p:
                if chunk.finish_reason == HANDOFF_FINISH:
                    handoff, chunk = chunk, StageChunk(chunk.token_ids, "", chunk.logprobs)
                if chunk.token_ids and not tokens:
                    first_token, self._first_at = chunk.token_ids[0], self.clock()
                    self._marks["first_token"] = self._first_at
                tokens += len(chunk.token_ids)
                # Settled before the yield: a reader may never come back after the last chunk.
                if chunk.finish_reason:  # P finished the request itself
                    finish, self._p_holds = chunk.finish_reason, False
                    self._settled = "aggregated_fallback" if self._fallback else "first_token_finished"
                elif chunk.token_ids and self._fallback:
                    self._settled = "aggregated_fallback"
                if tokens > 1:  # P decodes it (no target, or it gave up on its copies): D has no part
                    self._release("decode")
                if chunk.token_ids or chunk.finish_reason:
                    self._yielded = self._yielded or bool(chunk.token_ids)
                    yield chunk
                if handoff is not None or finish:
                    break
        except DeadlineExceeded:
            raise
        except TrellisError as e:
            if not isinstance(e, Unavailable) and not self._yielded:
                raise  # a refusal (InvalidRequest, Overloaded): the reader's answer as it is
            failure = e
        if self._ended or finish:
            return  # cancelled (_end did the rest), or P finished it
        if failure is None:
            failure = self._prefill_problem(handoff, tokens)
        if failure is not None:
            if self._yielded:
                raise _naming(p_side, failure) from None
            self._log.warning("prefill replica failed; the decode replica runs it", error=str(failure))
            self._abandon_prefill()
            plain = self._submit(d_side, self.request)
            async for chunk in self._decode_half(plain, handoff=False):
                yield chunk
            return
        assert handoff is not None  # _prefill_problem said so
        self._marks["prefill_done"] = self.clock()
        self._p_holds = False  # P is done: its blocks stay in its own cache
        self._release("prefill")
        ref = HandoffRef(self.transfer_id, self.epoch, first_token, tuple(handoff.block_sums))
        d = self._submit(d_side, replace(self.request, handoff=ref))
        async for chunk in self._decode_half(d, handoff=True):
            yield chunk

    def _prefill_problem(self, handoff: StageChunk | None, tokens: int) -> TrellisError | None:
        """What went wrong with P's stream, which ended without a finish of its own (None: a hand-off
        as the protocol has it)."""
        name = self.prefill.name
        if handoff is None:
            if self._attach_error is not None:
                return Unavailable(f"replica {name} failed to attach the hand-off: {self._attach_error}")
            return Unavailable(f"replica {name} failed: its stream ended early")
        if self._fallback or tokens != 1:
            return Unavailable(
                f"replica {name} broke the hand-off protocol: finish {HANDOFF_FINISH!r} after "
                f"{tokens} tokens{' with no target' if self._fallback else ''}"
            )
        return None

    async def _decode_half(self, d: StageStream | None, *, handoff: bool) -> AsyncIterator[StageChunk]:
        """D's chunks (the tokens after P's, or, aggregated, all of them) up to its finish."""
        if d is None:
            return
        waiting_first = True
        try:
            async for chunk in d:
                if waiting_first and (chunk.token_ids or chunk.finish_reason):
                    waiting_first = False  # D serves it: the path is settled
                    self._settled = "handoff" if handoff else "aggregated_fallback"
                    self._marks["decode_first"] = self.clock()
                    if handoff:
                        self.transfers.latency(self.clock() - self._first_at)
                if chunk.finish_reason:
                    self._d_holds = False  # before the yield: a reader may not come back
                if chunk.token_ids or chunk.finish_reason:
                    self._yielded = self._yielded or bool(chunk.token_ids)
                    yield chunk
                if chunk.finish_reason:
                    return
        except DeadlineExceeded:
            raise
        except TrellisError as e:
            if not isinstance(e, Unavailable) and not self._yielded:
                raise
            raise _naming(self.decode, e) from None
        if not self._ended:
            raise Unavailable(f"replica {self.decode.name} failed: its stream ended early")

    async def _reserve_then_attach(self) -> None:
        """D's reservation, then P's attach to it; no target: P decodes the request itself."""
        target = await self._reserve()
        self._marks["reserved"] = self.clock()
        attach, timeout_s = self.prefill.head.attach_handoff, self._call_timeout()
        if target is None:
            self._fallback = True
            self._release("decode")
            attached = await attach(self.transfer_id, self.epoch, None, timeout_s=timeout_s)
        else:
            try:
                attached = await attach(self.transfer_id, self.epoch, target, timeout_s=timeout_s)
            except (Unavailable, DeadlineExceeded):
                raise  # P is gone or stuck: _attach_done ends its stream
            except TrellisError as e:  # P refuses this target (another block naming): it decodes it
                self._log.warning("prefill replica refused the hand-off target", error=str(e))
                self._fallback = True
                self._abort_decode()
                self._release("decode")
                return
        self._marks["attached"] = self.clock()
        if not attached:
            self._log.debug("the request was gone on the prefill replica at attach")

    async def _reserve(self) -> HandoffTarget | None:
        name = self.decode.name
        try:
            return await self.decode.head.reserve_handoff(
                self.transfer_id,
                self.epoch,
                self.request.prompt_ids,
                self.transfers.timeout_s,
                timeout_s=self._call_timeout(),
            )
        # Gone, draining, too slow, or an answer we cannot read: it may hold it late. A deadline is
        # no answer either (it was taken for a refusal, so a slow D's reservation was never aborted
        # and held its blocks and slots until its own deadline); at debug: often the client's.
        except (Unavailable, DeadlineExceeded) as e:
            say = self._log.warning if isinstance(e, Unavailable) else self._log.debug
            say("decode replica did not reserve; aggregated on the prefill one", error=str(e))
        except TrellisError as e:  # it answered (no room, a refusal): it holds nothing
            self._d_holds = False
            self._log.debug("decode replica refused the hand-off", replica=name, error=str(e))
        except Exception as e:  # a bug in a client must not leave P waiting for its target
            self._log.warning("decode replica reservation failed", replica=name, error=repr(e))
        return None

    def _attach_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        self._attach_error = task.exception()
        if self._prefill_stream is not None:
            self._prefill_stream.cancel()  # P never got its answer: its stream ends, the reader decides

    def _release(self, side: str) -> None:
        if side not in self._released:
            self._released.add(side)
            self.on_release(side)

    def _abandon_prefill(self) -> None:
        """P will not serve this request: end its stream and its attach, abort both sides now."""
        if self._prefill_stream is not None:
            self._prefill_stream.cancel()
        if self._attach is not None and not self._attach.done():
            self._attach.cancel()
        if self._p_holds:
            self._p_holds = False
            self.transfers.abort(self.prefill.name, self.prefill.head, self.transfer_id, self.epoch)
        self._abort_decode()
        self._release("prefill")

    def _abort_decode(self) -> None:
        if self._d_holds:
            self._d_holds = False
            self.transfers.abort(self.decode.name, self.decode.head, self.transfer_id, self.epoch)

    def _submit(self, side: Side, request: StageRequest) -> StageStream | None:
        if self._ended:
            return None  # cancelled meanwhile: nothing new goes upstream
        stream = side.head.submit(request, timeout_s=self._remaining())
        self._streams.append(stream)
        return stream

    def _remaining(self) -> float:
        return max(self._deadline - self.clock(), 1e-3)

    def _call_timeout(self) -> float:
        return min(self.transfers.timeout_s, self._remaining())

    def _end(self, outcome: str) -> None:
        if self._ended:
            return
        self._ended = True
        for stream in self._streams:
            stream.cancel()  # a no-op on a stream that finished
        if self._attach is not None and not self._attach.done():
            self._attach.cancel()
        if self._p_holds:
            self.transfers.abort(self.prefill.name, self.prefill.head, self.transfer_id, self.epoch)
        self._abort_decode()
        if self._started:
            self.transfers.close(self.transfer_id, self._opened)
        self.transfers.ended(self._settled or outcome)
        start = self._marks.pop("start")
        self._log.debug(
            "hand-off timings",
            outcome=self._settled or outcome,
            **{f"{k}_ms": round((t - start) * 1e3, 2) for k, t in self._marks.items()},
        )


def _naming(side: Side, error: TrellisError) -> TrellisError:
    """A failure once the reader has tokens: Unavailable naming the replica (retriable)."""
    if isinstance(error, DeadlineExceeded):
        return error
    message = str(error)
    if f"replica {side.name}" in message:
        return Unavailable(message)
    return Unavailable(f"replica {side.name} failed: {message}")
