"""The store's /metrics collector and its block-index publishers (fed from the store's events)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from kv_store_helpers import SLOT_BYTES, MakeStore
from prometheus_client import CollectorRegistry

from services.kv_store.service import Publishers
from trellis.metrics.kv_store_collector import KVStoreCollector


def test_collector_reads_stats(make_store: MakeStore) -> None:
    s = make_store(slots=3)
    t = s.begin_put([1, 2], [0, 1])
    s.commit_put(t.put_id, [1])
    reg = CollectorRegistry()
    reg.register(KVStoreCollector(s.stats, model_name="m", store="kv0"))
    labels = {"model_name": "m", "store": "kv0"}
    states = {
        st: reg.get_sample_value("kv_store_slots", {**labels, "state": st})
        for st in ("free", "reserved", "committed")
    }
    assert states == {"free": 2.0, "reserved": 0.0, "committed": 1.0}
    assert reg.get_sample_value("kv_store_blocks_committed_total", labels) == 1.0
    assert reg.get_sample_value("kv_store_hits_total", {**labels, "tier": "host"}) == 0.0
    assert s.layout.slot_bytes == SLOT_BYTES


class FakeRegistry:
    def __init__(self) -> None:
        self.blocks: dict[str, set[int]] = {}

    async def add_blocks(self, location: str, hashes: Sequence[int]) -> None:
        self.blocks.setdefault(location, set()).update(hashes)

    async def remove_blocks(self, location: str, hashes: Sequence[int]) -> None:
        self.blocks.setdefault(location, set()).difference_update(hashes)

    async def forget_location(self, location: str) -> None:
        self.blocks.pop(location, None)

    async def close(self) -> None:
        pass


def test_block_events_reach_the_index(make_store: MakeStore) -> None:
    s = make_store(slots=1)

    async def go() -> dict[str, set[int]]:
        reg = FakeRegistry()
        pubs = Publishers(reg, s, asyncio.get_running_loop())  # type: ignore[arg-type]
        s.on_blocks = pubs.on_blocks
        t = s.begin_put([7], [0])
        s.commit_put(t.put_id, [7])
        t = s.begin_put([8], [0])  # evicts 7
        s.commit_put(t.put_id, [8])
        await asyncio.sleep(0.2)
        snapshot = {k: set(v) for k, v in reg.blocks.items()}
        await pubs.close()
        return snapshot

    blocks = asyncio.run(asyncio.wait_for(go(), 10))
    assert blocks == {f"kv_store:kv0@{s.instance_id}:host": {8}}
