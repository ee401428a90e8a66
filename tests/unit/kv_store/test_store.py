"""The store's rules: two-phase puts, leases, expiry, eviction, the disk tier, the index hook."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from kv_store_helpers import FP, SLOT_BYTES, Clock, MakeStore

from trellis.core.errors import ConfigError, InvalidRequest
from trellis.core.kv_store_api import NO_ROOM, NO_SLOT
from trellis.core.spec import KVStoreSpec
from trellis.kv_store import KVStore
from trellis.kv_store.disk_tier import HEADER, file_name


def fill(store: KVStore, hashes: list[int], parents: list[int] | None = None) -> list[int]:
    """Put and commit `hashes` (a chain by default), each slot filled with its hash's bytes."""
    parents = parents if parents is not None else [0, *hashes[:-1]]
    t = store.begin_put(hashes, parents)
    for h, slot in t.writable():
        store.slab.write(slot, np.full(SLOT_BYTES, h % 251, dtype=np.uint8))
    assert store.commit_put(t.put_id, [h for h, _ in t.writable()]) == len(t.writable())
    return list(t.slots)


def written(store: KVStore, n: int, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while store.stats().disk_writes < n or store.stats().disk_pending:
        assert time.monotonic() < deadline, f"disk writes never reached {n}: {store.stats()}"
        time.sleep(0.01)


def test_two_phase_put_then_lookup_and_acquire(make_store: MakeStore) -> None:
    s = make_store(slots=4)
    t = s.begin_put([1, 2], [0, 1])
    assert s.lookup([1, 2]).total == 0  # reserved is not readable
    assert s.begin_put([1], [0]).slots == (NO_SLOT,)  # being put
    assert s.commit_put(t.put_id, [1, 2]) == 2
    assert s.begin_put([1, 2], [0, 1]).slots == (NO_SLOT, NO_SLOT)  # present: never written twice
    run = s.lookup([1, 2, 3])
    assert (run.host, run.total) == (2, 2)
    lease = s.acquire([1, 2, 3], 5.0)
    assert lease.slots == t.slots and lease.lease_id.startswith(s.instance_id)
    assert s.release(lease.lease_id) and not s.release(lease.lease_id)
    s.check()


def test_partial_commit_and_abort_free_slots(make_store: MakeStore) -> None:
    s = make_store(slots=4)
    t = s.begin_put([1, 2, 3], [0, 1, 2])
    assert s.commit_put(t.put_id, [1]) == 1
    assert s.stats().free_slots == 3
    t2 = s.begin_put([5, 6], [0, 5])
    assert s.abort_put(t2.put_id) and not s.abort_put(t2.put_id)
    assert s.stats().free_slots == 3 and s.commit_put(t2.put_id, [5]) == 0
    s.check()


def test_bad_arguments_are_invalid_requests(make_store: MakeStore) -> None:
    s = make_store()
    with pytest.raises(InvalidRequest, match="parents"):
        s.begin_put([1, 2], [0])
    with pytest.raises(InvalidRequest, match="lease_ttl_s"):
        s.acquire([1], 0)
    with pytest.raises(InvalidRequest, match="timeout_s"):
        s.begin_put([1], [0], -1.0)


def test_unknown_and_foreign_ids_are_no_error(make_store: MakeStore) -> None:
    s = make_store()
    assert s.release("nope") is False
    assert s.release("deadbeef.L1") is False  # another instance's
    assert s.commit_put("deadbeef.P1", [1]) == 0 and s.abort_put("deadbeef.P1") is False
    empty = s.acquire([42], 1.0)
    assert empty.lease_id == "" and empty.slots == ()


def test_leases_pin_until_they_expire(make_store: MakeStore, clock: Clock) -> None:
    s = make_store(slots=2)
    fill(s, [1], [0])
    fill(s, [2], [0])
    lease = s.acquire([1, 2], 5.0)
    assert s.begin_put([3], [0]).slots == (NO_ROOM,)  # both pinned
    clock.advance(5.0)
    assert s.stats().leased_slots == 2  # at expires_at itself the lease still holds
    clock.advance(0.01)
    t = s.begin_put([3], [0])
    assert t.slots[0] >= 0 and s.stats().leases_expired == 1
    assert s.release(lease.lease_id) is False  # expired: its slots may have been reused
    s.check()


def test_an_abandoned_put_is_reclaimed(make_store: MakeStore, clock: Clock) -> None:
    s = make_store(slots=2)
    t = s.begin_put([1, 2], [0, 1], 1.0)
    assert s.begin_put([3], [0]).slots == (NO_ROOM,)
    clock.advance(1.5)
    s.sweep()
    assert s.stats().free_slots == 2 and s.commit_put(t.put_id, [1, 2]) == 0
    s.check()


def test_eviction_is_leaf_first_lru(make_store: MakeStore) -> None:
    s = make_store(slots=3)
    fill(s, [1, 2])  # a chain
    fill(s, [9], [0])
    s.lookup([1])  # touch the root: still never before its child
    assert s.begin_put([20], [0]).slots[0] >= 0
    assert s.lookup([2]).total == 0 and s.lookup([1]).total == 1 and s.lookup([9]).total == 1
    assert s.stats().host_evictions == 1
    s.check()


def test_disk_write_behind_rebuild_and_promotion(make_store: MakeStore, tmp_path: Path) -> None:
    events: list[tuple[str, list[int], list[int]]] = []
    s = make_store(slots=2, disk_blocks=8, on_blocks=lambda t, a, r: events.append((t, a, r)))
    fill(s, [1, 2])
    written(s, 2)
    assert ("host", [1, 2], []) in events and ("disk", [1], []) in events and ("disk", [2], []) in events
    fill(s, [5, 6])  # evicts 2 then 1 from the host (both already on disk)
    written(s, 4)
    run = s.lookup([1, 2, 7])
    assert (run.host, run.total) == (0, 2)
    s.close()
    again = make_store(slots=2, disk_blocks=8)
    assert again.rebuilt == 4 and again.lookup([5, 6]).total == 2
    lease = again.acquire([1, 2], 5.0)  # promoted from disk into host slots
    assert lease.num_blocks == 2
    for h, slot in zip((1, 2), lease.slots, strict=True):
        assert (again.slab.view(slot) == h % 251).all()
    assert again.lookup([1, 2]).host == 2 and again.stats().disk_reads == 2
    again.check()


def test_a_corrupt_disk_block_ends_the_run(make_store: MakeStore, tmp_path: Path) -> None:
    s = make_store(slots=2, disk_blocks=8)
    fill(s, [1, 2])
    written(s, 2)
    s.close()
    f = tmp_path / "disk" / file_name(2)
    raw = bytearray(f.read_bytes())
    raw[HEADER.size] ^= 1
    f.write_bytes(bytes(raw))
    again = make_store(slots=2, disk_blocks=8)
    lease = again.acquire([1, 2], 5.0)
    assert lease.num_blocks == 1 and again.stats().disk_corrupt == 1
    assert not f.exists() and again.lookup([1, 2]).total == 1
    again.check()


def test_a_host_block_is_not_evicted_before_its_disk_write(make_store: MakeStore) -> None:
    s = make_store(slots=1, disk_blocks=4)
    with s._lock:  # hold the lock: the writer cannot index block 1 yet
        fill(s, [1], [0])
        assert s.stats().disk_pending == 1
        assert s.begin_put([2], [0]).slots == (NO_ROOM,)
    written(s, 1)
    assert s.begin_put([2], [0]).slots[0] == 0


def test_slab_of_a_dead_instance_is_removed(tmp_path: Path, clock: Clock) -> None:
    (tmp_path / "trellis-kv-kv0-olddead").write_bytes(b"x" * 16)
    (tmp_path / "trellis-kv-other-olddead").write_bytes(b"x")
    spec = KVStoreSpec(capacity_bytes=2 * SLOT_BYTES, shm_dir=str(tmp_path))
    s = KVStore(spec, FP, clock=clock)
    live = KVStore(spec, FP, clock=clock)  # a second live instance keeps the first's slab
    assert (
        not (tmp_path / "trellis-kv-kv0-olddead").exists()
        and (tmp_path / "trellis-kv-other-olddead").exists()
    )
    assert s.slab.path.exists() and live.slab.path.exists()
    path = s.slab.path
    s.close()
    live.close()
    assert not path.exists()


def test_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="capacity_bytes"):
        KVStore(KVStoreSpec(capacity_bytes=SLOT_BYTES - 1, shm_dir=str(tmp_path)), FP)
    room = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    with pytest.raises(ConfigError, match="shm_dir"):
        KVStore(KVStoreSpec(capacity_bytes=(room // SLOT_BYTES + 1) * SLOT_BYTES, shm_dir=str(tmp_path)), FP)
    with pytest.raises(ConfigError, match="disk_capacity_bytes"):
        KVStore(
            KVStoreSpec(capacity_bytes=SLOT_BYTES, shm_dir=str(tmp_path), disk_path=str(tmp_path / "d")), FP
        )
