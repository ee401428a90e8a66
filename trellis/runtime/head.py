"""The head stage's driver: schedule, run the head's layers, keep the pipeline full, collect tokens.

It keeps up to the scheduler's max_in_flight micro-batches in flight (by default one per stage,
so no stage idles while the others work): a new micro-batch is scheduled (from sequences not
already in flight) as soon as one returns. Everything that touches the scheduler runs on the event
loop, one coroutine at a time. Each returning step brings every stage's busy seconds
(`stage_busy`), from which a benchmark gets the pipeline bubble.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from opentelemetry.trace import Span

from trellis.core import log
from trellis.core.plan import StepPlan, StepResult, TokenLogprob
from trellis.core.sampling import SamplingParams
from trellis.core.telemetry import span_attributes, step_tracer
from trellis.metrics.handoff_clock import HandoffClock
from trellis.runtime.busy import StageBusy
from trellis.runtime.executor import StageExecutor
from trellis.runtime.handoff import payload_tensor
from trellis.runtime.kv_agent import KVAgent
from trellis.runtime.stage_loop import send_output
from trellis.scheduling.scheduler import Scheduler
from trellis.scheduling.sequence import HandoffOut
from trellis.transport.ucx import Link, LinkClosed
from trellis.wire import pipe
from trellis.wire.plan_codec import encode_plan


class ReplicaFailed(RuntimeError):
    """A stage of this replica is gone; its requests cannot finish."""


@dataclass(frozen=True)
class TokenDelta:
    token_ids: tuple[int, ...]
    finished: bool
    finish_reason: str | None
    logits: torch.Tensor | None = None  # [vocab] of the step that sampled this token, when asked
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token, when the request asked (sampling.logprobs)
    block_sums: tuple[int, ...] = ()  # P/D, finish_reason "handoff": the checksum of each slot copied


class RequestStream:
    """What one submitted request yields: TokenDeltas, the last with finished=True."""

    def __init__(self, seq_id: int, prompt_ids: Sequence[int]) -> None:
        self.seq_id = seq_id
        self.prompt_ids = tuple(prompt_ids)
        self._queue: asyncio.Queue[TokenDelta | Exception] = asyncio.Queue()

    def put(self, item: TokenDelta | Exception) -> None:
        self._queue.put_nowait(item)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> TokenDelta:
        item = await self._queue.get()
        if isinstance(item, Exception):
            raise item
        if item is _END:
            raise StopAsyncIteration
        if item.finished:
            self._queue.put_nowait(_END)
        return item


_END = TokenDelta((), True, None)


async def ring_handshake(
    executor: StageExecutor, outbound: Link | None, inbound: Link | None, timeout: float
) -> int:
    """Send Hello round the ring and wait for it: every stage is loaded and linked.

    Returns the number of KV blocks that every stage of the ring can hold.
    """
    mine = executor.ctx.runner.num_blocks
    if outbound is None:
        return mine
    await outbound.send(pipe.encode(pipe.Hello("ring", mine)))
    header, _ = await asyncio.wait_for(inbound.recv(), timeout)
    msg = pipe.decode(header)
    if not isinstance(msg, pipe.Hello):
        raise ReplicaFailed(f"the ring answered the hello with {type(msg).__name__}")
    return msg.num_blocks


class Head:
    def __init__(
        self,
        executor: StageExecutor,
        scheduler: Scheduler,
        *,
        num_stages: int,
        outbound: Link | None = None,
        inbound: Link | None = None,
        return_logits: bool = False,
    ) -> None:
        self.executor = executor
        self.scheduler = scheduler
        self.num_stages = num_stages
        self.outbound = outbound
        self.inbound = inbound
        self.return_logits = return_logits
        self._plan_travels = num_stages > 1 or executor.launch.tp > 1
        self._streams: dict[int, RequestStream] = {}
        self._next_seq = 0
        self._events: asyncio.Queue[StepResult | Exception | None] = asyncio.Queue()
        self._failed: Exception | None = None
        self._stopping = False
        self._receiver: asyncio.Task | None = None
        self.steps = 0
        self.generated_tokens = 0
        self.stage_busy = StageBusy(num_stages)
        self.handoff = HandoffClock()  # seconds sending plans' activations to stage 1 (/metrics)
        self._step_tracer = step_tracer("trellis.head")  # None unless TRELLIS_TRACE is set
        self._log = log.get()
        self.kv_agent: KVAgent | None = None  # the KV store's client side, when the spec has a store
        self._lookups: set[asyncio.Task[None]] = set()
        self.finish_listeners: list[Callable[[int], None]] = []  # seq ids as their streams end

    def wake(self) -> None:
        """Look at the scheduler again (e.g. the KV agent has saves ready)."""
        self._events.put_nowait(None)

    # ---- requests --------------------------------------------------------------------------
    def submit(
        self,
        prompt_ids: Sequence[int],
        sampling: SamplingParams,
        *,
        handoff: HandoffOut | None = None,
        outputs: Sequence[int] = (),
    ) -> RequestStream:
        """Queue a request; raises ValueError for a prompt that can never fit, ReplicaFailed if broken.
        ``handoff``, ``outputs``: P/D (trellis/runtime/handoff_side.py, Scheduler.add)."""
        if self._failed is not None:
            raise ReplicaFailed(str(self._failed))
        seq_id = self.new_seq_id()
        more = {"handoff": handoff, "outputs": tuple(outputs)}
        names = None if self.kv_agent is None else self.kv_agent.blocks_to_look_up(prompt_ids)
        if names is None:
            self.scheduler.add(seq_id, list(prompt_ids), sampling, **more)
        else:  # first a lease on the store's run of the blocks not cached here (one RPC)
            self.scheduler.check(tuple(prompt_ids), sampling)
            lookup = self._add_after_lookup(seq_id, tuple(prompt_ids), sampling, names, more)
            task = asyncio.create_task(lookup)
            self._lookups.add(task)
            task.add_done_callback(self._lookups.discard)
        return self.adopt(seq_id, prompt_ids)

    def new_seq_id(self) -> int:
        seq_id = self._next_seq
        self._next_seq += 1
        return seq_id

    def adopt(self, seq_id: int, prompt_ids: Sequence[int]) -> RequestStream:
        """The stream of a sequence the scheduler holds (just added, or a committed hand-off)."""
        stream = RequestStream(seq_id, prompt_ids)
        self._streams[seq_id] = stream
        self._events.put_nowait(None)  # wake the loop
        return stream

    async def _add_after_lookup(
        self,
        seq_id: int,
        prompt: tuple[int, ...],
        sampling: SamplingParams,
        names: list[int],
        more: dict[str, Any],
    ) -> None:
        assert self.kv_agent is not None
        hit = await self.kv_agent.acquire(names)
        stream = self._streams.get(seq_id)
        if stream is None or self._failed is not None:  # cancelled (or the replica broke) meanwhile
            if hit is not None:
                self.kv_agent.release_unused(hit.lease_id)
            return
        try:
            self.scheduler.add(seq_id, list(prompt), sampling, store_hit=hit, block_hashes=names, **more)
        except ValueError as e:  # checked at submit: only a bug gets here
            self._streams.pop(seq_id, None)
            stream.put(e)
            return
        self._events.put_nowait(None)

    def abort(self, seq_id: int) -> None:
        if self._streams.pop(seq_id, None) is not None:
            self.scheduler.abort(seq_id)
            self._events.put_nowait(None)
            for listener in self.finish_listeners:
                listener(seq_id)

    @property
    def failed(self) -> Exception | None:
        return self._failed

    @property
    def num_requests(self) -> int:
        return len(self._streams)

    @property
    def busy(self) -> bool:
        return bool(self._streams) or self.scheduler.has_work()

    # ---- the loop --------------------------------------------------------------------------
    async def run(self) -> None:
        receiver = self._receiver = asyncio.create_task(self._receive()) if self.num_stages > 1 else None
        driver = asyncio.create_task(self._drive())
        watchdog = asyncio.create_task(self.executor.watch_peers())
        try:
            done, _ = await asyncio.wait({driver, watchdog}, return_when=asyncio.FIRST_COMPLETED)
            if watchdog in done:  # the compute thread may be stuck in a collective with the dead peer
                driver.cancel()
                self._fail(ReplicaFailed(watchdog.result()))
            else:
                driver.result()
        finally:
            for task in (receiver, driver, watchdog):
                if task is not None:
                    task.cancel()

    async def _drive(self) -> None:
        try:
            while not self._stopping:
                if await self._fill_pipeline() and self._events.empty():
                    continue  # more may be schedulable right away (always so with one stage)
                event = await self._events.get()
                while True:
                    if isinstance(event, Exception):
                        self._fail(event)
                        return
                    if event is not None:
                        self._complete(event)
                    if self._events.empty():
                        break
                    event = self._events.get_nowait()
        except (LinkClosed, RuntimeError) as e:
            self._fail(e)

    async def _fill_pipeline(self) -> bool:
        """Schedule micro-batches until max_in_flight are out or nothing can run; True if any ran."""
        ran = False
        while (plan := self._next_plan()) is not None:
            ran = True
            if self.return_logits:
                plan = dataclasses.replace(plan, return_logits=True)
            # Encoded once, and only where the plan leaves this rank: the TP peers and every later
            # stage get these bytes (a lone rank never pays for the encoding).
            plan_bytes = encode_plan(plan) if self._plan_travels else b""
            span = None if self._step_tracer is None else self._step_span(plan)
            out = await self.executor.run(plan, plan_bytes, None)
            self.steps += 1
            if self.num_stages == 1:
                self.stage_busy.add((out.busy_s,))
                self._complete(out.value)
            else:
                await send_output(self.outbound, plan_bytes, out, self.executor.launch, (), self.handoff)
            if span is not None:
                span.end()
        return ran

    def _next_plan(self) -> StepPlan | None:
        """The scheduler's next plan with the KV agent's saves attached; a plan of saves alone
        when nothing else runs (so blocks reach the store while the replica idles)."""
        plan = self.scheduler.schedule()
        agent = self.kv_agent
        if agent is None:
            return plan
        if plan is None and agent.has_ready_saves():
            plan = self.scheduler.copy_only_plan()
        return None if plan is None else agent.attach(plan)

    def _step_span(self, plan: StepPlan) -> Span:
        """The head's part of one step (its layers, and the send on): the sequences it serves are
        named, for the requests' `stage.submit` spans (seq_id) to be found."""
        assert self._step_tracer is not None
        return self._step_tracer.start_span(
            "head.step",
            attributes=span_attributes(
                step_id=plan.step_id,
                replica=self.executor.launch.replica,
                stage=0,
                seq_ids=[s.seq_id for s in plan.seqs],
                num_tokens=plan.num_tokens,
                decode_steps=plan.decode_steps,
            ),
        )

    async def _receive(self) -> None:
        try:
            while True:
                header, payload = await self.inbound.recv()
                msg = pipe.decode(header)
                if isinstance(msg, pipe.Result):
                    self.stage_busy.add(msg.stage_busy_s)
                    result = msg.result
                    if payload is not None:
                        n = len(result.seq_ids)
                        result = dataclasses.replace(
                            result,
                            logits=payload_tensor(payload, "float32", (n, payload.numel() // 4 // max(n, 1))),
                        )
                    self._events.put_nowait(result)
                elif isinstance(msg, pipe.PipeError):
                    self._events.put_nowait(ReplicaFailed(f"a stage failed: {msg.message}"))
                    return
                elif isinstance(msg, pipe.Stop):
                    return
        except LinkClosed as e:
            self._events.put_nowait(ReplicaFailed(f"the last stage is unreachable: {e}"))
        except ValueError as e:  # a result that does not fit this ring (e.g. a stage time missing)
            self._events.put_nowait(ReplicaFailed(f"the last stage sent a bad result: {e}"))

    def _complete(self, result: StepResult) -> None:
        rows = {sid: i for i, sid in enumerate(result.seq_ids)}
        updates = self.scheduler.complete(result)
        if self.kv_agent is not None:
            self.kv_agent.completed(result)
        for upd in updates:
            self.generated_tokens += len(upd.new_token_ids)
            stream = self._streams.get(upd.seq_id)
            if stream is None:
                continue
            row = rows.get(upd.seq_id)  # None: a P/D hand-off finished by its copies alone
            logits = None if result.logits is None or row is None else result.logits[row]
            stream.put(
                TokenDelta(
                    tuple(upd.new_token_ids),
                    upd.finished,
                    upd.finish_reason,
                    logits,
                    _seq_logprobs(result, row, len(upd.new_token_ids)) if row is not None else (),
                    upd.block_sums,
                )
            )
            if upd.finished:
                del self._streams[upd.seq_id]
                for listener in self.finish_listeners:
                    listener(upd.seq_id)

    def _fail(self, error: Exception) -> None:
        self._failed = error if isinstance(error, ReplicaFailed) else ReplicaFailed(str(error))
        self._log.error("replica failed", error=str(error))
        for stream in self._streams.values():
            stream.put(self._failed)
        self._streams.clear()

    async def stop(self, timeout: float = 30.0) -> None:
        """Stop the ring: Stop travels through every stage and comes back to the receiver."""
        self._stopping = True
        if self.num_stages > 1 and self._failed is None:
            try:
                await self.outbound.send(pipe.encode(pipe.Stop("shutdown")))
                if self._receiver is not None:
                    await asyncio.wait_for(asyncio.shield(self._receiver), timeout)
            except (LinkClosed, TimeoutError) as e:
                self._log.warning("ring did not stop cleanly", error=str(e))
        self._events.put_nowait(None)


def _seq_logprobs(result: StepResult, row: int, kept: int) -> tuple[TokenLogprob, ...]:
    """Row `row`'s logprobs for the first `kept` of its `result.steps` tokens (those past a finish
    are dropped, like the tokens)."""
    start = row * result.steps
    return tuple(lp for lp in result.logprobs[start : start + kept] if lp is not None)
