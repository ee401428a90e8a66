"""Slot accounting of the host tier: which slot holds which block, and which may be reused.

Every slot is in exactly one state at every instant:
- free: in the free list;
- reserved: given to one block of an open put (or of a disk block being promoted), not readable;
- committed: holds one block, named by its hash; readable under a lease.

Invariants (`check()`): free + reserved + committed == num_slots; a hash is in at most one slot;
a committed slot pinned by a live lease (`pin`) is never evicted; eviction takes the least recently
used *leaf* (trellis/kv_store/leaf_lru.py) among the committed, unpinned blocks the caller's
predicate allows (with a disk tier: those already written to disk). Not thread-safe: the store
holds its lock around every call.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from trellis.kv_store.leaf_lru import LeafLRU


@dataclass(frozen=True)
class Taken:
    slot: int
    evicted: int | None  # the block whose slot this was, or None for a free slot


class HostSlots:
    def __init__(self, num_slots: int) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.num_slots = num_slots
        self._free: list[int] = list(range(num_slots - 1, -1, -1))  # pop() gives the lowest first
        self._reserved: dict[int, tuple[int, int]] = {}  # slot -> (hash, parent)
        self._reserved_slot: dict[int, int] = {}  # hash -> slot, for the reserved ones
        self._slot_of: dict[int, int] = {}  # hash -> slot, for the committed ones
        self._block_in: dict[int, int] = {}  # slot -> hash, for the committed ones
        self._pins: Counter[int] = Counter()  # slot -> live leases on it
        self.lru = LeafLRU()

    # -- counts -------------------------------------------------------------------------------
    @property
    def free_count(self) -> int:
        return len(self._free)

    @property
    def reserved_count(self) -> int:
        return len(self._reserved)

    @property
    def committed_count(self) -> int:
        return len(self._block_in)

    @property
    def pinned_count(self) -> int:
        return len(self._pins)

    def check(self) -> None:
        """Raise AssertionError if the accounting does not add up (tests call it after every op)."""
        total = self.free_count + self.reserved_count + self.committed_count
        assert total == self.num_slots, f"free+reserved+committed={total} != {self.num_slots}"
        assert len(set(self._free)) == len(self._free)
        assert not set(self._free) & (set(self._reserved) | set(self._block_in))
        assert not set(self._reserved) & set(self._block_in)
        assert len(self.lru) == self.committed_count
        assert all(s in self._block_in for s in self._pins)

    # -- lookups ------------------------------------------------------------------------------
    def slot_of(self, block: int) -> int | None:
        """The committed slot of `block`, or None."""
        return self._slot_of.get(block)

    def block_in(self, slot: int) -> int | None:
        return self._block_in.get(slot)

    def is_reserved(self, block: int) -> bool:
        return block in self._reserved_slot

    def is_pinned(self, slot: int) -> bool:
        return self._pins.get(slot, 0) > 0

    def committed_blocks(self) -> list[int]:
        return list(self._slot_of)

    # -- transitions --------------------------------------------------------------------------
    def take(self, block: int, parent: int, evictable: Callable[[int], bool]) -> Taken | None:
        """Reserve a slot for `block` (not held yet): a free one, else the slot of the LRU leaf
        that is unpinned and `evictable`; None when there is neither. The block holds its parent
        from now on (its parent is no leaf while the put is open)."""
        assert block not in self._slot_of and block not in self._reserved_slot, "block already held"
        evicted = None
        if self._free:
            slot = self._free.pop()
        else:
            victim = next(
                (
                    b
                    for b in self.lru.candidates()
                    if b != parent and not self.is_pinned(self._slot_of[b]) and evictable(b)
                ),
                None,
            )
            if victim is None:
                return None
            slot = self._slot_of.pop(victim)
            del self._block_in[slot]
            self.lru.remove(victim)
            evicted = victim
        self._reserved[slot] = (block, parent)
        self._reserved_slot[block] = slot
        self.lru.hold(parent)
        return Taken(slot, evicted)

    def commit(self, slot: int) -> int:
        """Reserved slot -> committed (the most recently used). Returns its block's hash."""
        block, parent = self._reserved.pop(slot)
        del self._reserved_slot[block]
        self.lru.unhold(parent)
        self._slot_of[block] = slot
        self._block_in[slot] = block
        self.lru.add(block, parent)
        return block

    def unreserve(self, slot: int) -> int:
        """Reserved slot -> free (an abort, a partial commit, a timeout, a corrupt promotion)."""
        block, parent = self._reserved.pop(slot)
        del self._reserved_slot[block]
        self.lru.unhold(parent)
        bisect.insort(self._free, slot, key=lambda s: -s)  # still lowest first: runs stay runs
        return block

    def pin(self, slot: int) -> None:
        assert slot in self._block_in, f"pin of slot {slot}, which holds no committed block"
        self._pins[slot] += 1

    def unpin(self, slot: int) -> None:
        n = self._pins[slot] - 1
        if n > 0:
            self._pins[slot] = n
        else:
            del self._pins[slot]

    def touch(self, block: int) -> None:
        self.lru.touch(block)
