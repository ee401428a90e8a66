"""The disk tier: whole files, rebuilt from headers, checksums checked, leaf-first eviction."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from trellis.kv_store.disk_tier import HEADER, DiskTier, file_name

N = 64


def payload(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, N, dtype=np.uint8)


def put(d: DiskTier, block: int, parent: int) -> list[int]:
    d.write_file(block, parent, payload(block))
    return d.add(block, parent)


def test_write_read_and_rebuild(tmp_path: Path) -> None:
    d = DiskTier(tmp_path, 8, N)
    put(d, 1, 0)
    put(d, 2, 1)
    out = np.zeros(N, dtype=np.uint8)
    assert d.read(2, out) and (out == payload(2)).all()
    assert not list(tmp_path.glob("*.tmp"))
    again = DiskTier(tmp_path, 8, N)
    assert again.rebuild() == []
    assert 1 in again and 2 in again and again.parent_of(2) == 1
    assert again.read(1, out) and (out == payload(1)).all()


def test_a_corrupt_payload_is_dropped_at_read(tmp_path: Path) -> None:
    d = DiskTier(tmp_path, 8, N)
    put(d, 7, 0)
    f = tmp_path / file_name(7)
    raw = bytearray(f.read_bytes())
    raw[HEADER.size + 3] ^= 0xFF
    f.write_bytes(bytes(raw))
    out = np.zeros(N, dtype=np.uint8)
    assert not d.read(7, out)
    assert 7 not in d and not f.exists() and d.corrupt == 1


def test_bad_headers_are_dropped_at_rebuild(tmp_path: Path) -> None:
    d = DiskTier(tmp_path, 8, N)
    put(d, 1, 0)
    (tmp_path / file_name(2)).write_bytes(b"junk")  # a short header
    (tmp_path / f"{file_name(3)}.99.tmp").write_bytes(b"half")  # a write cut short
    wrong = tmp_path / file_name(4)
    wrong.write_bytes((tmp_path / file_name(1)).read_bytes())  # a header naming another block
    again = DiskTier(tmp_path, 8, N)
    again.rebuild()
    assert list(again.lru.blocks()) == [1]
    assert again.corrupt == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [file_name(1)]


def test_eviction_over_capacity_is_leaf_first(tmp_path: Path) -> None:
    d = DiskTier(tmp_path, 2, N)
    put(d, 1, 0)
    put(d, 2, 1)
    d.touch(1)
    assert put(d, 9, 0) == [2]  # 1 is older-touched than 9 but has a child; 2 is the LRU leaf
    assert 2 not in d and not (tmp_path / file_name(2)).exists()
    assert len(d) == 2


def test_rebuild_over_a_smaller_capacity_evicts(tmp_path: Path) -> None:
    d = DiskTier(tmp_path, 4, N)
    for b in (1, 2, 3):
        put(d, b, b - 1)
    smaller = DiskTier(tmp_path, 2, N)
    assert smaller.rebuild() == [3]  # the chain's leaf
    assert len(smaller) == 2
