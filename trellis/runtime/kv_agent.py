"""The head's side of the KV store: leases to load a prompt's blocks from, blocks offered to it.

Loads: at submit, for a prompt with full blocks past the local prefix match, one Acquire RPC
leases the store's run of them; the scheduler loads them at admission and checks the lease when
the step returns (trellis/scheduling/scheduler.py). Saves: a block registered (write-through) or
hit again (second-use) is offered in batches (BeginPut); a ticket's blocks are copied out by the
next plan (only those whose name still maps to a block: one resolved right after schedule(), so
nothing later in that plan can overwrite them first) and committed when that plan returns, or
aborted if a stage reported the copy failed.

The store is a soft dependency: any RPC error or deadline puts the agent in back-off (no store
calls for BACKOFF_S; requests recompute), then it re-reads the store's Info, so a restarted store
(a new instance, a new slab) is picked up and the old one's leases and tickets are dropped.
Nothing here ever blocks a step: RPCs run as tasks, plans only read what they already returned.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from trellis.core import log
from trellis.core.errors import TrellisError
from trellis.core.kv_names import KVFingerprint
from trellis.core.kv_store_api import Lease, PutTicket, StoreInfo
from trellis.core.plan import KVCopy, StepPlan, StepResult
from trellis.scheduling.block_manager import BlockEvent, BlockEventKind
from trellis.scheduling.scheduler import Scheduler
from trellis.scheduling.sequence import StoreHit

T = TypeVar("T")

BACKOFF_S = 1.0
OFFER_BATCH = 512  # blocks per BeginPut
KNOWN_LIMIT = 1 << 17  # names remembered as in the store (so they are not offered again)


class StoreClient(Protocol):
    """What the agent needs of trellis.wire.kv_store_client.KVStoreClient."""

    async def info(self) -> StoreInfo: ...
    async def acquire(self, hashes: Sequence[int], ttl_s: float) -> Lease: ...
    async def release(self, lease_id: str) -> bool: ...
    async def begin_put(
        self, hashes: Sequence[int], parents: Sequence[int], timeout_s: float
    ) -> PutTicket: ...
    async def commit_put(self, put_id: str, hashes: Sequence[int]) -> int: ...
    async def abort_put(self, put_id: str) -> None: ...
    async def close(self) -> None: ...


@dataclass
class AgentStats:
    lookups: int = 0  # Acquire RPCs
    lookup_s: float = 0.0  # their seconds, summed (each one is on its request's TTFT)
    hit_blocks: int = 0  # blocks leased for loading
    offered_blocks: int = 0
    committed_blocks: int = 0
    aborted_puts: int = 0
    errors: int = 0  # store RPCs that failed (each one a fallback to recompute)


@dataclass(frozen=True)
class _Ready:
    ticket: PutTicket
    born: float  # monotonic


class KVAgent:
    def __init__(
        self,
        client: StoreClient,
        fingerprint: KVFingerprint,
        scheduler: Scheduler,
        *,
        write_through: bool,
        lease_ttl_s: float,
        put_timeout_s: float,
        wake: Callable[[], None] = lambda: None,
    ) -> None:
        self.client = client
        self.fingerprint = fingerprint
        self.scheduler = scheduler
        self.write_through = write_through
        self.lease_ttl_s = lease_ttl_s
        self.put_timeout_s = put_timeout_s
        self._wake_head = wake
        self.info: StoreInfo | None = None
        self.refused = False  # another fingerprint: never used
        self.stats = AgentStats()
        self._down_until = 0.0
        self._failing = False
        self._closed = False
        self._reconnect: asyncio.Task[None] | None = None
        self._known: OrderedDict[int, None] = OrderedDict()  # names the store holds (LRU-bounded)
        self._offers: dict[int, int] = {}  # name -> parent, to offer
        self._ready: list[_Ready] = []
        self._saving: dict[int, list[tuple[str, tuple[int, ...]]]] = {}  # step id -> (put id, hashes)
        self._mail: asyncio.Queue[tuple[str, str, tuple[int, ...]]] = asyncio.Queue()
        self._offer_wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._log = log.get(component="kv_agent")
        scheduler.block_manager.add_listener(self._on_block_event)

    # ---- life cycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        await self._refresh_info()  # the store may be down now: the reconnect task keeps trying
        self._tasks = [asyncio.create_task(self._offer_loop()), asyncio.create_task(self._mail_loop())]

    async def close(self) -> None:
        self._closed = True
        if self._reconnect is not None:
            self._tasks.append(self._reconnect)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for r in self._ready:  # best effort: the store reclaims them after put_timeout_s anyway
            await self._call("abort", self.client.abort_put(r.ticket.put_id))
        await self.client.close()

    @property
    def usable(self) -> bool:
        return self.info is not None and not self.refused and time.monotonic() >= self._down_until

    # ---- loads -----------------------------------------------------------------------------------
    def blocks_to_look_up(self, prompt_ids: Sequence[int]) -> list[int] | None:
        """The names of the prompt's blocks that may be cached (all but the last token's) when the
        local cache lacks some of them, or None (no RPC needed). The scheduler takes them too, so
        the prompt is hashed once."""
        if not self.usable:
            return None
        size = self.fingerprint.block_size
        names = self.fingerprint.block_hashes(prompt_ids)[: (len(prompt_ids) - 1) // size]
        return names if self.scheduler.block_manager.cached_run(names) < len(names) else None

    async def acquire(self, names: list[int]) -> StoreHit | None:
        """A lease on the store's run of ``names`` past the local match, or None."""
        info = self.info
        assert info is not None
        self.stats.lookups += 1
        first = self.scheduler.block_manager.cached_run(names)
        names = names[first:]
        started = time.perf_counter()
        lease = await self._call("acquire", self.client.acquire(names, self.lease_ttl_s))
        self.stats.lookup_s += time.perf_counter() - started
        if lease is None or not lease.slots:
            return None
        if lease.instance_id != info.instance_id:  # the store restarted since Info: read it again
            await self._refresh_info()
            if self.info is None or self.info.instance_id != lease.instance_id or self.refused:
                self._mail.put_nowait(("release", lease.lease_id, ()))
                return None
            info = self.info
        self.stats.hit_blocks += len(lease.slots)
        for name in names[: len(lease.slots)]:
            self._remember(name)
        return StoreHit(lease.lease_id, first, lease.slots, lease.expires_at, info.slab_path)

    def release_unused(self, lease_id: str) -> None:
        """A lease whose request went away before it reached the scheduler."""
        self._mail.put_nowait(("release", lease_id, ()))

    # ---- saves -----------------------------------------------------------------------------------
    def _on_block_event(self, event: BlockEvent) -> None:
        wanted = BlockEventKind.REGISTERED if self.write_through else BlockEventKind.HIT
        if event.kind is not wanted or not self.usable:
            return
        for name, parent in zip(event.hashes, event.parents, strict=True):
            if name not in self._known and name not in self._offers:
                self._offers[name] = parent
        if self._offers:
            self._offer_wake.set()

    def has_ready_saves(self) -> bool:
        return bool(self._ready)

    def attach(self, plan: StepPlan) -> StepPlan:
        """The plan with the ready tickets' copies (saves), when its slab is the store's current one."""
        info = self.info
        if not self._ready or info is None or plan.kv_slab not in ("", info.slab_path):
            return plan
        bm = self.scheduler.block_manager
        copies: list[KVCopy] = []
        saving: list[tuple[str, tuple[int, ...]]] = []
        now = time.monotonic()
        for ready in self._ready:
            t = ready.ticket
            alive = now - ready.born < self.put_timeout_s / 2 and t.instance_id == info.instance_id
            rows = [(h, s, bm.block_of(h)) for h, s in t.writable()] if alive else []
            rows = [(h, s, b) for h, s, b in rows if b is not None]
            if not rows:
                self._mail.put_nowait(("abort", t.put_id, ()))
                continue
            copies.append(KVCopy(tuple(b for _, _, b in rows), tuple(s for _, s, _ in rows)))
            saving.append((t.put_id, tuple(h for h, _, _ in rows)))
        self._ready.clear()
        if not copies:
            return plan
        self._saving[plan.step_id] = saving
        return dataclasses.replace(plan, kv_slab=info.slab_path, kv_saves=copies)

    def completed(self, result: StepResult) -> None:
        """After the scheduler took the step: commit (or abort) its puts, release its leases."""
        for put_id, hashes in self._saving.pop(result.step_id, []):
            self._mail.put_nowait(("abort" if result.kv_failed else "commit", put_id, hashes))
        for lease_id in self.scheduler.take_released_leases():
            self._mail.put_nowait(("release", lease_id, ()))

    # ---- background --------------------------------------------------------------------------------
    async def _offer_loop(self) -> None:
        while True:
            await self._offer_wake.wait()
            self._offer_wake.clear()
            while self._offers and self.usable:
                batch = list(self._offers.items())[:OFFER_BATCH]
                for name, _ in batch:
                    del self._offers[name]
                hashes, parents = [n for n, _ in batch], [p for _, p in batch]
                ticket = await self._call(
                    "begin_put", self.client.begin_put(hashes, parents, self.put_timeout_s)
                )
                if ticket is None:
                    break
                self.stats.offered_blocks += len(ticket.writable())
                for h, s in zip(ticket.hashes, ticket.slots, strict=True):
                    if s < 0:
                        self._remember(h)  # present already (or no room now: not offered again soon)
                if ticket.writable():
                    self._ready.append(_Ready(ticket, time.monotonic()))
                    self._wake_head()
                else:
                    self._mail.put_nowait(("abort", ticket.put_id, ()))
            if not self.usable:
                self._offers.clear()

    async def _mail_loop(self) -> None:
        """Commits, aborts and releases, in order, off the step's path."""
        while True:
            kind, ident, hashes = await self._mail.get()
            if kind == "commit":
                n = await self._call("commit", self.client.commit_put(ident, hashes))
                if n:
                    self.stats.committed_blocks += n
                    for h in hashes:
                        self._remember(h)
            elif kind == "abort":
                self.stats.aborted_puts += 1
                await self._call("abort", self.client.abort_put(ident))
            else:
                await self._call("release", self.client.release(ident))

    async def _refresh_info(self) -> bool:
        """Read the store's Info; False if it could not be reached."""
        info = await self._call("info", self.client.info())
        if info is None:
            return False
        if info.fingerprint != self.fingerprint.key or info.canary != self.fingerprint.canary():
            if not self.refused:
                self._log.error(
                    "kv store names blocks differently; not using it",
                    store_canary=info.canary,
                    our_canary=self.fingerprint.canary(),
                    store_fingerprint=info.fingerprint,
                    our_fingerprint=self.fingerprint.key,
                )
            self.refused = True
            return True
        if self.info is None or info.instance_id != self.info.instance_id:
            self._known.clear()
            self._ready.clear()
            self._log.info(
                "kv store in use", store=info.name, instance=info.instance_id, slots=info.num_slots
            )
        self.info = info
        return True

    async def _call(self, what: str, rpc: Awaitable[T]) -> T | None:
        """Await a store RPC; on failure: a log line, a counter, back-off, and None."""
        try:
            out = await rpc
        except TrellisError as e:
            self.stats.errors += 1
            if not self._failing:
                self._log.warning("kv store call failed; recomputing instead", call=what, error=str(e))
            self._failing = True
            self._down_until = time.monotonic() + BACKOFF_S
            self._ensure_reconnect()
            return None
        if self._failing:
            self._failing = False
            self._log.info("kv store reachable again", call=what)
        return out

    def _ensure_reconnect(self) -> None:
        """One task that reads Info every BACKOFF_S until the store answers (a restarted store
        comes back with a new instance and slab: the agent must see it before using it)."""
        if self._closed or (self._reconnect is not None and not self._reconnect.done()):
            return
        self._reconnect = asyncio.create_task(self._reconnect_loop())

    async def _reconnect_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(BACKOFF_S)
            if await self._refresh_info():
                return

    def _remember(self, name: int) -> None:
        self._known[name] = None
        self._known.move_to_end(name)
        if len(self._known) > KNOWN_LIMIT:
            self._known.popitem(last=False)
