"""Leaf-first LRU over one tier's blocks: which block to evict next.

Blocks are named by chained hashes, each with its parent's hash. A block is a *leaf* of the tier
when no child of it is held there: no committed child, and no child reserved by an open put (a put
`hold`s its blocks' parents until it commits or aborts). Invariant: `candidates()` yields only
leaves, least recently used first, so a block is never evicted before a child of it (an evicted
parent would leave its children unreachable: a lookup's run stops at the first miss).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterator


class LeafLRU:
    def __init__(self) -> None:
        self._order: OrderedDict[int, None] = OrderedDict()  # least recently used first
        self._parent: dict[int, int] = {}
        self._children: Counter[int] = Counter()  # hash -> children held (present or reserved)

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, block: int) -> bool:
        return block in self._order

    def add(self, block: int, parent: int) -> None:
        """`block` is now in the tier (the most recently used); it holds its parent."""
        if block in self._order:
            self.touch(block)
            return
        self._order[block] = None
        self._parent[block] = parent
        self.hold(parent)

    def remove(self, block: int) -> None:
        """`block` left the tier; its parent may become a leaf."""
        if block not in self._order:
            return
        del self._order[block]
        self.unhold(self._parent.pop(block))

    def touch(self, block: int) -> None:
        if block in self._order:
            self._order.move_to_end(block)

    def hold(self, parent: int) -> None:
        """A child of `parent` is held (committed, or reserved by a put)."""
        self._children[parent] += 1

    def unhold(self, parent: int) -> None:
        n = self._children[parent] - 1
        if n > 0:
            self._children[parent] = n
        else:
            del self._children[parent]

    def is_leaf(self, block: int) -> bool:
        return block in self._order and self._children.get(block, 0) == 0

    def parent_of(self, block: int) -> int:
        return self._parent[block]

    def candidates(self) -> Iterator[int]:
        """The leaves, least recently used first (a snapshot: safe to evict while iterating)."""
        for block in list(self._order):
            if block in self._order and self._children.get(block, 0) == 0:
                yield block

    def blocks(self) -> list[int]:
        return list(self._order)
