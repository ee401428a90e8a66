"""The embedded registry: one host, no server. Membership comes from the deploy spec; state is in-process.

There are no leases here: whoever holds this registry sees every change, so records never expire
by themselves (loads excepted, which go stale, and transfer records, which go at their TTL).
Registering replaces the slot's record, e.g. a worker that learned its real ports; deregistering
removes it (the router does this for a replica it finds dead).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence

from trellis.core import log
from trellis.core.spec import DeploySpec
from trellis.registry.base import (
    LeaseLostCallback,
    Member,
    ReplicaLoad,
    ReplicaView,
    TransferRecord,
    checked_hashes,
    checked_location,
    checked_ttl,
    complete_replicas,
)

logger = log.get()

SPEC_INSTANCE_ID = "spec"  # the instance id of members read from the spec, not announced by a process


def members_from_spec(spec: DeploySpec) -> list[Member]:
    """One member per stage of every replica in the spec, addressed by the spec's hosts and ports."""
    out = []
    for rep in spec.replicas:
        for j, st in enumerate(rep.stages):
            out.append(
                Member(
                    replica=rep.name,
                    stage=j,
                    num_stages=len(rep.stages),
                    grpc_address=f"{st.host}:{st.port}",
                    ucx_address=f"{st.host}:{st.ucx_port}",
                    layers=st.layers,
                    tp=st.tp,
                    role=rep.role,
                    instance_id=SPEC_INSTANCE_ID,
                )
            )
    return out


class EmbeddedRegistry:
    """In-process registry; see the module doc for how it differs from the Redis one."""

    def __init__(self, spec: DeploySpec | None = None, *, load_ttl_s: float = 10.0) -> None:
        self._load_ttl_s = load_ttl_s
        self._members: dict[str, Member] = {m.slot: m for m in members_from_spec(spec)} if spec else {}
        self._loads: dict[str, tuple[float, ReplicaLoad]] = {}  # replica -> (monotonic time, load)
        self._holders: dict[int, set[str]] = {}  # block hash -> locations
        self._held: dict[str, set[int]] = {}  # location -> block hashes
        self._transfers: dict[str, tuple[float, TransferRecord]] = {}  # id -> (monotonic expiry, record)

    # ---- membership ----------------------------------------------------------------------------

    async def register(
        self, member: Member, ttl_s: float, on_lease_lost: LeaseLostCallback | None = None
    ) -> None:
        # ttl_s and on_lease_lost have no meaning in-process: a lease here is never lost.
        self._members[member.slot] = member
        logger.debug("registry member registered", slot=member.slot, instance_id=member.instance_id)

    async def deregister(self, member: Member) -> None:
        current = self._members.get(member.slot)
        if current is not None and current.instance_id == member.instance_id:
            del self._members[member.slot]
            logger.debug("registry member deregistered", slot=member.slot)

    async def members(self) -> list[Member]:
        return sorted(self._members.values(), key=lambda m: (m.replica, m.stage))

    async def replicas(self) -> dict[str, ReplicaView]:
        return complete_replicas(self._members.values())

    # ---- load ----------------------------------------------------------------------------------

    async def report_load(self, load: ReplicaLoad) -> None:
        self._loads[load.replica] = (time.monotonic(), load)

    async def loads(self) -> dict[str, ReplicaLoad]:
        oldest = time.monotonic() - self._load_ttl_s
        for name in [n for n, (t, _) in self._loads.items() if t < oldest]:
            del self._loads[name]
        return {name: load for name, (_, load) in self._loads.items()}

    # ---- P/D transfers ---------------------------------------------------------------------------

    async def open_transfer(self, record: TransferRecord, ttl_s: float) -> None:
        ttl_s = checked_ttl(f"transfer {record.transfer_id}", ttl_s)
        self._transfers[record.transfer_id] = (time.monotonic() + ttl_s, record)

    async def close_transfer(self, transfer_id: str) -> None:
        self._transfers.pop(transfer_id, None)

    async def transfers(self) -> list[TransferRecord]:
        now = time.monotonic()
        for tid in [t for t, (expiry, _) in self._transfers.items() if expiry <= now]:
            del self._transfers[tid]  # past its lease: as on Redis, it is gone
        return [rec for _, (_, rec) in sorted(self._transfers.items())]

    # ---- block index ---------------------------------------------------------------------------

    async def add_blocks(self, location: str, hashes: Sequence[int]) -> None:
        location, hashes = checked_location(location), checked_hashes(hashes)
        self._held.setdefault(location, set()).update(hashes)
        for h in hashes:
            self._holders.setdefault(h, set()).add(location)

    async def remove_blocks(self, location: str, hashes: Sequence[int]) -> None:
        location, hashes = checked_location(location), checked_hashes(hashes)
        held = self._held.get(location, set())
        for h in hashes:
            held.discard(h)
            self._drop_holder(h, location)

    async def forget_location(self, location: str) -> None:
        for h in self._held.pop(checked_location(location), set()):
            self._drop_holder(h, location)

    async def lookup_blocks(self, hashes: Sequence[int]) -> list[set[str]]:
        return [set(self._holders.get(h, ())) for h in checked_hashes(hashes)]

    async def leading_runs(self, hashes: Sequence[int]) -> dict[str, int]:
        hashes = checked_hashes(hashes)
        if not hashes:
            return {}
        # Only a holder of the first block can have a run. Whole slices are checked at C speed; the
        # first slice with a miss is scanned for it.
        return {loc: _leading_run(self._held[loc], hashes) for loc in self._holders.get(hashes[0], ())}

    def _drop_holder(self, block_hash: int, location: str) -> None:
        holders = self._holders.get(block_hash)
        if holders is not None:
            holders.discard(location)
            if not holders:
                del self._holders[block_hash]

    async def close(self) -> None:
        self._loads.clear()
        self._transfers.clear()
        self._holders.clear()
        self._held.clear()


def _leading_run(held: set[int], hashes: list[int], step: int = 32) -> int:
    for start in range(0, len(hashes), step):
        part = hashes[start : start + step]
        if not held.issuperset(part):
            return start + sum(1 for _ in itertools.takewhile(held.__contains__, part))
    return len(hashes)
