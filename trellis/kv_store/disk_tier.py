"""The disk tier: one file per block in `disk_path`, at most `capacity_blocks` of them.

A file is ``{hash:016x}.kvb``: a 40-byte header (magic, version, hash, parent's hash, payload
length, BLAKE2b-64 of the payload), then the payload (one slot's bytes). It is written to a temp
name and `os.replace`d, so a reader (or a restart) sees a whole file or none. At start `rebuild()`
reads every header (a bad one: the file is deleted, one log line) and orders the blocks by mtime
for the LRU; the checksum is verified on every `read` (a mismatch: the file is deleted, counted,
and the read is a miss).

Invariants: the index holds exactly the blocks whose files were written whole and not removed;
len(index) <= capacity_blocks after every `add` (leaf-first LRU eviction, as on the host).
`write_file` only touches the file system (safe from the write-behind thread, outside the lock);
every other method changes the index and runs under the store's lock.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import numpy as np

from trellis.core import log
from trellis.core.errors import ConfigError
from trellis.kv_store.leaf_lru import LeafLRU

MAGIC = b"TKVB"
VERSION = 1
HEADER = struct.Struct("<4sIQQQ8s")  # magic, version, hash, parent, payload length, checksum
SUFFIX = ".kvb"


def checksum(payload: bytes | memoryview | np.ndarray) -> bytes:
    return hashlib.blake2b(memoryview(payload).cast("B"), digest_size=8).digest()


def file_name(block: int) -> str:
    return f"{block:016x}{SUFFIX}"


class DiskTier:
    def __init__(self, path: str | Path, capacity_blocks: int, payload_bytes: int) -> None:
        if capacity_blocks < 1:
            raise ConfigError(
                f"kv_store.disk_capacity_bytes: less than one block of {payload_bytes} bytes "
                "(raise it, or leave kv_store.disk_path out for no disk tier)"
            )
        self.path = Path(path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"kv_store.disk_path: cannot create {self.path}: {e.strerror}") from None
        self.capacity_blocks = capacity_blocks
        self.payload_bytes = payload_bytes
        self.lru = LeafLRU()
        self.corrupt = 0  # files dropped: bad header at rebuild, bad checksum at read
        self.evictions = 0
        self.reads = 0
        self.writes = 0

    def __len__(self) -> int:
        return len(self.lru)

    def __contains__(self, block: int) -> bool:
        return block in self.lru

    def _file(self, block: int) -> Path:
        return self.path / file_name(block)

    def rebuild(self) -> list[int]:
        """Index the files already there (oldest first); returns the blocks evicted over capacity."""
        found: list[tuple[float, int, int]] = []
        for p in self.path.iterdir():
            if p.name.endswith(".tmp"):  # a write cut short by a crash
                self._drop(p, "an unfinished write")
                continue
            if not p.name.endswith(SUFFIX):
                continue
            try:
                with p.open("rb") as f:
                    raw = f.read(HEADER.size)
                size = p.stat().st_size
                mtime = p.stat().st_mtime
            except OSError as e:
                self._drop(p, f"unreadable ({e.strerror})")
                continue
            problem = self._header_problem(p.name, raw, size)
            if problem:
                self._drop(p, problem)
                continue
            _, _, block, parent, _, _ = HEADER.unpack(raw)
            found.append((mtime, block, parent))
        for _, block, parent in sorted(found):
            self.lru.add(block, parent)
        return self._evict_over(self.capacity_blocks)

    def _header_problem(self, name: str, raw: bytes, size: int) -> str | None:
        if len(raw) != HEADER.size:
            return "a short header"
        magic, version, block, _, length, _ = HEADER.unpack(raw)
        if magic != MAGIC or version != VERSION:
            return "not a block file of this version"
        if name != file_name(block):
            return "its name is not its block's hash"
        if length != self.payload_bytes:
            return f"a payload of {length} bytes, a block here is {self.payload_bytes}"
        if size != HEADER.size + length:
            return f"{size} bytes, the header says {HEADER.size + length}"
        return None

    def _drop(self, p: Path, why: str) -> None:
        self.corrupt += 1
        log.get().warning("disk tier: dropping a bad block file", path=str(p), why=why)
        try:
            p.unlink(missing_ok=True)
        except OSError as e:
            log.get().error("disk tier: cannot delete a bad block file", path=str(p), error=e.strerror)

    def write_file(self, block: int, parent: int, payload: np.ndarray) -> None:
        """Write `block`'s file whole (temp name, fsync-free, then os.replace). File system only."""
        data = memoryview(np.ascontiguousarray(payload)).cast("B")
        header = HEADER.pack(MAGIC, VERSION, block, parent, len(data), checksum(data))
        final = self._file(block)
        tmp = final.with_name(f"{final.name}.{os.getpid()}.tmp")
        with tmp.open("wb") as f:
            f.write(header)
            f.write(data)
        os.replace(tmp, final)

    def add(self, block: int, parent: int) -> list[int]:
        """Index a block whose file was just written; returns the blocks evicted to make room."""
        self.writes += 1
        self.lru.add(block, parent)
        return self._evict_over(self.capacity_blocks)  # the new block only if it is the only leaf

    def _evict_over(self, limit: int) -> list[int]:
        evicted = []
        for victim in self.lru.candidates():
            if len(self.lru) <= limit:
                break
            self.remove(victim)
            self.evictions += 1
            evicted.append(victim)
        return evicted

    def read(self, block: int, out: np.ndarray) -> bool:
        """Fill `out` (payload_bytes, uint8) with `block`'s payload; False (and the file dropped)
        if it is missing or corrupt."""
        p = self._file(block)
        try:
            with p.open("rb") as f:
                raw = f.read(HEADER.size)
                problem = self._header_problem(p.name, raw, HEADER.size + self.payload_bytes)
                if problem is None:
                    n = f.readinto(memoryview(out).cast("B"))
                    if n != self.payload_bytes:
                        problem = f"a payload cut short at {n} bytes"
                    elif checksum(out) != HEADER.unpack(raw)[5]:
                        problem = "its payload does not match its checksum"
        except OSError as e:
            problem = f"unreadable ({e.strerror})"
        if problem is not None:
            self.lru.remove(block)
            self._drop(p, problem)
            return False
        self.reads += 1
        self.lru.touch(block)
        return True

    def touch(self, block: int) -> None:
        self.lru.touch(block)

    def parent_of(self, block: int) -> int:
        return self.lru.parent_of(block)

    def remove(self, block: int) -> None:
        self.lru.remove(block)
        try:
            self._file(block).unlink(missing_ok=True)
        except OSError as e:
            log.get().error("disk tier: cannot delete a block file", block=f"{block:016x}", error=e.strerror)
