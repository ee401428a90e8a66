"""The Redis registry: several hosts share membership (by leases), replica load, the KV block index and
the P/D transfer records.

Keys, all under ``{namespace}:`` so several meshes (or tests) can share one redis-server:

- ``member:{replica}:{stage}``  the member's JSON record; a lease: claimed with SET NX PX, renewed by
  this instance's heartbeat only while the record still carries its instance id, deleted on a
  clean shutdown, gone by itself TTL after the process dies.
- ``members``                   the set of member slots, so readers need no keyspace scan.
- ``load:{replica}``            the replica's last load (JSON), with a TTL; ``loads`` indexes them.
- ``blocks:{location}``         the block hashes a location holds, as decimal strings. The index is
  stored inverted (per location, not per hash) so a location's entries are one key that expires
  with the lease of the process that added them, and adding a batch of blocks is one command.
  ``block_locations`` indexes them.
- ``transfer:{transfer_id}``    a P/D hand-off in flight (JSON), with PX = its timeout, never renewed:
  no record outlives its lease. ``transfers`` indexes them (it expires with its longest record).

Every read-modify step runs as one Lua script, so it is atomic; index entries whose key expired are
swept by the readers inside the same scripts. Values are JSON; nothing is pickled.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis import exceptions as redis_errors

from trellis.core import log
from trellis.registry import redis_scripts as scripts
from trellis.registry.base import (
    InvalidRecordError,
    LeaseConflictError,
    LeaseLostCallback,
    Member,
    RegistryError,
    RegistryUnavailableError,
    ReplicaLoad,
    ReplicaView,
    TransferRecord,
    checked_hashes,
    checked_location,
    checked_ttl,
    complete_replicas,
)

logger = log.get()

NAMESPACE_PATTERN = re.compile(r"[A-Za-z0-9_.\-]+")
_CLOSE_WAIT_S = 6.0  # longer than one redis call may take (socket timeout 5 s)


@dataclass
class _Lease:
    member: Member
    ttl_ms: int
    on_lost: LeaseLostCallback | None
    lost: bool = False


class RedisRegistry:
    """Registry on a redis-server; see the module doc for the key layout."""

    def __init__(
        self, url: str, *, namespace: str = "trellis", load_ttl_s: float = 10.0, block_ttl_s: float = 10.0
    ) -> None:
        if not NAMESPACE_PATTERN.fullmatch(namespace):
            raise RegistryError(
                f"registry namespace: expected letters, digits, '_', '.' or '-', got {namespace!r}"
            )
        for name, ttl in (("load_ttl_s", load_ttl_s), ("block_ttl_s", block_ttl_s)):
            if not ttl > 0:
                raise RegistryError(f"registry {name}: must be > 0, got {ttl!r}")
        try:
            self._redis = aioredis.from_url(
                url, decode_responses=True, socket_connect_timeout=5, socket_timeout=5
            )
        except ValueError as e:
            raise RegistryError(f"registry: bad redis URL {url!r} ({e})") from None
        kw = self._redis.connection_pool.connection_kwargs
        self._where = f"redis://{kw.get('host')}:{kw.get('port')}/{kw.get('db', 0)}"  # no password
        self._ns = namespace
        self._load_ttl_ms = _ms(load_ttl_s)
        self._block_ttl_ms = _ms(block_ttl_s)
        self._claim = self._redis.register_script(scripts.CLAIM)
        self._renew = self._redis.register_script(scripts.RENEW)
        self._release = self._redis.register_script(scripts.RELEASE)
        self._sweep = self._redis.register_script(scripts.SWEEP)
        self._lookup = self._redis.register_script(scripts.LOOKUP)
        self._leading_runs = self._redis.register_script(scripts.LEADING_RUNS)
        self._open_transfer = self._redis.register_script(scripts.OPEN_TRANSFER)
        self._leases: dict[str, _Lease] = {}  # slot -> lease this instance holds
        self._locations: set[str] = set()  # block-index locations this instance keeps alive
        self._transfers: set[str] = set()  # transfer records this instance opened and has not closed
        self._heartbeat: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()  # a new lease may need a shorter heartbeat period; or closing
        self._closing = False

    def _key(self, *parts: str) -> str:
        return ":".join((self._ns, *parts))

    def _check_open(self) -> None:
        if self._closing:
            raise RegistryError(f"registry {self._where}: already closed")

    @contextlib.contextmanager
    def _talking(self, what: str) -> Iterator[None]:
        """Turn redis-py's exceptions into one-line registry errors."""
        try:
            yield
        except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as e:
            raise RegistryUnavailableError(f"registry {self._where}: cannot {what}: {e}") from None
        except redis_errors.RedisError as e:
            raise RegistryError(f"registry {self._where}: cannot {what}: {e}") from None

    # ---- membership ----------------------------------------------------------------------------

    async def register(
        self, member: Member, ttl_s: float, on_lease_lost: LeaseLostCallback | None = None
    ) -> None:
        if not ttl_s > 0:
            raise InvalidRecordError(f"register {member.slot}: ttl_s must be > 0, got {ttl_s!r}")
        self._check_open()
        lease = _Lease(member, _ms(ttl_s), on_lease_lost)
        with self._talking(f"register {member.slot}"):
            claimed = await self._claim_lease(lease)
        if not claimed:
            holder = await self._holder(member.slot)
            raise LeaseConflictError(f"registry: slot {member.slot} is held by instance {holder}")
        self._leases[member.slot] = lease
        self._ensure_heartbeat()
        logger.info("registry lease claimed", slot=member.slot, instance_id=member.instance_id, ttl_s=ttl_s)

    async def _claim_lease(self, lease: _Lease) -> bool:
        m = lease.member
        keys = [self._key("member", m.slot), self._key("members")]
        return bool(await self._claim(keys, [m.to_json(), lease.ttl_ms, m.instance_id, m.slot]))

    async def _holder(self, slot: str) -> str:
        with self._talking(f"read {slot}"):
            raw = await self._redis.get(self._key("member", slot))
        if raw is None:
            return "(none: it just expired)"
        try:
            return Member.from_json(raw).instance_id
        except InvalidRecordError:
            return "(unreadable record)"

    async def deregister(self, member: Member) -> None:
        self._leases.pop(member.slot, None)
        with self._talking(f"deregister {member.slot}"):
            released = await self._release(
                [self._key("member", member.slot), self._key("members")], [member.instance_id, member.slot]
            )
        logger.info(
            "registry lease released" if released else "registry lease was not ours to release",
            slot=member.slot,
            instance_id=member.instance_id,
        )

    async def members(self) -> list[Member]:
        with self._talking("list members"):
            raws = await self._sweep([self._key("members")], [self._key("member", "")])
        out = []
        for raw in raws:
            try:
                out.append(Member.from_json(raw))
            except InvalidRecordError as e:
                logger.warning("registry skips a bad member record", error=str(e))
        return sorted(out, key=lambda m: (m.replica, m.stage))

    async def replicas(self) -> dict[str, ReplicaView]:
        return complete_replicas(await self.members())

    # ---- load ----------------------------------------------------------------------------------

    async def report_load(self, load: ReplicaLoad) -> None:
        with self._talking(f"report the load of {load.replica}"):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.set(self._key("load", load.replica), load.to_json(), px=self._load_ttl_ms)
                pipe.sadd(self._key("loads"), load.replica)
                await pipe.execute()

    async def loads(self) -> dict[str, ReplicaLoad]:
        with self._talking("read loads"):
            raws = await self._sweep([self._key("loads")], [self._key("load", "")])
        out = {}
        for raw in raws:
            try:
                load = ReplicaLoad.from_json(raw)
            except InvalidRecordError as e:
                logger.warning("registry skips a bad load record", error=str(e))
                continue
            out[load.replica] = load
        return out

    # ---- block index ---------------------------------------------------------------------------

    async def add_blocks(self, location: str, hashes: Sequence[int]) -> None:
        location, hashes = checked_location(location), checked_hashes(hashes)
        self._check_open()
        if not hashes:
            return
        self._locations.add(location)
        with self._talking(f"add blocks of {location}"):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.sadd(self._key("blocks", location), *hashes)
                pipe.pexpire(self._key("blocks", location), self._block_ttl_ms)
                pipe.sadd(self._key("block_locations"), location)
                await pipe.execute()
        self._ensure_heartbeat()

    async def remove_blocks(self, location: str, hashes: Sequence[int]) -> None:
        location, hashes = checked_location(location), checked_hashes(hashes)
        if hashes:
            with self._talking(f"remove blocks of {location}"):
                await self._redis.srem(self._key("blocks", location), *hashes)

    async def forget_location(self, location: str) -> None:
        location = checked_location(location)
        self._locations.discard(location)
        with self._talking(f"forget {location}"):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(self._key("blocks", location))
                pipe.srem(self._key("block_locations"), location)
                await pipe.execute()

    async def lookup_blocks(self, hashes: Sequence[int]) -> list[set[str]]:
        hashes = checked_hashes(hashes)
        if not hashes:
            return []
        with self._talking("look up blocks"):
            flat = await self._lookup([self._key("block_locations")], [self._key("blocks", ""), *hashes])
        found: list[set[str]] = [set() for _ in hashes]
        for location, bits in zip(flat[0::2], flat[1::2], strict=True):
            for i, bit in enumerate(bits):
                if bit:
                    found[i].add(location)
        return found

    async def leading_runs(self, hashes: Sequence[int]) -> dict[str, int]:
        """One round trip (EVALSHA of one script; redis-py loads it first if the server lacks it)."""
        hashes = checked_hashes(hashes)
        if not hashes:
            return {}
        with self._talking("look up leading runs"):
            flat = await self._leading_runs(
                [self._key("block_locations")], [self._key("blocks", ""), *hashes]
            )
        return {loc: int(run) for loc, run in zip(flat[0::2], flat[1::2], strict=True)}

    # ---- P/D transfers ---------------------------------------------------------------------------

    async def open_transfer(self, record: TransferRecord, ttl_s: float) -> None:
        ttl_ms = _ms(checked_ttl(f"transfer {record.transfer_id}", ttl_s))
        self._check_open()
        keys = [self._key("transfer", record.transfer_id), self._key("transfers")]
        with self._talking(f"open transfer {record.transfer_id}"):
            await self._open_transfer(keys, [record.to_json(), ttl_ms, record.transfer_id])
        self._transfers.add(record.transfer_id)

    async def close_transfer(self, transfer_id: str) -> None:
        self._transfers.discard(transfer_id)
        with self._talking(f"close transfer {transfer_id}"):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(self._key("transfer", transfer_id))
                pipe.srem(self._key("transfers"), transfer_id)
                await pipe.execute()

    async def transfers(self) -> list[TransferRecord]:
        with self._talking("read transfers"):
            raws = await self._sweep([self._key("transfers")], [self._key("transfer", "")])
        out = []
        for raw in raws:
            try:
                out.append(TransferRecord.from_json(raw))
            except InvalidRecordError as e:
                logger.warning("registry skips a bad transfer record", error=str(e))
        return sorted(out, key=lambda r: r.transfer_id)

    # ---- heartbeat -----------------------------------------------------------------------------

    def _ensure_heartbeat(self) -> None:
        self._wake.set()
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = asyncio.create_task(self._beat(), name=f"registry-heartbeat-{self._ns}")

    def _period_s(self) -> float:
        ttls = [lease.ttl_ms for lease in self._leases.values()]
        if self._locations:
            ttls.append(self._block_ttl_ms)
        return min(ttls, default=self._block_ttl_ms) / 3000  # three tries before a lease runs out

    async def _beat(self) -> None:
        while not self._closing and (self._leases or self._locations):
            self._wake.clear()
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that races a wake-up.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._period_s()):
                    await self._wake.wait()
            if self._closing:
                return
            try:
                await self._renew_all()
            except Exception as e:  # the heartbeat must outlive a redis outage; the lease may still hold
                logger.warning("registry heartbeat failed", error=str(e), where=self._where)

    async def _renew_all(self) -> None:
        leases = list(self._leases.values())
        async with self._redis.pipeline(transaction=False) as pipe:
            for lease in leases:
                await self._renew(
                    [self._key("member", lease.member.slot)],
                    [lease.member.instance_id, lease.ttl_ms],
                    client=pipe,
                )
            for location in self._locations:
                pipe.pexpire(self._key("blocks", location), self._block_ttl_ms)
            results = await pipe.execute()
        for lease, renewed in zip(leases, results, strict=False):
            if self._leases.get(lease.member.slot) is not lease:
                continue  # deregistered while we were renewing
            if renewed:
                lease.lost = False
            else:
                await self._on_lost(lease)

    async def _on_lost(self, lease: _Lease) -> None:
        """The record is gone or another instance's: say so once, then re-claim it once it is free."""
        m = lease.member
        if not lease.lost:
            lease.lost = True
            logger.warning("registry lease lost", slot=m.slot, instance_id=m.instance_id)
            if lease.on_lost is not None:
                try:
                    lease.on_lost(m)
                except Exception:
                    logger.exception("registry on_lease_lost callback failed", slot=m.slot)
        if await self._claim_lease(lease):
            lease.lost = False
            logger.info("registry lease re-claimed", slot=m.slot, instance_id=m.instance_id)

    # ---- shutdown ------------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop the heartbeat, release this instance's leases and block entries, disconnect."""
        self._closing = True
        self._wake.set()
        if self._heartbeat is not None:
            # Let an in-flight renewal finish rather than cut a redis call in half; cancel if it hangs.
            done, _ = await asyncio.wait([self._heartbeat], timeout=_CLOSE_WAIT_S)
            if not done:
                self._heartbeat.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._heartbeat
            self._heartbeat = None
        try:
            for lease in list(self._leases.values()):
                await self.deregister(lease.member)
            for location in list(self._locations):
                await self.forget_location(location)
            for transfer_id in list(self._transfers):
                await self.close_transfer(transfer_id)
        except RegistryError as e:
            logger.warning("registry close could not release everything; leases will expire", error=str(e))
        self._leases.clear()
        self._locations.clear()
        self._transfers.clear()
        await self._redis.aclose()


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))
