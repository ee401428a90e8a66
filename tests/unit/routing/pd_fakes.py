"""The P/D router tests' shared fakes: a pair of fake stages behind the router, with a registry
that records transfers and a metrics sink."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from tests.fake_stages import FakeStage, Mesh, chunks, mesh
from trellis.registry import EmbeddedRegistry, TransferRecord
from trellis.routing.pd_policy import PDPolicy
from trellis.routing.policy import least_load
from trellis.routing.stage_client import StageChunk
from trellis.routing.transfers import Transfers

PROMPT = (1, 2, 3)  # 3 tokens > max_local_prefill_tokens=2: paired


class Records(EmbeddedRegistry):
    """The embedded registry, remembering every transfer it saw opened and closed."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.fail = fail
        self.opened: list[TransferRecord] = []
        self.closed: list[str] = []

    async def open_transfer(self, record: TransferRecord, ttl_s: float) -> None:
        if self.fail:
            raise ConnectionError("registry down")
        self.opened.append(record)
        await super().open_transfer(record, ttl_s)

    async def close_transfer(self, transfer_id: str) -> None:
        if self.fail:
            raise ConnectionError("registry down")
        self.closed.append(transfer_id)
        await super().close_transfer(transfer_id)


class Sink:
    def __init__(self) -> None:
        self.outcomes: list[str] = []
        self.latencies: list[float] = []

    def handoff_ended(self, outcome: str) -> None:
        self.outcomes.append(outcome)

    def handoff_latency(self, seconds: float) -> None:
        self.latencies.append(seconds)


@dataclass
class PD:
    m: Mesh
    p: FakeStage
    d: FakeStage
    records: Records
    sink: Sink
    transfers: Transfers

    async def settled(self) -> None:
        """Every fired call has run; nothing is left in flight anywhere."""
        await self.transfers.drain(1.0)
        assert self.transfers.pending == 0
        assert await self.records.transfers() == []  # closed, whatever the outcome
        assert len(self.records.opened) == len(self.records.closed)
        assert self.m.router.outstanding == 0
        for r in self.m.replicas.replicas.values():
            assert r.outstanding == 0 and not r.streams
        for stream in self.p.streams + self.d.streams:
            assert stream.ended or stream.cancelled  # none left running upstream

    def transfer_id(self) -> str:
        ref = self.p.requests[0].handoff
        assert ref is not None
        return ref.transfer_id


async def pd_mesh(registry_fails: bool = False) -> PD:
    records, sink = Records(registry_fails), Sink()
    transfers = Transfers(records, timeout_s=5.0, sink=sink, opened_by="router-test")
    m = await mesh(
        ("p", "d"),
        roles={"p": "prefill", "d": "decode"},
        policy=PDPolicy(least_load, max_local_prefill_tokens=2),
        transfers=transfers,
    )
    p, d = m.head("p"), m.head("d")
    p.handoff_chunks = [StageChunk((5,)), StageChunk((), "handoff", block_sums=(11, 12))]
    p.chunks = chunks([5], [6, 7], [8])  # what P streams when it decodes the request itself
    d.chunks = chunks([6, 7], [8])  # the tokens after the first
    return PD(m, p, d, records, sink, transfers)


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())
