"""The KV store, as a domain object: a host tier of slab slots over an optional disk tier.

`KVStore` ties the slab (slab.py), the slot accounting (slots.py), the open leases and puts
(tickets.py) and the disk tier with its write-behind thread (disk_tier.py, write_behind.py). The
gRPC servicer (services/kv_store) only converts messages; every rule is here:

- a block present (on either tier) or being put is never written again: BeginPut answers NO_SLOT;
- a put's slots are its writer's until CommitPut / AbortPut or its timeout, then freed (sweep);
- a leased slot is never reused before the lease's expires_at (it is pinned until swept after it);
- eviction is leaf-first LRU over unpinned committed blocks; with a disk tier a host block is not
  evictable until the write-behind thread has written it (it is skipped, never waited for);
- free + reserved + committed == num_slots at every instant (`check()`).

Every public method takes the lock (the write-behind thread indexes written blocks under it) and
first sweeps what has expired by the injected `clock` (unix seconds). Unknown, expired or foreign
(another instance's) lease and put ids are no error: release says False, commit 0, one log line.
Block events for the global index go to `on_blocks(tier, added, removed)` outside the lock, from
the calling thread (the write-behind thread for "disk" additions).
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence

from trellis.core import log
from trellis.core.errors import ConfigError, InvalidRequest
from trellis.core.kv_names import KVFingerprint
from trellis.core.kv_store_api import (
    DTYPE_BYTES,
    NO_ROOM,
    NO_SLOT,
    Lease,
    PutTicket,
    SlotLayout,
    StoreInfo,
    StoreRun,
    StoreStats,
)
from trellis.core.spec import KVStoreSpec
from trellis.kv_store.disk_tier import DiskTier
from trellis.kv_store.slab import Slab
from trellis.kv_store.slots import HostSlots
from trellis.kv_store.tickets import Tickets
from trellis.kv_store.write_behind import WriteBehind

OnBlocks = Callable[[str, list[int], list[int]], None]
Clock = Callable[[], float]


def layout_of(fp: KVFingerprint) -> SlotLayout:
    if fp.dtype not in DTYPE_BYTES:
        raise ConfigError(f"model.dtype: the KV store holds {', '.join(DTYPE_BYTES)}, not {fp.dtype!r}")
    return SlotLayout(fp.num_layers, fp.num_kv_heads, fp.head_dim, fp.block_size, fp.dtype)


class KVStore:
    def __init__(
        self,
        spec: KVStoreSpec,
        fingerprint: KVFingerprint,
        *,
        clock: Clock = time.time,
        on_blocks: OnBlocks | None = None,
        instance_id: str | None = None,
        write_queue: int = 1024,
    ) -> None:
        self.spec = spec
        self.fingerprint = fingerprint
        self.instance_id = instance_id or secrets.token_hex(6)
        self.layout = layout_of(fingerprint)
        slot_bytes = self.layout.slot_bytes
        num_slots = spec.capacity_bytes // slot_bytes
        if num_slots < 1:
            raise ConfigError(
                f"kv_store.capacity_bytes: {spec.capacity_bytes} is less than one slot of {slot_bytes} "
                f"bytes (layers x 2 x block_size x kv_heads x head_dim x dtype = {self.layout.shape})"
            )
        self._clock = clock
        self.on_blocks = on_blocks  # may be set later (the service wires it once its loop runs)
        self._lock = threading.RLock()
        self._events: list[tuple[str, list[int], list[int]]] = []
        self._counts: Counter[str] = Counter()
        self._canary = fingerprint.canary()
        self.disk: DiskTier | None = None
        if spec.disk_path is not None:
            self.disk = DiskTier(spec.disk_path, spec.disk_capacity_bytes // slot_bytes, slot_bytes)
            self.disk.rebuild()
        self.rebuilt = len(self.disk) if self.disk is not None else 0
        self.slab = Slab.create(spec.shm_dir, spec.name, self.instance_id, num_slots, slot_bytes)
        self.slots = HostSlots(num_slots)
        self._leases: Tickets[tuple[int, ...]] = Tickets(self.instance_id, "L")
        self._puts: Tickets[dict[int, int]] = Tickets(self.instance_id, "P")
        self._unwritten: set[int] = set()  # committed host blocks the disk tier has not written yet
        self._writer = WriteBehind(self._write_to_disk, write_queue) if self.disk is not None else None

    # -- plumbing ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[float]:
        """The lock, after a sweep at the clock's now (yielded); block events are sent after it."""
        with self._lock:
            now = self._clock()
            self._sweep(now)
            yield now
            events, self._events = self._events, []
        for tier, added, removed in events:
            if self.on_blocks is not None and (added or removed):
                try:
                    self.on_blocks(tier, added, removed)
                except Exception:  # the index is advisory: a failed publish never fails the store
                    log.get().exception("kv store: the block-event callback failed", tier=tier)

    def _evictable(self, block: int) -> bool:
        return block not in self._unwritten

    def _took(self, evicted: int | None) -> None:
        if evicted is not None:
            self._counts["host_evictions"] += 1
            self._events.append(("host", [], [evicted]))

    def _void(self, kind: str, ticket_id: str, tickets: Tickets) -> None:
        why = (
            "of another instance (the store restarted)"
            if tickets.is_foreign(ticket_id)
            else "unknown or expired"
        )
        log.get().info(f"kv store: {kind} {why}", id=ticket_id, instance_id=self.instance_id)

    # -- the API -------------------------------------------------------------------------------
    def info(self) -> StoreInfo:
        return StoreInfo(
            name=self.spec.name,
            instance_id=self.instance_id,
            fingerprint=self.fingerprint.key,
            canary=self._canary,
            slab_path=str(self.slab.path),
            num_slots=self.slots.num_slots,
            layout=self.layout,
        )

    def lookup(self, hashes: Sequence[int]) -> StoreRun:
        """The leading run of `hashes` per tier (touching what it finds); never an error."""
        with self._locked():
            host = total = 0
            for h in hashes:
                on_host = self.slots.slot_of(h) is not None
                if not on_host and not (self.disk is not None and h in self.disk):
                    break
                if on_host and host == total:  # the host run is still unbroken
                    host += 1
                total += 1
                self.slots.touch(h)
                if self.disk is not None:
                    self.disk.touch(h)
            self._counts.update(lookups=1, host_hits=host, disk_hits=total - host, misses=total < len(hashes))
            return StoreRun(host=host, total=total)

    def acquire(self, hashes: Sequence[int], ttl_s: float | None = None) -> Lease:
        """A lease over the leading run, disk blocks promoted into host slots; the run stops at the
        first miss, a corrupt block, or when no slot can be had. `ttl_s` None: the spec's."""
        ttl = self.spec.lease_ttl_s if ttl_s is None else ttl_s
        if not ttl > 0:
            raise InvalidRequest(f"lease_ttl_s: must be > 0 seconds, got {ttl!r}")
        with self._locked() as now:
            slots: list[int] = []
            for h in hashes:
                slot = self.slots.slot_of(h)
                if slot is None:
                    slot = self._promote(h) if self.disk is not None and h in self.disk else None
                    if slot is None:
                        break
                    self._counts["disk_hits"] += 1
                else:
                    self._counts["host_hits"] += 1
                self.slots.pin(slot)
                self.slots.touch(h)
                slots.append(slot)
            self._counts["misses"] += len(slots) < len(hashes)
            if not slots:
                return Lease(lease_id="", instance_id=self.instance_id, slots=(), expires_at=0.0)
            expires_at = now + ttl
            lease_id = self._leases.add(tuple(slots), expires_at)
            return Lease(lease_id, self.instance_id, tuple(slots), expires_at)

    def _promote(self, block: int) -> int | None:
        """Read a disk block into a host slot (committed, already on disk); None if no slot or corrupt."""
        assert self.disk is not None
        taken = self.slots.take(block, self.disk.parent_of(block), self._evictable)
        if taken is None:
            return None
        self._took(taken.evicted)
        if self.disk.read(block, self.slab.view(taken.slot)):
            self._counts["disk_reads"] += 1
            self.slots.commit(taken.slot)
            self._events.append(("host", [block], []))
            return taken.slot
        self.slots.unreserve(taken.slot)
        self._events.append(("disk", [], [block]))
        return None

    def release(self, lease_id: str) -> bool:
        """End a lease; False if it had expired (its slots may have been reused) or is unknown."""
        with self._locked():
            entry = self._leases.pop(lease_id)
            if entry is None:
                self._void("lease", lease_id, self._leases)
                return False
            for slot in entry.value:
                self.slots.unpin(slot)
            return True

    def begin_put(
        self, hashes: Sequence[int], parents: Sequence[int], timeout_s: float | None = None
    ) -> PutTicket:
        """Slots for the offered blocks: NO_SLOT where present or being put, NO_ROOM where (and
        after where) no slot is free nor evictable. `timeout_s` None: the spec's put_timeout_s."""
        if len(parents) != len(hashes):
            raise InvalidRequest(f"parents: {len(parents)} given for {len(hashes)} hashes (one per hash)")
        timeout = self.spec.put_timeout_s if timeout_s is None else timeout_s
        if not timeout > 0:
            raise InvalidRequest(f"timeout_s: must be > 0 seconds, got {timeout!r}")
        with self._locked() as now:
            out: list[int] = []
            reserved: dict[int, int] = {}
            full = False
            for h, parent in zip(hashes, parents, strict=True):
                if self.slots.slot_of(h) is not None or self.slots.is_reserved(h) or self._on_disk(h):
                    out.append(NO_SLOT)
                    continue
                taken = None if full else self.slots.take(h, parent, self._evictable)
                if taken is None:
                    full = True
                    self._counts["no_room"] += 1
                    out.append(NO_ROOM)
                    continue
                self._took(taken.evicted)
                reserved[h] = taken.slot
                out.append(taken.slot)
            self._counts["puts_begun"] += 1
            put_id = self._puts.add(reserved, now + timeout) if reserved else ""
            return PutTicket(put_id, self.instance_id, tuple(hashes), tuple(out))

    def _on_disk(self, block: int) -> bool:
        return self.disk is not None and block in self.disk

    def commit_put(self, put_id: str, hashes: Sequence[int]) -> int:
        """Commit those of the ticket's blocks in `hashes`, free the rest; the number committed."""
        with self._locked():
            entry = self._puts.pop(put_id)
            if entry is None:
                self._void("put", put_id, self._puts)
                return 0
            filled = set(hashes)
            committed = []
            for h, slot in entry.value.items():
                if h not in filled:
                    self.slots.unreserve(slot)
                    self._counts["blocks_aborted"] += 1
                    continue
                self.slots.commit(slot)
                committed.append(h)
                if self._writer is not None:
                    parent = self.slots.lru.parent_of(h)
                    if self._writer.offer(h, parent, slot):
                        self._unwritten.add(h)
                    else:
                        log.get().warning("kv store: write-behind queue full, block kept on host only")
            self._counts["blocks_committed"] += len(committed)
            self._events.append(("host", committed, []))
            return len(committed)

    def abort_put(self, put_id: str) -> bool:
        """Free a whole ticket; False if it was unknown (committed, aborted, expired, foreign)."""
        with self._locked():
            entry = self._puts.pop(put_id)
            if entry is None:
                self._void("put", put_id, self._puts)
                return False
            for slot in entry.value.values():
                self.slots.unreserve(slot)
            self._counts["blocks_aborted"] += len(entry.value)
            return True

    def sweep(self, now: float | None = None) -> None:
        """Reclaim the leases and puts expired by `now` (the clock's, by default)."""
        with self._lock:
            self._sweep(self._clock() if now is None else now)

    def _sweep(self, now: float) -> None:
        for _, lease in self._leases.take_expired(now):
            for slot in lease.value:
                self.slots.unpin(slot)
            self._counts["leases_expired"] += 1
        for _, put in self._puts.take_expired(now):
            for slot in put.value.values():
                self.slots.unreserve(slot)
            self._counts["puts_expired"] += 1
            self._counts["blocks_aborted"] += len(put.value)

    def _write_to_disk(self, block: int, parent: int, slot: int) -> None:
        """The write-behind thread's: the file first (no lock: the slot cannot change), then the index."""
        assert self.disk is not None
        try:
            self.disk.write_file(block, parent, self.slab.view(slot))
            ok = True
        except OSError as e:
            log.get().error("kv store: a disk write failed", block=f"{block:016x}", error=e.strerror)
            ok = False
        with self._locked():
            self._unwritten.discard(block)
            if ok:
                evicted = self.disk.add(block, parent)
                self._counts["disk_writes"] += 1
                self._counts["disk_evictions"] += len(evicted)
                added = [] if block in evicted else [block]
                self._events.append(("disk", added, [b for b in evicted if b != block]))

    def blocks(self, tier: str) -> list[int]:
        """The blocks a tier holds now ("host": committed; "disk"), e.g. to publish them at start."""
        with self._lock:
            if tier == "host":
                return self.slots.committed_blocks()
            return self.disk.lru.blocks() if self.disk is not None else []

    def stats(self) -> StoreStats:
        with self._locked():
            c = self._counts
            return StoreStats(
                num_slots=self.slots.num_slots,
                free_slots=self.slots.free_count,
                reserved_slots=self.slots.reserved_count,
                committed_slots=self.slots.committed_count,
                leased_slots=self.slots.pinned_count,
                leases=len(self._leases),
                puts=len(self._puts),
                disk_blocks=len(self.disk) if self.disk is not None else 0,
                disk_capacity_blocks=self.disk.capacity_blocks if self.disk is not None else 0,
                disk_pending=len(self._unwritten),
                disk_corrupt=self.disk.corrupt if self.disk is not None else 0,
                **{k: c[k] for k in _COUNTERS},
            )

    def check(self) -> None:
        """Assert every accounting invariant (for tests)."""
        with self._lock:
            self.slots.check()
            pins = Counter(s for slots in self._leases.values() for s in slots)
            assert all(self.slots.is_pinned(s) for s in pins) and self.slots.pinned_count == len(pins)
            assert sum(len(p) for p in self._puts.values()) == self.slots.reserved_count

    def close(self) -> None:
        """Write what is queued for disk, then unmap and unlink the slab. Idempotent."""
        if self._writer is not None:
            self._writer.stop()
        self.slab.close(unlink=True)


_COUNTERS = (
    "lookups",
    "host_hits",
    "disk_hits",
    "misses",
    "puts_begun",
    "blocks_committed",
    "blocks_aborted",
    "host_evictions",
    "disk_evictions",
    "disk_writes",
    "disk_reads",
    "leases_expired",
    "puts_expired",
    "no_room",
)
