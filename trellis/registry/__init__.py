"""Global state of the mesh (membership, replica load, KV block index, P/D transfers): embedded or on
Redis."""

from __future__ import annotations

from trellis.core.spec import DeploySpec
from trellis.registry.base import (
    InvalidRecordError,
    LeaseConflictError,
    LeaseLostCallback,
    Member,
    Registry,
    RegistryError,
    RegistryUnavailableError,
    ReplicaLoad,
    ReplicaView,
    TransferRecord,
    complete_replicas,
)
from trellis.registry.block_publisher import BlockPublisher
from trellis.registry.embedded import EmbeddedRegistry, members_from_spec
from trellis.registry.locations import Location, parse_location, replica_location, store_location
from trellis.registry.redis_registry import RedisRegistry

__all__ = [
    "BlockPublisher",
    "EmbeddedRegistry",
    "InvalidRecordError",
    "LeaseConflictError",
    "LeaseLostCallback",
    "Location",
    "Member",
    "RedisRegistry",
    "Registry",
    "RegistryError",
    "RegistryUnavailableError",
    "ReplicaLoad",
    "ReplicaView",
    "TransferRecord",
    "complete_replicas",
    "members_from_spec",
    "open_registry",
    "parse_location",
    "replica_location",
    "store_location",
]


def open_registry(
    url_or_embedded: str,
    spec: DeploySpec | None,
    namespace: str = "trellis",
    *,
    load_ttl_s: float = 10.0,
    block_ttl_s: float = 10.0,
) -> Registry:
    """The registry a spec names: "embedded" (membership from spec) or redis://HOST:PORT/DB.

    Nothing connects yet: a Redis registry reaches its server on first use, and raises
    RegistryUnavailableError there if it cannot.
    """
    if url_or_embedded == "embedded":
        return EmbeddedRegistry(spec, load_ttl_s=load_ttl_s)
    if url_or_embedded.startswith("redis://"):
        return RedisRegistry(
            url_or_embedded, namespace=namespace, load_ttl_s=load_ttl_s, block_ttl_s=block_ttl_s
        )
    raise RegistryError(f"registry: expected 'embedded' or redis://HOST:PORT/DB, got {url_or_embedded!r}")
