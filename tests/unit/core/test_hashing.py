"""The KV block name: its definition, chaining, stability across processes, and bad input."""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys

import pytest

from trellis.core.hashing import HashingError, block_hashes, hash_block, root_hash

TOKENS = [5, 17, 0, 2**31 - 1, 42, 7, 7, 7, 100, 3]


def _spelled_out(token_ids: list[int], block_size: int, key: bytes) -> list[int]:
    """The documented definition, written independently of the module."""

    def h(data: bytes) -> bytes:
        return hashlib.blake2b(data, digest_size=8, person=b"trellis-kv-v1").digest()

    parent = h(b"root:" + key)
    out = []
    for start in range(0, len(token_ids) // block_size * block_size, block_size):
        block = token_ids[start : start + block_size]
        parent = h(parent + struct.pack(f"<{len(block)}i", *block))
        out.append(int.from_bytes(parent, "little"))
    return out


def test_matches_the_documented_definition() -> None:
    assert block_hashes(TOKENS, 4) == _spelled_out(TOKENS, 4, b"")
    assert block_hashes(TOKENS, 3, "llama-3-8b") == _spelled_out(TOKENS, 3, b"llama-3-8b")
    assert all(0 <= h < 2**64 for h in block_hashes(TOKENS, 1))


def test_only_full_blocks_have_names() -> None:
    assert len(block_hashes(TOKENS, 4)) == 2
    assert len(block_hashes(TOKENS, 5)) == 2
    assert block_hashes(TOKENS, 11) == []
    assert block_hashes([], 4) == []


def test_a_name_covers_the_whole_prefix() -> None:
    names = block_hashes(TOKENS, 2)
    changed_first = block_hashes([6, *TOKENS[1:]], 2)
    assert all(a != b for a, b in zip(names, changed_first, strict=True))  # every later block moves
    changed_third = [*TOKENS[:4], 99, *TOKENS[5:]]
    assert block_hashes(changed_third, 2)[:2] == names[:2]  # earlier blocks stay
    assert block_hashes(changed_third, 2)[2:] != names[2:]
    # The same tokens at another place in the sequence get another name.
    repeated = block_hashes([1, 2, 1, 2], 2)
    assert repeated[0] != repeated[1]


def test_prefix_of_tokens_gives_prefix_of_names() -> None:
    assert block_hashes(TOKENS[:6], 3) == block_hashes(TOKENS, 3)[:2]


def test_hash_block_chains_like_block_hashes() -> None:
    first = hash_block(None, TOKENS[:3], extra_key="m")
    assert first == hash_block(root_hash("m"), TOKENS[:3])
    assert hash_block(first, TOKENS[3:6]) == block_hashes(TOKENS, 3, "m")[1]


def test_extra_key_separates_models() -> None:
    assert block_hashes(TOKENS, 4, "model-a") != block_hashes(TOKENS, 4, "model-b")
    assert block_hashes(TOKENS, 4, "model-a") == block_hashes(TOKENS, 4, b"model-a")
    assert block_hashes(TOKENS, 4, None) == block_hashes(TOKENS, 4, "")


def test_same_names_in_another_process() -> None:
    code = "from trellis.core.hashing import block_hashes; print(block_hashes(list(range(40)), 8, 'k'))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(block_hashes(list(range(40)), 8, "k"))


def test_bad_input_is_one_clear_error() -> None:
    with pytest.raises(HashingError, match="block_size must be > 0, got 0"):
        block_hashes(TOKENS, 0)
    with pytest.raises(HashingError, match="int32 integers, got 2147483648"):
        block_hashes([1, 2**31], 2)
    with pytest.raises(HashingError, match="got 'a'"):
        hash_block(None, [1, "a"])  # type: ignore[list-item]
