"""An in-process fake of a replica's stages for the router's unit tests: no process, no socket.

FakeStage plays a head (its chunks, a failure, a cancel it records, a drain, a prefix cache of the
prompts it served when given a fingerprint, either side of a P/D hand-off), FakeRegistry the
membership; `mesh(...)` builds a Router over them. tests/unit/routing, tests/unit/metrics and
tests/unit/services use it.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from tokenizers import Tokenizer

from trellis.core.errors import InvalidRequest, Unavailable
from trellis.core.handoff_api import HandoffTarget
from trellis.core.kv_names import KVFingerprint
from trellis.core.request import RequestLimits
from trellis.core.stage_api import draining_refusal
from trellis.registry import Member, ReplicaLoad, ReplicaView
from trellis.routing.pd_policy import PDPolicy
from trellis.routing.policy import ReplicaPolicy, least_load
from trellis.routing.replicas import ReplicaSet
from trellis.routing.router import Delta, Router
from trellis.routing.stage_client import StageChunk, StageHealth, StageRequest, StageStats
from trellis.routing.transfers import Transfers

LIMITS = RequestLimits(vocab_size=512, max_model_len=64)


TARGET = HandoffTarget("/dev/shm/fake-slab", 0, (0, 1), 16, "fp")


class FakeStream:
    """Plays `chunks`, then fails with `fail`, or (hang) waits until cancelled. With `script` (a P/D
    prefill half), it first waits for that future: the chunks it then plays."""

    def __init__(
        self,
        chunks: Sequence[StageChunk],
        fail: Exception | None,
        hang: bool,
        script: asyncio.Future[list[StageChunk]] | None = None,
    ) -> None:
        self.chunks, self.fail, self.hang, self.script = list(chunks), fail, hang, script
        self.ended = False  # the last chunk was read, or it failed
        self.cancelled = False  # cancel() came before the end: the upstream request was freed
        self._cancel = asyncio.Event()

    def cancel(self) -> None:
        if not self.ended:
            self.cancelled = True
        self._cancel.set()

    async def __aiter__(self) -> AsyncIterator[StageChunk]:
        if self.script is not None:
            cancelled = asyncio.ensure_future(self._cancel.wait())
            await asyncio.wait([self.script, cancelled], return_when=asyncio.FIRST_COMPLETED)
            cancelled.cancel()
            if self._cancel.is_set():
                return
            self.chunks = self.script.result()
        for chunk in self.chunks:
            await asyncio.sleep(0)
            if self._cancel.is_set():
                return
            self.ended = bool(chunk.finish_reason)
            yield chunk
        if self.fail is not None:
            self.ended = True
            raise self.fail
        if self.hang:
            await self._cancel.wait()


@dataclass
class FakeStage:
    """One stage; the head plays what `script` says for each request. `up`: it answers health;
    `draining`: it answers NOT_SERVING and refuses new requests as a draining head does (its
    streams already started go on)."""

    address: str
    up: bool = True
    draining: bool = False
    chunks: list[StageChunk] = field(default_factory=list)
    fail: Exception | None = None
    hang: bool = False
    requests: list[StageRequest] = field(default_factory=list)
    streams: list[FakeStream] = field(default_factory=list)
    closed: bool = False
    # The prefix cache: with a fingerprint, the block names of every prompt submitted are "cached".
    fingerprint: KVFingerprint | None = None
    cached: set[int] = field(default_factory=set)
    kv_canary: int = 0  # reported in stats()
    match_calls: int = 0
    # P/D. As D: reserve_handoff answers `target`, or raises `reserve_error`, once `reserve_gate` (if
    # any) is set. As P: a submit of a prefill half (fail unset) waits for its attach_handoff, then
    # plays `handoff_chunks` (a target) or `chunks` (None, or a target refused: aggregated); attach
    # raises `attach_error` (InvalidRequest: it refuses the target and decodes it itself).
    target: HandoffTarget = TARGET
    reserve_error: Exception | None = None
    reserve_gate: asyncio.Event | None = None
    attach_error: Exception | None = None
    handoff_chunks: list[StageChunk] = field(default_factory=list)
    handoff_calls: list[tuple[str, str, object]] = field(default_factory=list)  # (call, transfer, arg)
    _attaching: dict[str, asyncio.Future[list[StageChunk]]] = field(default_factory=dict)

    def submit(self, request: StageRequest, *, timeout_s: float) -> FakeStream:
        assert timeout_s > 0
        self.requests.append(request)
        if self.fingerprint is not None and not self.draining:
            self.cached.update(self.fingerprint.block_hashes(request.prompt_ids))
        ref = request.handoff
        if self.draining and not (ref is not None and ref.is_decode_half):
            refusal = Unavailable(f"{draining_refusal(self.address.split('-s')[0])} (from {self.address})")
            self.streams.append(FakeStream([], refusal, False))
        elif ref is not None and not ref.is_decode_half and self.fail is None:
            script = asyncio.get_running_loop().create_future()
            self._attaching[ref.transfer_id] = script
            self.streams.append(FakeStream([], None, self.hang, script))
        else:
            self.streams.append(FakeStream(self.chunks, self.fail, self.hang))
        return self.streams[-1]

    async def health(self, *, timeout_s: float) -> StageHealth:
        if not self.up:
            return StageHealth.DOWN
        return StageHealth.DRAINING if self.draining else StageHealth.SERVING

    async def stats(self, *, timeout_s: float) -> StageStats:
        return StageStats(replica="", stage=0, kv_canary=self.kv_canary)

    async def match_prefix(self, hashes: Sequence[int], *, timeout_s: float) -> int:
        assert timeout_s > 0
        self.match_calls += 1
        if not self.up:
            raise Unavailable(f"the stage at {self.address} does not answer")
        return sum(1 for _ in itertools.takewhile(self.cached.__contains__, hashes))

    async def reserve_handoff(
        self, transfer_id: str, epoch: int, prompt_ids: Sequence[int], ttl_s: float, *, timeout_s: float
    ) -> HandoffTarget:
        assert timeout_s > 0 and ttl_s > 0 and epoch == 1
        self.handoff_calls.append(("reserve", transfer_id, tuple(prompt_ids)))
        if self.reserve_gate is not None:
            await self.reserve_gate.wait()
        if self.reserve_error is not None:
            raise self.reserve_error
        return self.target

    async def attach_handoff(
        self, transfer_id: str, epoch: int, target: HandoffTarget | None, *, timeout_s: float
    ) -> bool:
        assert timeout_s > 0
        self.handoff_calls.append(("attach", transfer_id, target))
        script = self._attaching.pop(transfer_id, None)
        if script is None or script.done():
            return False
        if isinstance(self.attach_error, InvalidRequest):  # a target it refuses: it decodes it here
            script.set_result(self.chunks)
        if self.attach_error is not None:
            raise self.attach_error  # anything else: it never got an answer (its stream waits)
        script.set_result(self.handoff_chunks if target is not None else self.chunks)
        return True

    async def abort_handoff(self, transfer_id: str, epoch: int, *, timeout_s: float) -> bool:
        assert timeout_s > 0
        self.handoff_calls.append(("abort", transfer_id, None))
        return self._attaching.pop(transfer_id, None) is not None

    def calls(self, name: str) -> list[tuple[str, str, object]]:
        return [c for c in self.handoff_calls if c[0] == name]

    async def close(self) -> None:
        self.closed = True


class FakeRegistry:
    def __init__(self, views: dict[str, ReplicaView]) -> None:
        self.views = views
        self.load: dict[str, ReplicaLoad] = {}

    async def replicas(self) -> dict[str, ReplicaView]:
        return self.views

    async def loads(self) -> dict[str, ReplicaLoad]:
        return self.load


def view(name: str, num_stages: int = 1, role: str = "both") -> ReplicaView:
    members = tuple(
        Member(name, i, num_stages, f"{name}-s{i}:1", f"{name}-s{i}:2", (i * 2, i * 2 + 2), role=role)
        for i in range(num_stages)
    )
    return ReplicaView(name, role, members)


@dataclass
class Mesh:
    router: Router
    replicas: ReplicaSet
    registry: FakeRegistry
    stages: dict[str, FakeStage]

    def head(self, replica: str) -> FakeStage:
        return self.stages[f"{replica}-s0:1"]


async def mesh(
    names: Sequence[str] = ("r1",),
    *,
    num_stages: int = 1,
    tokenizer: Tokenizer | None = None,
    limits: RequestLimits = LIMITS,
    max_queue: int = 8,
    policy: ReplicaPolicy | PDPolicy = least_load,
    roles: dict[str, str] | None = None,  # replica -> role (default both)
    transfers: Transfers | None = None,
) -> Mesh:
    stages: dict[str, FakeStage] = {}

    def connect(address: str) -> FakeStage:
        return stages.setdefault(address, FakeStage(address))

    registry = FakeRegistry({n: view(n, num_stages, (roles or {}).get(n, "both")) for n in names})
    replicas = ReplicaSet(registry, connect)
    await replicas.refresh()  # no monitor task: the tests poll by hand
    router = Router(
        replicas,
        limits,
        tokenizer,
        model_name="fake",
        max_queue=max_queue,
        policy=policy,
        transfers=transfers,
    )
    return Mesh(router, replicas, registry, stages)


def chunks(*token_lists: Sequence[int], finish: str = "length") -> list[StageChunk]:
    out = [StageChunk(tuple(ids)) for ids in token_lists]
    return [*out[:-1], StageChunk(out[-1].token_ids, finish)]


async def collect(agen: AsyncIterator[Delta]) -> list[Delta]:
    return [d async for d in agen]
