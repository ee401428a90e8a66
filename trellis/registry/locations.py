"""The names of the block index's locations (docs/kv-plane.md, "Locations in the block index").

One place builds and reads them:
- a replica: ``"{replica}@{instance_id}"``, the instance id of the head process, so a restarted
  replica inherits nothing from its previous life;
- a KV store tier: ``"kv_store:{name}@{instance_id}:{tier}"``, tier ``host`` or ``disk`` (a block on
  both tiers is in both locations).

Instance ids never contain ``@`` or ``:`` (they are uuid hex, or "spec"); names may, so a name is
read as everything before the last ``@``.
"""

from __future__ import annotations

from dataclasses import dataclass

from trellis.registry.base import InvalidRecordError

STORE_PREFIX = "kv_store:"
TIERS = ("host", "disk")


@dataclass(frozen=True)
class Location:
    """A parsed location: a replica's (tier "") or a store tier's."""

    kind: str  # "replica" or "store"
    name: str  # the replica's name, or the store's
    instance_id: str
    tier: str = ""  # "host" or "disk" for a store, "" for a replica

    @property
    def is_store(self) -> bool:
        return self.kind == "store"


def _checked(what: str, value: str, forbidden: str = "") -> str:
    if not isinstance(value, str) or not value or any(c in value for c in forbidden):
        raise InvalidRecordError(f"block index location: bad {what} {value!r}")
    return value


def replica_location(replica: str, instance_id: str) -> str:
    """The location of a replica's head process (its prefix cache)."""
    return f"{_checked('replica name', replica)}@{_checked('instance id', instance_id, '@:')}"


def store_location(name: str, instance_id: str, tier: str) -> str:
    """The location of one tier of a KV store process."""
    if tier not in TIERS:
        raise InvalidRecordError(f"block index location: tier must be one of {TIERS}, got {tier!r}")
    return f"{STORE_PREFIX}{_checked('store name', name)}@{_checked('instance id', instance_id, '@:')}:{tier}"


def parse_location(location: str) -> Location | None:
    """What a location names; None for a string that is neither form (another writer's, or junk)."""
    if location.startswith(STORE_PREFIX):
        rest, _, tier = location[len(STORE_PREFIX) :].rpartition(":")
        name, at, instance = rest.rpartition("@")
        if not (at and name and instance and tier in TIERS):
            return None
        return Location("store", name, instance, tier)
    name, at, instance = location.rpartition("@")
    if not (at and name and instance) or ":" in instance:
        return None
    return Location("replica", name, instance)
