"""The KV store's contract, as plain data: what a slot holds, what a lease and a put ticket are.

A *slot* of the store's host tier holds one block of the whole model: every layer, K then V,
every KV head, laid out ``[num_layers, 2, block_size, num_kv_heads, head_dim]`` in the KV dtype
(C order). The host tier is one shared-memory file, the *slab*, of ``num_slots`` slots; a worker
on the same host maps it and copies its own layers x heads of a block in or out of a slot
(never a byte of another's). The store owns the slab; a worker writes only into the slots a put
ticket gave it, and reads only slots under a live lease.

Rules the store keeps (trellis/kv_store): a leased slot is never reused before its lease's
``expires_at`` (unix seconds, the store's clock: same host as every slab reader); a put's slots
are the writer's until it commits or aborts, or ``put_timeout_s`` passes; a committed block is
never written again.
"""

from __future__ import annotations

from dataclasses import dataclass

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
NO_SLOT = -1  # in a put ticket: this block is already in the store (or was just committed by another)
NO_ROOM = -2  # in a put ticket: no slot free for it now (everything else is leased or pinned)


@dataclass(frozen=True)
class SlotLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        """One slot: [layers, K|V, block_size, kv_heads, head_dim]."""
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def slot_bytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * DTYPE_BYTES[self.dtype]


@dataclass(frozen=True)
class StoreInfo:
    name: str  # the store's name in the spec
    instance_id: str  # one per process start: a lease or ticket of another instance is void
    fingerprint: str  # the KVFingerprint key the store names blocks under
    canary: int  # that fingerprint's canary hash (trellis.core.kv_names)
    slab_path: str  # the host tier's shared-memory file
    num_slots: int
    layout: SlotLayout


@dataclass(frozen=True)
class StoreRun:
    """Lookup: the leading run of a prompt's block names the store holds, per tier."""

    host: int  # leading blocks in pinned host memory
    total: int  # leading blocks in host memory or on disk (>= host)


@dataclass(frozen=True)
class Lease:
    """Acquire: the leading run's slots, readable until ``expires_at`` (then release it)."""

    lease_id: str
    instance_id: str
    slots: tuple[int, ...]  # slot of block i of the run
    expires_at: float  # unix seconds

    @property
    def num_blocks(self) -> int:
        return len(self.slots)


@dataclass(frozen=True)
class PutTicket:
    """BeginPut: where to write each offered block; NO_SLOT / NO_ROOM where not to."""

    put_id: str
    instance_id: str
    hashes: tuple[int, ...]
    slots: tuple[int, ...]  # aligned with hashes

    def writable(self) -> list[tuple[int, int]]:
        """(hash, slot) of the blocks this ticket lets the writer fill."""
        return [(h, s) for h, s in zip(self.hashes, self.slots, strict=True) if s >= 0]


@dataclass(frozen=True)
class StoreStats:
    """Stats: the store's slots and counters now. Invariant: free + reserved + committed == num_slots.

    ``leased_slots`` counts committed slots pinned by at least one live lease; the ``*_total``-like
    fields (lookups onward) are running totals since the process started."""

    num_slots: int
    free_slots: int
    reserved_slots: int  # held by an uncommitted put
    committed_slots: int
    leased_slots: int
    leases: int
    puts: int  # open put tickets
    disk_blocks: int
    disk_capacity_blocks: int  # 0: no disk tier
    disk_pending: int  # committed host blocks not yet written to disk
    lookups: int = 0
    host_hits: int = 0  # blocks found on the host tier (lookup and acquire)
    disk_hits: int = 0  # blocks found only on disk
    misses: int = 0  # lookups / acquires whose run stopped before the end of the asked hashes
    puts_begun: int = 0
    blocks_committed: int = 0
    blocks_aborted: int = 0  # reserved slots freed by an abort, a partial commit or a timeout
    host_evictions: int = 0
    disk_evictions: int = 0
    disk_writes: int = 0
    disk_reads: int = 0
    disk_corrupt: int = 0
    leases_expired: int = 0
    puts_expired: int = 0
    no_room: int = 0  # blocks of a put answered NO_ROOM
