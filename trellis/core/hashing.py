"""The content address of a KV block: one definition for every service.

Block i of a sequence is named by a chained hash, h_i = H(h_{i-1} || token ids of block i), so a
name covers the whole prefix up to the end of the block: two sequences share block i's KV exactly
when they share every token up to it. Only FULL blocks have a name (a partial block's KV is still
growing). H is BLAKE2b over little-endian int32 token bytes, truncated to 64 bits: stable across
processes, hosts and Python versions (unlike ``hash()``), and fits a protobuf uint64.

The first block chains from a root made of an optional extra key (e.g. the model id), so blocks of
different models never share a name. No key and an empty key are the same root.
"""

from __future__ import annotations

import array
import hashlib
import struct
import sys
from collections.abc import Sequence

HASH_BYTES = 8  # 64-bit names
_PERSON = b"trellis-kv-v1"  # domain separation: these digests mean nothing elsewhere
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


class HashingError(ValueError):
    """Bad input to the block hash (a block size or a token id), told in one line."""


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=HASH_BYTES, person=_PERSON).digest()


def _key_bytes(extra_key: str | bytes | None) -> bytes:
    if extra_key is None:
        return b""
    return extra_key.encode() if isinstance(extra_key, str) else bytes(extra_key)


def root_hash(extra_key: str | bytes | None = None) -> int:
    """The parent of a sequence's first block."""
    return int.from_bytes(_digest(b"root:" + _key_bytes(extra_key)), "little")


def _token_bytes(token_ids: Sequence[int]) -> bytes:
    try:
        return struct.pack(f"<{len(token_ids)}i", *token_ids)
    except struct.error:
        bad = next((t for t in token_ids if not (isinstance(t, int) and _INT32_MIN <= t <= _INT32_MAX)), None)
        raise HashingError(f"token ids must be int32 integers, got {bad!r}") from None


def hash_block(parent: int | None, token_ids: Sequence[int], *, extra_key: str | bytes | None = None) -> int:
    """The name of a block given its parent's name (None for a sequence's first block).

    ``extra_key`` only matters for the first block; later blocks inherit it through the chain.
    """
    if parent is None:
        parent = root_hash(extra_key)
    return int.from_bytes(_digest(parent.to_bytes(HASH_BYTES, "little") + _token_bytes(token_ids)), "little")


def block_hashes(
    token_ids: Sequence[int], block_size: int, extra_key: str | bytes | None = None
) -> list[int]:
    """The chained names of every full block of ``token_ids`` (a trailing partial block has none).

    The whole prompt is packed once and each block's bytes sliced from it (an 8k-token prompt's
    512 names take ~0.4 ms, ~0.8 us each, nearly all of it BLAKE2b itself)."""
    if block_size <= 0:
        raise HashingError(f"block_size must be > 0, got {block_size}")
    data = _prompt_bytes(token_ids)
    step = 4 * block_size
    out: list[int] = []
    parent = root_hash(extra_key).to_bytes(HASH_BYTES, "little")
    for start in range(0, len(data) - step + 1, step):
        parent = _digest(parent + data[start : start + step])
        out.append(int.from_bytes(parent, "little"))
    return out


def _prompt_bytes(token_ids: Sequence[int]) -> bytes:
    """Little-endian int32 bytes of every token (the same bytes ``_token_bytes`` gives)."""
    try:
        packed = array.array("i", token_ids)
    except (OverflowError, TypeError):
        return _token_bytes(token_ids)  # raises HashingError naming the bad id
    if packed.itemsize != 4:  # pragma: no cover - every platform CPython runs on has 4-byte ints
        return _token_bytes(token_ids)
    if sys.byteorder == "big":  # pragma: no cover
        packed.byteswap()
    return packed.tobytes()
