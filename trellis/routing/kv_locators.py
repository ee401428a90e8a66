"""Block locators for the KV-aware policy when the block index is not shared (embedded registry).

With a Redis registry the registry itself is the locator (one Lua script). With the embedded one,
the router, the workers and the store are separate processes that share no memory, so
`HeadQueryLocator` asks them: every healthy replica's head (MatchPrefix) and the KV store (Lookup),
all at once under one short deadline. Its answer has the registry's shape: location -> leading run,
replica locations named with the instance id "spec", the store's as its two tiers.

Invariants:
- one call waits at most ``deadline_s``: a source that has not answered by then, or failed, counts
  as holding nothing for this call (one warning when a source starts failing, one line when it
  answers again);
- if every source failed, the call raises (the policy then routes by least load).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol, TypeVar

from trellis.core import log
from trellis.core.kv_store_api import StoreRun
from trellis.registry import RegistryUnavailableError, replica_location, store_location
from trellis.routing.replicas import Replica

SPEC_INSTANCE = "spec"
DEFAULT_DEADLINE_S = 0.03
T = TypeVar("T")


class StoreLookup(Protocol):
    """The KV store's Lookup (trellis.wire.kv_store_client.KVStoreClient has it)."""

    async def lookup(self, hashes: Sequence[int]) -> StoreRun: ...


class HealthyReplicas(Protocol):
    def healthy(self) -> list[Replica]: ...


class HeadQueryLocator:
    def __init__(
        self,
        replicas: HealthyReplicas,
        store: StoreLookup | None = None,
        *,
        store_name: str = "kv0",
        deadline_s: float = DEFAULT_DEADLINE_S,
    ) -> None:
        self.replicas = replicas
        self.store = store
        self.deadline_s = deadline_s
        self._store_host = store_location(store_name, SPEC_INSTANCE, "host")
        self._store_disk = store_location(store_name, SPEC_INSTANCE, "disk")
        self._failing: set[str] = set()  # sources whose last answer was a failure
        self._log = log.get()

    async def leading_runs(self, hashes: Sequence[int]) -> dict[str, int]:
        hashes = list(hashes)
        if not hashes:
            return {}
        heads: dict[str, asyncio.Future[int]] = {
            r.name: asyncio.ensure_future(r.head.match_prefix(hashes, timeout_s=self.deadline_s))
            for r in self.replicas.healthy()
        }
        store = None if self.store is None else asyncio.ensure_future(self.store.lookup(hashes))
        tasks: list[asyncio.Future[object]] = [*heads.values(), *([store] if store else [])]
        if not tasks:
            return {}
        _, late = await asyncio.wait(tasks, timeout=self.deadline_s)
        for t in late:
            t.cancel()
        out: dict[str, int] = {}
        answered = 0
        for name, task in heads.items():
            run = self._answer(f"replica {name}", task, late)
            if run is not None:
                answered += 1
                out[replica_location(name, SPEC_INSTANCE)] = run
        if store is not None:
            found = self._answer("kv_store", store, late)
            if found is not None:
                answered += 1
                out[self._store_host], out[self._store_disk] = found.host, found.total
        if not answered:
            raise RegistryUnavailableError(f"no block source answered within {self.deadline_s} s")
        return {loc: run for loc, run in out.items() if run > 0}

    def _answer(self, source: str, task: asyncio.Future[T], late: set[asyncio.Future[object]]) -> T | None:
        """The task's result, or None (its failure noted) if it failed or was late."""
        if task in late:
            self._note_failure(source, f"no answer within {self.deadline_s} s")
            return None
        e = task.exception()
        if e is not None:
            self._note_failure(source, str(e) or type(e).__name__)
            return None
        self._note_success(source)
        return task.result()

    def _note_failure(self, source: str, error: str) -> None:
        if source not in self._failing:
            self._failing.add(source)
            self._log.warning(
                "block source not answering; counted as holding nothing", source=source, error=error
            )

    def _note_success(self, source: str) -> None:
        if source in self._failing:
            self._failing.discard(source)
            self._log.info("block source answering again", source=source)
