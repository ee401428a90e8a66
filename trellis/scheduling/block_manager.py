"""Paged-KV block allocation with reference counts and a prefix cache (pure Python, no torch).

Every block is either in use (ref count > 0, in some sequence's table) or free. A full block whose
KV has been computed gets a name (trellis.core.hashing) and enters the prefix cache; a later sequence
whose leading tokens have the same names shares those blocks (ref count + 1) instead of
recomputing them. Names are registered only once the step that filled a block has completed
(``register_computed``, called when the scheduler processes the step's result): registering at
allocation would let another sequence read KV that is not written yet.

A freed block keeps its name, so it can still be reused, until it is needed for a fresh
allocation: free blocks without a name go first, then named ones in LRU order (a sequence's blocks
are freed tail first, so its shared-prefix head survives longest).

Listeners (``add_listener``) hear every change of the cache's names as a ``BlockEvent``: a block
REGISTERED (its name enters the cache), EVICTED (its name leaves: the block was taken for fresh
use), or HIT (a sequence was admitted on cached blocks: their second use). The stage service
publishes registered/evicted to the global block index, the KV agent offers blocks to the store;
neither is imported here.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from enum import Enum

from trellis.core import hashing
from trellis.scheduling.sequence import Sequence


class NoFreeBlocksError(RuntimeError):
    """An allocation asked for more blocks than are free (the scheduler checks first)."""


class BlockEventKind(Enum):
    REGISTERED = "registered"
    EVICTED = "evicted"
    HIT = "hit"


@dataclass(frozen=True)
class BlockEvent:
    kind: BlockEventKind
    hashes: tuple[int, ...]
    parents: tuple[int, ...] = ()  # REGISTERED and HIT: each block's parent name (0 for a first block)


BlockListener = Callable[[BlockEvent], None]


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold ``num_tokens`` tokens."""
    return -(-num_tokens // block_size)


class BlockManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        cache_key: str | bytes | None = None,
    ) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be > 0, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._cache_key = cache_key  # mixed into every first-block name (e.g. the model id)
        self._ref = [0] * num_blocks
        self._name: list[int | None] = [None] * num_blocks
        self._by_name: dict[int, int] = {}  # block name -> block id, in use or free
        self._free_unnamed: deque[int] = deque(range(num_blocks))
        self._free_named: OrderedDict[int, None] = OrderedDict()  # LRU first
        self._hit_tokens = 0
        self._query_tokens = 0
        self._evictions = 0
        self._listeners: list[BlockListener] = []

    def add_listener(self, listener: BlockListener) -> None:
        """Hear every REGISTERED / EVICTED / HIT event from now on (called synchronously: be quick)."""
        self._listeners.append(listener)

    def _emit(self, kind: BlockEventKind, hashes: list[int], parents: list[int] | None = None) -> None:
        if hashes and self._listeners:
            event = BlockEvent(kind, tuple(hashes), tuple(parents or ()))
            for listener in self._listeners:
                listener(event)

    # -- queries -------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_unnamed) + len(self._free_named)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free_blocks

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    def num_new_blocks(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks to append so ``seq`` can hold ``num_new_tokens`` more tokens after those computed."""
        need = blocks_for(seq.num_computed_tokens + num_new_tokens, self.block_size)
        return max(0, need - len(seq.block_table))

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding ``seq``'s leading full blocks (changes nothing).

        At least one token is left uncached: its logits give the next token.
        """
        if not self.enable_prefix_caching:
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        hits: list[int] = []
        for name in self._names(seq, max_blocks):
            block = self._by_name.get(name)
            if block is None:
                break
            hits.append(block)
        return hits

    def cached_run(self, hashes: Seq[int]) -> int:
        """How many leading names of ``hashes`` the cache holds (in use or free)."""
        n = 0
        for name in hashes:
            if name not in self._by_name:
                break
            n += 1
        return n

    def block_of(self, name: int) -> int | None:
        """The block holding ``name`` now, if any."""
        return self._by_name.get(name)

    def blocks_to_admit(self, prefix: list[int], num_tokens: int) -> int:
        """Free blocks consumed by admitting a sequence with ``num_tokens`` slots on ``prefix``."""
        reused_free = sum(1 for b in prefix if self._ref[b] == 0)
        return blocks_for(num_tokens, self.block_size) - len(prefix) + reused_free

    def stats(self) -> dict[str, int]:
        return {
            "num_blocks": self.num_blocks,
            "free_blocks": self.num_free_blocks,
            "cached_blocks": len(self._by_name),
            "prefix_hit_tokens": self._hit_tokens,
            "prefix_query_tokens": self._query_tokens,
            "evictions": self._evictions,
        }

    # -- changes -------------------------------------------------------------------------------

    def admit(self, seq: Sequence, prefix: list[int], num_tokens: int) -> None:
        """Give a sequence with no blocks the shared ``prefix`` and fresh blocks up to ``num_tokens``.

        The prefix's tokens count as computed. ``prefix`` comes from ``match_prefix`` just before.
        """
        if seq.block_table:
            raise RuntimeError(f"seq {seq.seq_id} is admitted while it still holds blocks")
        if self.blocks_to_admit(prefix, num_tokens) > self.num_free_blocks:
            raise NoFreeBlocksError(f"not enough free blocks to admit seq {seq.seq_id}")
        for block in prefix:
            if self._ref[block] == 0:
                del self._free_named[block]
            self._ref[block] += 1
        seq.block_table.extend(prefix)
        seq.num_computed_tokens = len(prefix) * self.block_size
        seq.num_registered_blocks = len(prefix)
        if self.enable_prefix_caching:
            self._hit_tokens += seq.num_computed_tokens
            self._query_tokens += seq.num_tokens
        if prefix:
            names = self._names(seq, len(prefix))
            self._emit(BlockEventKind.HIT, names[: len(prefix)], [0, *names[: len(prefix) - 1]])
        self.allocate_slots(seq, num_tokens - seq.num_computed_tokens)

    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> list[int]:
        """Append the blocks ``seq`` needs for ``num_new_tokens`` more tokens; returns them."""
        need = self.num_new_blocks(seq, num_new_tokens)
        if need > self.num_free_blocks:
            raise NoFreeBlocksError(f"seq {seq.seq_id} needs {need} blocks, {self.num_free_blocks} are free")
        new = [self._take_fresh() for _ in range(need)]
        seq.block_table.extend(new)
        return new

    def register_computed(self, seq: Sequence) -> None:
        """Offer ``seq``'s newly computed full blocks to the prefix cache (after their step completed)."""
        upto = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        if not self.enable_prefix_caching or upto <= seq.num_registered_blocks:
            return
        names = self._names(seq, upto)
        added: list[int] = []
        parents: list[int] = []
        for i in range(seq.num_registered_blocks, upto):
            block, name = seq.block_table[i], names[i]
            # Another block may already hold the same content (two sequences computed it at once):
            # keep the first; this one stays private and unnamed.
            if name not in self._by_name and self._name[block] is None:
                self._by_name[name] = block
                self._name[block] = name
                added.append(name)
                parents.append(names[i - 1] if i else 0)
        seq.num_registered_blocks = upto
        self._emit(BlockEventKind.REGISTERED, added, parents)

    def free(self, seq: Sequence) -> None:
        """Drop ``seq``'s hold on its blocks; blocks nobody holds become free, keeping their names."""
        for block in reversed(seq.block_table):
            self._ref[block] -= 1
            if self._ref[block] == 0:
                if self._name[block] is None:
                    self._free_unnamed.append(block)
                else:
                    self._free_named[block] = None
        seq.block_table.clear()
        seq.num_registered_blocks = 0

    def reset_prefix_cache(self) -> int:
        """Forget the names of every free block (blocks in use keep theirs); returns how many.

        What vLLM's ``reset_prefix_cache`` does: later prompts recompute (or load from the store)."""
        dropped = [self._name[b] for b in self._free_named]
        for block in self._free_named:
            name = self._name[block]
            assert name is not None
            del self._by_name[name]
            self._name[block] = None
            self._free_unnamed.append(block)
        self._free_named.clear()
        self._emit(BlockEventKind.EVICTED, [n for n in dropped if n is not None])
        return len(dropped)

    # -- internals -----------------------------------------------------------------------------

    def _take_fresh(self) -> int:
        if self._free_unnamed:
            block = self._free_unnamed.popleft()
        else:
            block, _ = self._free_named.popitem(last=False)
            name = self._name[block]
            assert name is not None
            del self._by_name[name]
            self._name[block] = None
            self._evictions += 1
            self._emit(BlockEventKind.EVICTED, [name])
        self._ref[block] = 1
        return block

    def _names(self, seq: Sequence, num_blocks: int) -> list[int]:
        """``seq.block_hashes`` grown to at least ``num_blocks`` names (of known tokens only)."""
        names = seq.block_hashes
        size = self.block_size
        while len(names) < num_blocks:
            i = len(names)
            parent = names[-1] if names else None
            tokens = seq.token_slice(i * size, (i + 1) * size)
            names.append(hashing.hash_block(parent, tokens, extra_key=self._cache_key))
        return names
