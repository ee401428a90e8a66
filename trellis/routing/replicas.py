"""The replicas the router can send to: membership (registry), liveness (health of every stage), load.

A monitor polls membership and every stage's gRPC health. When any stage of a replica stops
answering, the replica is marked down at once and its in-flight calls are cancelled, so their
clients get UNAVAILABLE within a poll interval (no waiting for a hung stream).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from trellis.core import log
from trellis.registry import Registry, ReplicaLoad, ReplicaView
from trellis.v1 import stage_pb2, stage_pb2_grpc

POLL_S = 0.5
HEALTH_DEADLINE_S = 1.0
MISSES_TO_DOWN = 2  # consecutive failed polls before a replica is marked down


@dataclass(eq=False)
class ReplicaState:
    view: ReplicaView
    channels: list[grpc.aio.Channel]
    stub: stage_pb2_grpc.StageWorkerStub  # the head's
    healthy: bool = False
    misses: int = 0
    outstanding: int = 0
    reported: ReplicaLoad | None = None
    calls: dict[int, grpc.aio.Call] = field(default_factory=dict)
    down_reason: str = ""

    @property
    def name(self) -> str:
        return self.view.name

    @property
    def load(self) -> int:
        """Least-outstanding-work score: this router's requests plus what the replica queues."""
        waiting = self.reported.waiting if self.reported else 0
        return self.outstanding + waiting


class ReplicaSet:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.replicas: dict[str, ReplicaState] = {}
        self._task: asyncio.Task | None = None
        self._log = log.get()

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._monitor())

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
        for r in self.replicas.values():
            for ch in r.channels:
                await ch.close()

    def pick(self) -> ReplicaState | None:
        up = [r for r in self.replicas.values() if r.healthy]
        return min(up, key=lambda r: (r.load, r.name)) if up else None

    async def _monitor(self) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            try:
                await self.refresh()
            except Exception as e:  # a registry hiccup must not kill the router
                self._log.warning("replica refresh failed", error=str(e))

    async def refresh(self) -> None:
        views = await self.registry.replicas()
        for name in list(self.replicas):
            if name not in views or views[name] != self.replicas[name].view:
                self._mark_down(self.replicas[name], "left the registry")
                for ch in self.replicas.pop(name).channels:
                    await ch.close()
        for name, view in views.items():
            if name not in self.replicas:
                chans = [grpc.aio.insecure_channel(m.grpc_address) for m in view.stages]
                self.replicas[name] = ReplicaState(view, chans, stage_pb2_grpc.StageWorkerStub(chans[0]))
                self._log.info("replica discovered", replica=name, stages=len(view.stages))
        with contextlib.suppress(Exception):
            loads = await self.registry.loads()
            for name, r in self.replicas.items():
                r.reported = loads.get(name, r.reported)
        await asyncio.gather(*(self._check(r) for r in list(self.replicas.values())))

    async def _check(self, r: ReplicaState) -> None:
        results = await asyncio.gather(*(self._stage_ok(ch) for ch in r.channels))
        if all(results):
            if not r.healthy:
                self._log.info("replica up", replica=r.name)
            r.healthy, r.misses, r.down_reason = True, 0, ""
            return
        r.misses += 1
        if r.misses >= MISSES_TO_DOWN:
            bad = next(i for i, ok in enumerate(results) if not ok)
            self._mark_down(r, f"stage {bad} is not serving")

    @staticmethod
    async def _stage_ok(ch: grpc.aio.Channel) -> bool:
        try:
            resp = await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(), timeout=HEALTH_DEADLINE_S
            )
            return resp.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.aio.AioRpcError:
            return False

    def _mark_down(self, r: ReplicaState, reason: str) -> None:
        if r.healthy:
            self._log.warning("replica down", replica=r.name, reason=reason)
        r.healthy = False
        r.down_reason = reason
        for call in list(r.calls.values()):
            call.cancel()

    async def stats(self, r: ReplicaState) -> stage_pb2.StageStats:
        return await r.stub.Stats(stage_pb2.StatsRequest(), timeout=HEALTH_DEADLINE_S)
