"""The loop of a non-head stage leader: receive (plan, hidden), run its layers, pass it on.

A middle stage forwards activations to its successor; the last stage sends the sampled ids back
to the head. `Hello` and `Stop` are forwarded along the ring; a `PipeError` too, after which the
stage stops (its replica is broken and the head fails the requests in flight).
"""

from __future__ import annotations

import torch

from services.stage_worker.executor import StageExecutor
from services.stage_worker.plan import StepResult
from services.stage_worker.rank import DTYPES
from trellis import log
from trellis.rpc import pipe
from trellis.transport.ucx import Link


def payload_tensor(payload: torch.Tensor | None, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    if payload is None:
        return torch.empty(shape, dtype=DTYPES[dtype])
    return payload.view(DTYPES[dtype]).view(shape)


async def send_result(link: Link, result: StepResult) -> None:
    """Last stage -> head: the ids in the header, the logits (if asked for) as the payload."""
    logits = result.logits
    header = pipe.encode(StepResult(result.step_id, result.seq_ids, result.token_ids, result.steps))
    await link.send(header, None if logits is None else logits.contiguous())


async def serve_stage(executor: StageExecutor, inbound: Link, outbound: Link) -> str:
    """Run until the ring stops; returns why."""
    logger = log.get()
    is_last = executor.launch.is_last
    while True:
        header, payload = await inbound.recv()
        msg = pipe.decode(header)
        match msg:
            case pipe.Activations(plan, dtype, shape):
                hidden = payload_tensor(payload, dtype, shape).to(executor.ctx.device)
                out = await executor.run(plan, hidden)
                if is_last:
                    await send_result(outbound, out)
                else:
                    await outbound.send(
                        pipe.encode(pipe.Activations(plan, executor.launch.dtype, tuple(out.shape))), out
                    )
            case pipe.Hello(token, num_blocks):
                mine = executor.ctx.runner.num_blocks
                await outbound.send(pipe.encode(pipe.Hello(token, min(num_blocks, mine))))
            case pipe.Stop() | pipe.PipeError():
                await outbound.send(header)
                logger.info("stage loop ends", reason=str(msg))
                return str(msg)
            case _:
                logger.warning("unexpected pipe message", kind=type(msg).__name__)
