"""Block manager: allocation, reference counts, prefix sharing, when names register, LRU eviction."""

from __future__ import annotations

import pytest

from trellis.core.hashing import block_hashes
from trellis.core.sampling import SamplingParams
from trellis.scheduling.block_manager import BlockManager, NoFreeBlocksError
from trellis.scheduling.sequence import Sequence


def make_seq(seq_id: int, prompt: list[int], outputs: list[int] | None = None) -> Sequence:
    seq = Sequence(seq_id=seq_id, prompt_ids=tuple(prompt), sampling=SamplingParams(), arrival=seq_id)
    seq.output_ids.extend(outputs or [])
    return seq


def admit_all(bm: BlockManager, seq: Sequence) -> list[int]:
    """Admit ``seq`` with every known token, reusing what the cache has; returns the prefix hits."""
    prefix = bm.match_prefix(seq)
    bm.admit(seq, prefix, seq.num_tokens)
    return prefix


def compute_all(bm: BlockManager, seq: Sequence) -> None:
    """What the scheduler does when a step that fed every known token completes."""
    seq.num_computed_tokens = seq.num_tokens
    bm.register_computed(seq)


def test_allocate_grow_and_free() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(0, list(range(10)))
    assert admit_all(bm, seq) == []
    assert len(seq.block_table) == 3 and len(set(seq.block_table)) == 3
    assert bm.num_free_blocks == 5
    assert all(bm.ref_count(b) == 1 for b in seq.block_table)
    seq.num_computed_tokens = 10
    assert bm.num_new_blocks(seq, 2) == 0  # slots 10 and 11 fit the third block
    assert bm.allocate_slots(seq, 2) == []
    assert bm.num_new_blocks(seq, 3) == 1
    assert len(bm.allocate_slots(seq, 3)) == 1 and bm.num_free_blocks == 4
    bm.free(seq)
    assert seq.block_table == [] and bm.num_free_blocks == 8
    assert all(bm.ref_count(b) == 0 for b in range(8))


def test_cannot_allocate_more_than_free() -> None:
    bm = BlockManager(num_blocks=2, block_size=4)
    seq = make_seq(0, list(range(8)))
    admit_all(bm, seq)
    assert not bm.can_allocate(1)
    seq.num_computed_tokens = 8
    with pytest.raises(NoFreeBlocksError, match="seq 0 needs 1 blocks, 0 are free"):
        bm.allocate_slots(seq, 1)
    assert len(seq.block_table) == 2  # a failed allocation changes nothing


def test_names_register_only_once_computed() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    a = make_seq(0, list(range(12)))
    admit_all(bm, a)
    b = make_seq(1, list(range(13)))
    assert bm.match_prefix(b) == []  # a's KV is allocated but not written yet
    a.num_computed_tokens = 6  # a prefill chunk of 6 completed: only block 0 is full and written
    bm.register_computed(a)
    assert bm.match_prefix(b) == a.block_table[:1]
    compute_all(bm, a)
    assert bm.match_prefix(b) == a.block_table[:3]
    assert a.block_hashes[:3] == block_hashes(list(range(12)), 4)


def test_shared_prefix_counts_as_computed_and_refcounts() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    a = make_seq(0, list(range(12)))
    admit_all(bm, a)
    compute_all(bm, a)
    b = make_seq(1, [*range(12), 50, 51])
    free_before = bm.num_free_blocks
    assert admit_all(bm, b) == a.block_table
    assert b.num_computed_tokens == 12
    assert b.block_table[:3] == a.block_table and b.block_table[3] not in a.block_table
    assert bm.num_free_blocks == free_before - 1
    assert [bm.ref_count(x) for x in b.block_table] == [2, 2, 2, 1]
    bm.free(a)
    assert [bm.ref_count(x) for x in b.block_table] == [1, 1, 1, 1]  # still b's, not free
    assert bm.num_free_blocks == free_before - 1
    assert bm.stats()["prefix_hit_tokens"] == 12


