"""The stage leader's compute: one thread that owns the rank (CUDA device, collectives, runner).

Every collective and every kernel launch of the leader happens on this one thread, in plan order,
so the TP peers see the same sequence of broadcasts; the asyncio loop stays free for I/O.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from trellis.core import log
from trellis.core.plan import StepPlan, StepResult
from trellis.core.processes import spawn_module
from trellis.runtime.handoff import HandoffError, column_slice
from trellis.runtime.launch import StageLaunch
from trellis.runtime.rank import RankContext, start_rank, stop_rank

PEER_POLL_S = 0.5


def spawn_peers(launch: StageLaunch) -> list[subprocess.Popen]:
    """Start ranks 1..tp-1 of this stage, one process each."""
    return [
        spawn_module("trellis.runtime.peer", ["--rank", str(r), "--launch", launch.to_json()])
        for r in range(1, launch.tp)
    ]


@dataclass(frozen=True)
class StageOutput:
    """One plan's output on the leader: the last stage's result, or the hidden states to pass on.

    With the sliced hand-off `value` is only rank 0's columns; `shape` is of the whole hidden states
    (made of `launch.slices` column slices). `busy_s` is the plan's compute time here, from its
    start on the compute thread to the device sync after its last kernel."""

    value: torch.Tensor | StepResult
    busy_s: float
    shape: tuple[int, ...] = ()
    kv_failed: bool = False  # this stage's KV copies for the plan failed (a StepResult carries its own)
    kv_sums: tuple[int, ...] = ()  # this stage's checksums of the plan's hand-off slots (likewise)


class StageExecutor:
    """Leader-side: broadcast each plan to the peers, then run it on rank 0."""

    def __init__(self, launch: StageLaunch) -> None:
        self.launch = launch
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
        self._peers: list[subprocess.Popen] = []
        self.ctx: RankContext | None = None

    async def start(self) -> None:
        self._peers = spawn_peers(self.launch)
        # The sliced hand-off's hidden_size % tp is checked before any process starts (Engine,
        # DeploySpec.check_model): failing here, with the peers loaded, would leave them waiting.
        self.ctx = await self._call(start_rank, self.launch, 0)

    async def _call(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def peers_linked(self) -> None:
        """Wait until every TP peer has its UCX links to the neighbouring stages (sliced hand-off);
        raises HandoffError if one could not link."""
        if self.launch.sliced_handoff and not await self._call(self.ctx.control.all_linked, True):
            raise HandoffError(
                f"a TP peer of stage {self.launch.stage} could not link to its neighbouring stages; "
                "its log says why"
            )

    async def run(self, plan: StepPlan, plan_bytes: bytes, received: torch.Tensor | None) -> StageOutput:
        return await self._call(self.run_sync, plan, plan_bytes, received)

    def run_sync(self, plan: StepPlan, plan_bytes: bytes, received: torch.Tensor | None) -> StageOutput:
        """`plan_bytes`: the plan as the head encoded it (the TP peers get these very bytes);
        `received`: the hidden states from the previous stage (rank 0's slice of them with the
        sliced hand-off), None on the first stage."""
        start = time.perf_counter()
        ctx, launch = self.ctx, self.launch
        hidden = received
        if ctx.control.tp > 1:
            shape = None if received is None else (received.shape[0], received.shape[1] * launch.slices)
            ctx.control.send(plan_bytes, shape)
            if received is not None:
                hidden = ctx.control.gather_columns(received)
        out = ctx.runner.execute(plan, hidden)  # the runner attaches logits when the plan asks
        if isinstance(out, StepResult):
            # Sampled ids reached the host, so the device is done; a step that sampled none syncs.
            busy = time.perf_counter() - start if out.token_ids else self._synced_since(start)
            return StageOutput(out, busy)
        shape = tuple(out.shape)
        if launch.sliced_handoff:
            out = column_slice(out, 0, launch.tp)
        return StageOutput(out, self._synced_since(start), shape, ctx.runner.kv_failed, ctx.runner.kv_sums)

    def _synced_since(self, start: float) -> float:
        if self.ctx.device.type == "cuda":
            torch.cuda.synchronize(self.ctx.device)  # the output is sent next: it must be complete
        return time.perf_counter() - start

    def peers_alive(self) -> bool:
        return all(p.poll() is None for p in self._peers)

    async def watch_peers(self) -> str:
        """Return (with why) when a TP peer exits; never with one rank. A collective with a dead
        peer may hang (NCCL), so the leader must not wait for its compute thread to notice."""
        while True:
            for rank, p in enumerate(self._peers, start=1):
                if p.poll() is not None:
                    return f"TP rank {rank} of stage {self.launch.stage} exited with code {p.returncode}"
            await asyncio.sleep(PEER_POLL_S)

    async def stop(self) -> None:
        told = False  # whether the peers were told to stop (and so will exit on their own)
        timeout = self.launch.engine.stop_timeout_s
        if self.ctx is not None and self.peers_alive():
            try:
                await asyncio.wait_for(self._call(self._stop_sync), timeout)
                told = True
            except Exception as e:  # a peer went away meanwhile; the peers are reaped below
                log.get().warning("stage stop", error=str(e) or type(e).__name__)
        elif self.ctx is not None:  # no collective completes without every peer: leave the thread
            log.get().warning("a TP peer is gone; the stage stops without telling the others")
        for p in self._peers:
            try:
                p.wait(timeout=timeout if told else 1.0)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self._pool.shutdown(wait=False)

    def _stop_sync(self) -> None:
        self.ctx.control.stop()
        stop_rank(self.ctx)
        self.ctx = None
