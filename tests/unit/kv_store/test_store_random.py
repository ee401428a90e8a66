"""Randomized: interleaved puts, commits, aborts, acquires, releases, abandoned puts and clock steps.

After every op: free + reserved + committed == capacity (and the rest of `KVStore.check()`), and
every live lease's slots still hold the blocks it was given. After the clock passes every TTL, no
lease, no put and no reserved slot is left. TRELLIS_STORE_RANDOM_OPS sets the ops per seed.
"""

from __future__ import annotations

import os
import random
import time

import pytest
from kv_store_helpers import Clock, MakeStore

from trellis.core.kv_store_api import Lease, PutTicket
from trellis.kv_store import KVStore

OPS = int(os.environ.get("TRELLIS_STORE_RANDOM_OPS", "1000"))


def chain(rng: random.Random) -> list[int]:
    """A prompt's block names: one of 12 prompts, cut at a random length (so prefixes are shared)."""
    root = rng.randrange(12)
    return [root * 1000 + i + 1 for i in range(rng.randint(1, 6))]


def check_leases(store: KVStore, leases: dict[str, tuple[Lease, list[int]]], now: float) -> None:
    store.check()
    for lease, hashes in leases.values():
        if lease.expires_at >= now:
            for h, slot in zip(hashes, lease.slots, strict=False):
                assert store.slots.block_in(slot) == h, "a live lease's slot was reused"


def run_ops(store: KVStore, clock: Clock, rng: random.Random, ops: int) -> None:
    puts: dict[str, PutTicket] = {}
    leases: dict[str, tuple[Lease, list[int]]] = {}
    for _ in range(ops):
        op = rng.choices(
            ["put", "commit", "abort", "cancel", "get", "release", "tick"], [5, 4, 1, 1, 4, 3, 2]
        )[0]
        if op == "put":
            hashes = chain(rng)
            t = store.begin_put(hashes, [0, *hashes[:-1]], rng.choice([None, 0.5, 3.0]))
            if t.put_id:
                puts[t.put_id] = t
        elif op == "commit" and puts:
            t = puts.pop(rng.choice(list(puts)))
            filled = [h for h, _ in t.writable() if rng.random() < 0.9]
            store.commit_put(t.put_id, filled)
        elif op == "abort" and puts:
            store.abort_put(puts.pop(rng.choice(list(puts))).put_id)
        elif op == "cancel" and puts:
            puts.pop(rng.choice(list(puts)))  # the writer went away: its ticket times out
        elif op == "get":
            hashes = chain(rng)
            lease = store.acquire(hashes, rng.choice([None, 0.3, 2.0]))
            if lease.lease_id:
                leases[lease.lease_id] = (lease, hashes)
        elif op == "release" and leases:
            lid = rng.choice(list(leases))
            lease, _ = leases.pop(lid)
            assert store.release(lid) == (lease.expires_at >= clock.now)
        elif op == "tick":
            clock.advance(rng.choice([0.05, 0.2, 1.0]))
        check_leases(store, leases, clock.now)
    clock.advance(store.spec.lease_ttl_s + store.spec.put_timeout_s + 1)
    store.sweep()
    s = store.stats()
    assert (s.leases, s.puts, s.reserved_slots, s.leased_slots) == (0, 0, 0, 0)
    assert s.free_slots + s.committed_slots == s.num_slots
    store.check()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_ops_host_only(make_store: MakeStore, clock: Clock, seed: int) -> None:
    store = make_store(slots=16)
    run_ops(store, clock, random.Random(seed), OPS)
    assert store.stats().host_evictions > 0  # capacity pressure was exercised


@pytest.mark.parametrize("seed", [3, 4])
def test_random_ops_with_disk(make_store: MakeStore, clock: Clock, seed: int) -> None:
    store = make_store(slots=10, disk_blocks=20)
    run_ops(store, clock, random.Random(seed), OPS)
    deadline = time.monotonic() + 10
    while store.stats().disk_pending:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    s = store.stats()
    assert s.disk_blocks <= s.disk_capacity_blocks and s.disk_writes > 0
    store.check()
