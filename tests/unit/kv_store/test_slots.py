"""Slot accounting and leaf-first LRU: the states add up, pins hold, leaves go first."""

from __future__ import annotations

from trellis.kv_store.leaf_lru import LeafLRU
from trellis.kv_store.slots import HostSlots


def always(_: int) -> bool:
    return True


def test_take_commit_unreserve_keep_the_sum() -> None:
    s = HostSlots(3)
    a = s.take(10, 0, always)
    b = s.take(11, 10, always)
    assert a is not None and b is not None and (a.slot, b.slot) == (0, 1) and a.evicted is None
    assert (s.free_count, s.reserved_count, s.committed_count) == (1, 2, 0)
    s.commit(a.slot)
    s.unreserve(b.slot)
    assert (s.free_count, s.reserved_count, s.committed_count) == (2, 0, 1)
    assert s.slot_of(10) == 0 and s.slot_of(11) is None and not s.is_reserved(11)
    s.check()


def test_eviction_is_leaf_first_then_lru() -> None:
    s = HostSlots(3)
    for h, p in ((1, 0), (2, 1), (9, 0)):  # a chain 1 -> 2, and a lone 9
        t = s.take(h, p, always)
        assert t is not None
        s.commit(t.slot)
    s.touch(1)  # LRU order now 2, 9, 1
    t = s.take(50, 0, always)
    assert t is not None and t.evicted == 2  # the oldest leaf
    t = s.take(51, 0, always)
    assert t is not None and t.evicted == 9  # 1 is a leaf now, but more recently used than 9
    t = s.take(52, 0, always)
    assert t is not None and t.evicted == 1
    s.check()


def test_lru_among_leaves() -> None:
    s = HostSlots(2)
    for h in (1, 2):
        t = s.take(h, 0, always)
        assert t is not None
        s.commit(t.slot)
    s.touch(1)
    t = s.take(3, 0, always)
    assert t is not None and t.evicted == 2  # the least recently used leaf
    s.check()


def test_pinned_and_refused_blocks_are_not_evicted() -> None:
    s = HostSlots(2)
    for h in (1, 2):
        t = s.take(h, 0, always)
        assert t is not None
        s.commit(t.slot)
    slot1 = s.slot_of(1)
    assert slot1 is not None
    s.pin(slot1)
    t = s.take(3, 0, lambda b: b != 2)  # 2 is refused (say, not yet on disk), 1 is pinned
    assert t is None
    s.unpin(slot1)
    t = s.take(3, 0, lambda b: b != 2)
    assert t is not None and t.evicted == 1
    s.check()


def test_a_reserved_child_holds_its_parent() -> None:
    s = HostSlots(2)
    t = s.take(1, 0, always)
    assert t is not None
    s.commit(t.slot)
    child = s.take(2, 1, always)  # reserved, not committed: 1 is still no leaf
    assert child is not None
    assert s.take(3, 0, always) is None
    s.unreserve(child.slot)
    assert next(s.lru.candidates()) == 1


def test_leaf_lru_children_before_parents() -> None:
    lru = LeafLRU()
    lru.add(2, 1)  # the child arrives first
    lru.add(1, 0)
    assert list(lru.candidates()) == [2]
    lru.remove(2)
    assert list(lru.candidates()) == [1]
