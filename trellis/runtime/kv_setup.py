"""Attach the KV store to a running head: the one place the engine and the stage service do it."""

from __future__ import annotations

from dataclasses import dataclass

from trellis.core import log
from trellis.core.kv_names import KVFingerprint
from trellis.core.spec import KVStoreSpec
from trellis.runtime.head import Head
from trellis.runtime.kv_agent import KVAgent
from trellis.wire.kv_store_client import KVStoreClient


@dataclass(frozen=True)
class StoreUse:
    """How a head uses a store (a spec's kv_store section gives every field)."""

    address: str  # host:port of its gRPC API
    write_through: bool = False  # every block, or only a block on its second use
    lease_ttl_s: float = 30.0
    put_timeout_s: float = 10.0
    rpc_timeout_s: float = 0.5

    @classmethod
    def from_spec(cls, kv: KVStoreSpec) -> StoreUse:
        return cls(
            address=f"{kv.host}:{kv.port}",
            write_through=kv.write_policy == "write-through",
            lease_ttl_s=kv.lease_ttl_s,
            put_timeout_s=kv.put_timeout_s,
            rpc_timeout_s=kv.rpc_timeout_s,
        )


async def attach_store(head: Head, fingerprint: KVFingerprint, use: StoreUse) -> KVAgent:
    """Give ``head`` a KV agent for the store at ``use.address``. The store may be down now: the
    agent then retries in the background and the head recomputes meanwhile."""
    agent = KVAgent(
        KVStoreClient(use.address, use.rpc_timeout_s),
        fingerprint,
        head.scheduler,
        write_through=use.write_through,
        lease_ttl_s=use.lease_ttl_s,
        put_timeout_s=use.put_timeout_s,
        wake=head.wake,
    )
    await agent.start()
    head.kv_agent = agent
    log.get().info("kv store attached", address=use.address, write_through=use.write_through)
    return agent
