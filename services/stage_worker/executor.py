"""The stage leader's compute: one thread that owns the rank (CUDA device, collectives, runner).

Every collective and every kernel launch of the leader happens on this one thread, in plan order,
so the TP peers see the same sequence of broadcasts; the asyncio loop stays free for I/O.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import torch

from services.stage_worker.launch import StageLaunch
from services.stage_worker.plan import StepPlan, StepResult
from services.stage_worker.rank import RankContext, start_rank, stop_rank
from trellis.rpc.plan_codec import encode_plan


def spawn_peers(launch: StageLaunch) -> list[subprocess.Popen]:
    """Start ranks 1..tp-1 of this stage, one process each."""
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "services.stage_worker.peer",
                "--rank",
                str(r),
                "--launch",
                launch.to_json(),
            ]
        )
        for r in range(1, launch.tp)
    ]


class StageExecutor:
    """Leader-side: broadcast each plan to the peers, then run it on rank 0."""

    def __init__(self, launch: StageLaunch) -> None:
        self.launch = launch
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
        self._peers: list[subprocess.Popen] = []
        self.ctx: RankContext | None = None

    async def start(self) -> None:
        self._peers = spawn_peers(self.launch)
        self.ctx = await self._call(start_rank, self.launch, 0)

    async def _call(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def run(self, plan: StepPlan, hidden: torch.Tensor | None) -> torch.Tensor | StepResult:
        return await self._call(self.run_sync, plan, hidden)

    def run_sync(self, plan: StepPlan, hidden: torch.Tensor | None) -> torch.Tensor | StepResult:
        ctx = self.ctx
        if ctx.control.tp > 1:
            ctx.control.send(encode_plan(plan), hidden)
        return ctx.runner.execute(plan, hidden)  # the runner attaches logits when the plan asks

    def peers_alive(self) -> bool:
        return all(p.poll() is None for p in self._peers)

    async def stop(self) -> None:
        if self.ctx is not None:
            await self._call(self._stop_sync)
        for p in self._peers:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        self._pool.shutdown(wait=False)

    def _stop_sync(self) -> None:
        self.ctx.control.stop()
        stop_rank(self.ctx)
        self.ctx = None