def test_whole_prompt_cached_still_leaves_a_token_to_compute() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    a = make_seq(0, list(range(8)))
    admit_all(bm, a)
    compute_all(bm, a)
    twin = make_seq(1, list(range(8)))
    assert bm.match_prefix(twin) == a.block_table[:1]  # block 1 is recomputed for the last logits


def test_freed_blocks_keep_names_until_evicted_lru_first() -> None:
    bm = BlockManager(num_blocks=6, block_size=2)
    a = make_seq(0, list(range(6)))  # 3 blocks
    admit_all(bm, a)
    compute_all(bm, a)
    a_blocks = list(a.block_table)
    bm.free(a)
    assert bm.num_free_blocks == 6 and bm.stats()["cached_blocks"] == 3
    again = make_seq(1, [*range(6), 9])
    assert bm.match_prefix(again) == a_blocks  # free, but still reusable
    # Three fresh blocks come from the never-named ones; the fourth evicts a's tail block (LRU).
    other = make_seq(2, [100 + i for i in range(8)])
    admit_all(bm, other)
    assert set(other.block_table) & set(a_blocks) == {a_blocks[2]}
    assert bm.stats()["evictions"] == 1
    assert bm.match_prefix(again) == a_blocks[:2]  # the head of a's prefix survived


def test_reusing_a_free_named_block_takes_it_out_of_the_free_pool() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    a = make_seq(0, [1, 2, 3, 4])
    admit_all(bm, a)
    compute_all(bm, a)
    bm.free(a)
    b = make_seq(1, [1, 2, 3, 4, 5])
    prefix = bm.match_prefix(b)
    assert bm.blocks_to_admit(prefix, 5) == 3  # two reused free blocks plus one fresh
    bm.admit(b, prefix, 5)
    assert bm.num_free_blocks == 1
    c = make_seq(2, [7, 7])
    admit_all(bm, c)
    assert bm.num_free_blocks == 0
    assert set(c.block_table).isdisjoint(b.block_table)  # cannot evict blocks in use


def test_same_content_computed_twice_keeps_the_first_name() -> None:
    bm = BlockManager(num_blocks=8, block_size=2)
    a, b = make_seq(0, [1, 2, 3]), make_seq(1, [1, 2, 3])
    admit_all(bm, a)
    admit_all(bm, b)  # admitted before a's block was computed: no sharing
    compute_all(bm, a)
    compute_all(bm, b)
    assert bm.match_prefix(make_seq(2, [1, 2, 3])) == a.block_table[:1]
    assert bm.stats()["cached_blocks"] == 1
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 8


def test_prefix_caching_off_and_cache_keys() -> None:
    off = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    a = make_seq(0, [1, 2, 3, 4, 5])
    admit_all(off, a)
    compute_all(off, a)
    assert off.match_prefix(make_seq(1, [1, 2, 3, 4, 5])) == []
    assert off.stats()["cached_blocks"] == 0

    keyed = BlockManager(num_blocks=8, block_size=2, cache_key="model-a")
    a = make_seq(0, [1, 2, 3, 4, 5])
    admit_all(keyed, a)
    compute_all(keyed, a)
    assert a.block_hashes == block_hashes([1, 2, 3, 4, 5], 2, "model-a")
    assert keyed.match_prefix(make_seq(1, [1, 2, 3, 4, 5])) == a.block_table[:2]


def test_names_cover_outputs_too() -> None:
    bm = BlockManager(num_blocks=8, block_size=2)
    a = make_seq(0, [1, 2, 3], outputs=[4, 5])
    admit_all(bm, a)
    compute_all(bm, a)
    assert a.block_hashes == block_hashes([1, 2, 3, 4, 5], 2)
    assert bm.match_prefix(make_seq(1, [1, 2, 3, 4, 5, 6])) == a.block_table[:2]
