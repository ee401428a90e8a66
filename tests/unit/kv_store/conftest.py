"""A small store for the KV store's unit tests: its slab and disk under tmp_path, an injected clock."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from kv_store_helpers import FP, SLOT_BYTES, Clock, MakeStore

from trellis.core.spec import KVStoreSpec
from trellis.kv_store import KVStore


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def make_store(tmp_path: Path, clock: Clock) -> Iterator[MakeStore]:
    made: list[KVStore] = []

    def make(slots: int = 4, disk_blocks: int | None = None, **kw: object) -> KVStore:
        spec = KVStoreSpec(
            capacity_bytes=slots * SLOT_BYTES,
            shm_dir=str(tmp_path),
            disk_path=str(tmp_path / "disk") if disk_blocks is not None else None,
            disk_capacity_bytes=(disk_blocks or 0) * SLOT_BYTES,
            lease_ttl_s=30.0,
            put_timeout_s=10.0,
        )
        store = KVStore(spec, FP, clock=clock, **kw)  # type: ignore[arg-type]
        made.append(store)
        return store

    yield make
    for s in made:
        s.close()
