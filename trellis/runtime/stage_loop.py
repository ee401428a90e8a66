"""The loop of a non-head stage leader: receive (plan, hidden), run its layers, pass it on.

A middle stage forwards activations to its successor; the last stage sends the sampled ids back
to the head. With TP > 1 the leader's link carries the plan and only rank 0's slice of the hidden
states; the peers move theirs on their own links (handoff.py). Each stage appends its compute
seconds for the plan. `Hello` and `Stop` are forwarded along the ring; a `PipeError` too, after
which the stage stops (its replica is broken and the head fails the requests in flight). A stage
whose plan fails, or whose TP peer exits, sends a `PipeError` on and stops.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass

from opentelemetry.trace import Span, Tracer

from trellis.core import log
from trellis.core.plan import StepResult, add_kv_sums
from trellis.core.telemetry import span_attributes, step_tracer
from trellis.metrics.handoff_clock import HandoffClock
from trellis.runtime.executor import StageExecutor, StageOutput
from trellis.runtime.handoff import payload_tensor
from trellis.runtime.launch import StageLaunch
from trellis.transport.ucx import Link, LinkClosed
from trellis.wire import pipe
from trellis.wire.plan_codec import decode_plan

REPORT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class StageEnd:
    """How a stage's loop ended: `stopped` when the ring's Stop came round (a clean exit), else it
    failed; `reason` says what ended it, for the log."""

    stopped: bool
    reason: str


async def send_output(
    link: Link,
    plan_bytes: bytes,
    out: StageOutput,
    launch: StageLaunch,
    busy_before: Sequence[float],
    handoff: HandoffClock | None = None,
    kv_failed_before: bool = False,
    kv_sums_before: tuple[int, ...] = (),
) -> None:
    """Pass one plan's output on, this stage's busy seconds appended: activations (with the plan's
    bytes as they came, never re-encoded) to the next stage, or the result to the head (the ids in
    the header with any logprobs, the logits if asked as the payload).
    A KV copy failure of an earlier stage (`kv_failed_before`) or this one travels on to the head,
    and so do the hand-off checksums, this stage's added to the earlier ones' (`kv_sums_before`).
    The send's seconds go to `handoff`."""
    busy = (*busy_before, out.busy_s)
    started = time.perf_counter()
    if isinstance(out.value, StepResult):
        r = dataclasses.replace(
            out.value,
            logits=None,
            kv_failed=out.value.kv_failed or kv_failed_before,
            kv_sums=add_kv_sums(out.value.kv_sums, kv_sums_before),
        )
        header = pipe.encode(pipe.Result(r, busy))  # the logits go as the payload
        r = out.value
        await link.send(header, None if r.logits is None else r.logits.contiguous())
    else:
        failed = out.kv_failed or kv_failed_before
        sums = add_kv_sums(out.kv_sums, kv_sums_before)
        msg = pipe.Activations(plan_bytes, launch.dtype, out.shape, launch.slices, busy, failed, sums)
        await link.send(pipe.encode(msg), out.value)
    if handoff is not None:
        handoff.add(time.perf_counter() - started)


async def report_failure(link: Link, why: str) -> None:
    """Best effort: tell the next stage (and through it the head) that this stage failed."""
    try:
        await asyncio.wait_for(link.send(pipe.encode(pipe.PipeError(why))), REPORT_TIMEOUT_S)
    except (LinkClosed, TimeoutError) as e:
        log.get().warning("could not report the failure downstream", error=str(e) or "timed out")


async def serve_stage(
    executor: StageExecutor, inbound: Link, outbound: Link, handoff: HandoffClock | None = None
) -> StageEnd:
    """Run until the ring stops or this stage fails; `handoff` gets the seconds of the sends on."""
    serving = asyncio.create_task(_serve(executor, inbound, outbound, handoff))
    watchdog = asyncio.create_task(executor.watch_peers())
    try:
        done, _ = await asyncio.wait({serving, watchdog}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # the loop stops waiting for the compute thread, which may be stuck with a dead peer
        for task in (serving, watchdog):
            if not task.done():
                task.cancel()
    if serving in done:
        return serving.result()
    why = watchdog.result()
    log.get().error("stage failed", error=why)
    await report_failure(outbound, why)
    return StageEnd(False, f"failed: {why}")


async def _serve(
    executor: StageExecutor, inbound: Link, outbound: Link, handoff: HandoffClock | None
) -> StageEnd:
    logger = log.get()
    launch = executor.launch
    tracer = step_tracer("trellis.stage")  # None unless TRELLIS_TRACE is set: no span, no cost
    while True:
        header, payload = await inbound.recv()
        msg = pipe.decode(header)
        match msg:
            case pipe.Activations(plan_bytes, dtype, _, slices, busy, _, _):
                try:
                    if slices != launch.slices:
                        raise ValueError(
                            f"stage {launch.stage} got hidden states in {slices} slices, but has TP "
                            f"{launch.tp}: every stage of a replica needs the same TP size"
                        )
                    received = payload_tensor(payload, dtype, msg.payload_shape).to(executor.ctx.device)
                    plan = decode_plan(plan_bytes)  # parsed once, for this stage's runner
                    span = None if tracer is None else _step_span(tracer, launch, plan.step_id)
                    out = await executor.run(plan, plan_bytes, received)
                except Exception as e:  # a plan this stage cannot run, or a TP peer gone
                    why = f"stage {launch.stage} failed: {e}"
                    logger.error("stage failed", error=why)
                    await report_failure(outbound, why)
                    return StageEnd(False, why)
                await send_output(
                    outbound, plan_bytes, out, launch, busy, handoff, msg.kv_failed, msg.kv_sums
                )
                if span is not None:
                    span.end()
            case pipe.Hello(token, num_blocks):
                mine = executor.ctx.runner.num_blocks
                await outbound.send(pipe.encode(pipe.Hello(token, min(num_blocks, mine))))
            case pipe.Stop() | pipe.PipeError():
                await outbound.send(header)
                # What the leader's own link carried in: with TP > 1, rank 0's slices only.
                logger.info(
                    "stage loop ends",
                    reason=str(msg),
                    activation_bytes_received=inbound.payload_bytes_received,
                )
                return StageEnd(isinstance(msg, pipe.Stop), str(msg))
            case _:
                logger.warning("unexpected pipe message", kind=type(msg).__name__)


def _step_span(tracer: Tracer, launch: StageLaunch, step_id: int) -> Span:
    """This stage's part of one step (its layers, and the send on): a batched step serves many
    requests, so it joins their traces by `step_id` (the head's `head.step` has the same)."""
    return tracer.start_span(
        "stage.step", attributes=span_attributes(step_id=step_id, replica=launch.replica, stage=launch.stage)
    )
