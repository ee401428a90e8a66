"""The replicas the router can send to: membership (registry), liveness (health of every stage), load.

A monitor polls membership and every stage's health (grpc.health.v1, service ""). The rule:
- every stage answers SERVING: the replica is up, picked for new requests;
- every stage answers, one or more NOT_SERVING: it is draining (or still starting): not picked
  for new requests, and its in-flight streams are NOT cancelled: a draining stage keeps serving
  them (NOT_SERVING means "no new work", never "dead");
- a stage does not answer (RPC error or no answer within the deadline) MISSES_TO_DOWN polls in a
  row: the replica is down and its in-flight streams are cancelled, so their clients get
  UNAVAILABLE within a poll interval or two (no waiting for a hung stream).
A drain that ends (the replica exits) thus looks like "down" with no streams left to cancel.
A replica is up again as soon as every stage answers SERVING.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from typing import Protocol

from trellis.core import log
from trellis.registry import ReplicaLoad, ReplicaView
from trellis.routing.stage_client import (
    StageClient,
    StageClientFactory,
    StageHealth,
    StageStats,
    StageStream,
)

POLL_S = 0.5
HEALTH_DEADLINE_S = 1.0
MISSES_TO_DOWN = 2  # consecutive polls without an answer before a replica is marked down


class Membership(Protocol):
    """The part of the registry the router reads."""

    async def replicas(self) -> dict[str, ReplicaView]: ...

    async def loads(self) -> dict[str, ReplicaLoad]: ...


@dataclass(eq=False)
class Replica:
    """One replica as this router sees it (mutable: the monitor and the requests update it)."""

    view: ReplicaView
    stages: tuple[StageClient, ...]  # one per stage, the head (stage 0) first
    healthy: bool = False  # picked for new requests (every stage SERVING)
    draining: bool = False  # reachable but NOT_SERVING: no new requests, its streams go on
    misses: int = 0
    outstanding: int = 0  # this router's requests in flight here
    reported: ReplicaLoad | None = None
    kv_canary: int = 0  # the head's StageStats.kv_canary, read when it comes up (0: unknown)
    down_reason: str = ""
    streams: dict[int, StageStream] = field(default_factory=dict)  # in flight, cancelled if it goes down
    _keys: itertools.count = field(default_factory=itertools.count)

    @property
    def name(self) -> str:
        return self.view.name

    @property
    def role(self) -> str:
        """both / prefill / decode (P/D disaggregation: trellis/routing/pd_policy.py)."""
        return self.view.role

    @property
    def head(self) -> StageClient:
        return self.stages[0]

    @property
    def load(self) -> int:
        """Least-outstanding-work score: this router's requests plus what the replica queues."""
        waiting = self.reported.waiting if self.reported else 0
        return self.outstanding + waiting

    def track(self, stream: StageStream) -> int:
        """Remember an in-flight stream (so going down cancels it); the key is for `untrack`."""
        key = next(self._keys)
        self.streams[key] = stream
        return key

    def untrack(self, key: int) -> None:
        self.streams.pop(key, None)


class ReplicaSet:
    def __init__(
        self,
        registry: Membership,
        connect: StageClientFactory,
        *,
        poll_s: float = POLL_S,
        health_deadline_s: float = HEALTH_DEADLINE_S,
    ) -> None:
        self.registry = registry
        self.connect = connect
        self.poll_s = poll_s
        self.health_deadline_s = health_deadline_s
        self.replicas: dict[str, Replica] = {}
        self._task: asyncio.Task[None] | None = None
        self._log = log.get()

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._monitor())

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
        for r in self.replicas.values():
            for stage in r.stages:
                await stage.close()

    def healthy(self) -> list[Replica]:
        return [r for r in self.replicas.values() if r.healthy]

    async def _monitor(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.refresh()
            except Exception as e:  # a registry hiccup must not kill the router
                self._log.warning("replica refresh failed", error=str(e))

    async def refresh(self) -> None:
        views = await self.registry.replicas()
        for name in list(self.replicas):
            if name not in views or views[name] != self.replicas[name].view:
                self._mark_down(self.replicas[name], "left the registry")
                for stage in self.replicas.pop(name).stages:
                    await stage.close()
        for name, view in views.items():
            if name not in self.replicas:
                clients = tuple(self.connect(m.grpc_address) for m in view.stages)
                self.replicas[name] = Replica(view, clients)
                self._log.info("replica discovered", replica=name, stages=len(view.stages))
        try:
            loads = await self.registry.loads()
        except Exception as e:  # loads only refine the choice: a failure must not skip the health checks
            self._log.warning("replica loads unavailable", error=str(e))
        else:
            for name, r in self.replicas.items():
                r.reported = loads.get(name, r.reported)
        await asyncio.gather(*(self._check(r) for r in list(self.replicas.values())))

    async def _check(self, r: Replica) -> None:
        results = await asyncio.gather(*(s.health(timeout_s=self.health_deadline_s) for s in r.stages))
        if all(h is StageHealth.SERVING for h in results):
            if not r.healthy:
                self._log.info("replica up", replica=r.name)
                await self._read_canary(r)
            r.healthy, r.draining, r.misses, r.down_reason = True, False, 0, ""
            return
        if StageHealth.DOWN not in results:  # all reachable: draining (or starting), never cancelled
            self.mark_draining(r)
            r.misses = 0
            return
        r.misses += 1
        if r.misses >= MISSES_TO_DOWN:
            bad = results.index(StageHealth.DOWN)
            self._mark_down(r, f"stage {bad} is not serving")

    async def _read_canary(self, r: Replica) -> None:
        """The head's KV canary, once per coming up (a restarted head may name blocks differently)."""
        try:
            r.kv_canary = (await self.stats(r)).kv_canary
        except Exception as e:  # the canary only gates KV-aware routing: 0 (unknown) until known
            r.kv_canary = 0
            self._log.warning("replica stats unavailable; KV canary unknown", replica=r.name, error=str(e))

    def mark_draining(self, r: Replica) -> None:
        """No new requests to `r`; its in-flight streams go on (the monitor's rule, or the head
        refused a request as draining before the monitor saw it)."""
        if r.healthy:
            self._log.info("replica draining", replica=r.name)
        r.healthy, r.draining = False, True

    def _mark_down(self, r: Replica, reason: str) -> None:
        if r.healthy:
            self._log.warning("replica down", replica=r.name, reason=reason)
        r.healthy = r.draining = False
        r.down_reason = reason
        for stream in list(r.streams.values()):
            stream.cancel()

    async def stats(self, r: Replica) -> StageStats:
        return await r.head.stats(timeout_s=self.health_deadline_s)
