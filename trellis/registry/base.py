"""The registry's interface and records: who is in the mesh, how busy each replica is, who holds which
block, which P/D hand-offs are in flight.

Two back ends implement `Registry`: embedded (in-process, membership from the deploy spec) and Redis
(several hosts, membership by leases). Records cross process boundaries as JSON, never pickle.
"""

from __future__ import annotations

import itertools
import json
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol

from trellis.core.spec import ROLES


class RegistryError(Exception):
    """Base class of registry errors; the message is one line naming the problem."""


class InvalidRecordError(RegistryError):
    """Bad values in a record (member, load), in a record read back, or in a call's arguments."""


class LeaseConflictError(RegistryError):
    """The member's slot (replica, stage) is held by another live instance."""


class RegistryUnavailableError(RegistryError):
    """The registry's server cannot be reached."""


@dataclass(frozen=True)
class Member:
    """One stage leader of one replica, as it announces itself."""

    replica: str
    stage: int  # index in the replica's chain of stages, 0 = head
    num_stages: int  # length of the chain, so a reader can tell when a replica is complete
    grpc_address: str  # host:port of the stage's control API
    ucx_address: str  # host:port of the stage's UCX listener (rank 0)
    layers: tuple[int, int]  # [start, end)
    tp: int = 1
    role: str = "both"
    instance_id: str = field(default_factory=lambda: uuid.uuid4().hex)  # one per process start

    def __post_init__(self) -> None:
        if isinstance(self.layers, list):  # as JSON (or YAML) gives it
            object.__setattr__(self, "layers", tuple(self.layers))
        problem = self._problem()
        if problem:
            raise InvalidRecordError(f"member {self.replica!r} stage {self.stage!r}: {problem}")

    def _problem(self) -> str | None:
        ints = {"stage": self.stage, "num_stages": self.num_stages, "tp": self.tp}
        for name, value in ints.items():
            if type(value) is not int:
                return f"{name} must be an integer, got {value!r}"
        strings = {
            "replica": self.replica,
            "grpc_address": self.grpc_address,
            "ucx_address": self.ucx_address,
            "instance_id": self.instance_id,
        }
        for name, value in strings.items():
            if not isinstance(value, str) or not value:
                return f"{name} must be a non-empty string, got {value!r}"
        if not 0 <= self.stage < self.num_stages:
            return f"stage must be in [0, num_stages={self.num_stages}), got {self.stage}"
        if self.tp < 1:
            return f"tp must be >= 1, got {self.tp}"
        lay = self.layers
        if not (
            isinstance(lay, tuple)
            and len(lay) == 2
            and all(type(x) is int for x in lay)
            and 0 <= lay[0] < lay[1]
        ):
            return f"layers must be [start, end) with 0 <= start < end, got {lay!r}"
        if self.role not in ROLES:
            return f"role must be one of {', '.join(ROLES)}, got {self.role!r}"
        return None

    @property
    def slot(self) -> str:
        """The name of the place this member fills; at most one live instance holds it."""
        return f"{self.replica}:{self.stage}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Member:
        try:
            return cls(**_known_fields(cls, _json_object("member", text)))
        except TypeError as e:
            raise InvalidRecordError(f"member record: {e}") from None


@dataclass(frozen=True)
class ReplicaLoad:
    """How busy a replica is, as last observed (by the router, or the replica itself)."""

    replica: str
    outstanding: int = 0  # requests sent and not finished
    running: int = 0  # sequences in the running batch
    waiting: int = 0  # sequences queued at the head's scheduler
    free_blocks: int = 0  # free KV-cache blocks
    timestamp: float = field(default_factory=time.time)  # wall clock of the observation

    def __post_init__(self) -> None:
        if not isinstance(self.replica, str) or not self.replica:
            raise InvalidRecordError(f"load: replica must be a non-empty string, got {self.replica!r}")
        for name in ("outstanding", "running", "waiting", "free_blocks"):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise InvalidRecordError(
                    f"load of {self.replica!r}: {name} must be an integer >= 0, got {value!r}"
                )
        if isinstance(self.timestamp, bool) or not isinstance(self.timestamp, int | float):
            raise InvalidRecordError(
                f"load of {self.replica!r}: timestamp must be a number, got {self.timestamp!r}"
            )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ReplicaLoad:
        try:
            return cls(**_known_fields(cls, _json_object("load", text)))
        except TypeError as e:
            raise InvalidRecordError(f"load record: {e}") from None


@dataclass(frozen=True)
class TransferRecord:
    """One P/D hand-off in flight (trellis/core/handoff_api.py): the router that opened it, the
    prefill and decode replicas, its deadline. Kept under a lease of the hand-off's timeout, so a
    record whose router died goes by itself; a later epoch of the same transfer replaces it."""

    transfer_id: str
    epoch: int
    prefill: str  # replica names
    decode: str
    deadline: float  # wall clock (unix seconds): past it, both sides have abandoned the transfer
    opened_by: str  # the router instance that opened it

    def __post_init__(self) -> None:
        for name in ("transfer_id", "prefill", "decode", "opened_by"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise InvalidRecordError(f"transfer: {name} must be a non-empty string, got {value!r}")
        if type(self.epoch) is not int or self.epoch < 1:
            raise InvalidRecordError(
                f"transfer {self.transfer_id}: epoch must be an integer >= 1, got {self.epoch!r}"
            )
        if isinstance(self.deadline, bool) or not isinstance(self.deadline, int | float):
            raise InvalidRecordError(
                f"transfer {self.transfer_id}: deadline must be a number, got {self.deadline!r}"
            )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TransferRecord:
        try:
            return cls(**_known_fields(cls, _json_object("transfer", text)))
        except TypeError as e:
            raise InvalidRecordError(f"transfer record: {e}") from None


@dataclass(frozen=True)
class ReplicaView:
    """A complete replica: every stage of its chain present, layers tiling [0, num_layers) in order."""

    name: str
    role: str
    stages: tuple[Member, ...]  # ordered by stage index

    @property
    def head(self) -> Member:
        return self.stages[0]

    @property
    def num_layers(self) -> int:
        return self.stages[-1].layers[1]


def complete_replicas(members: Iterable[Member]) -> dict[str, ReplicaView]:
    """Group members by replica and keep the replicas whose chain is whole and consistent."""
    by_replica: dict[str, list[Member]] = {}
    for m in members:
        by_replica.setdefault(m.replica, []).append(m)
    views = {}
    for name, group in by_replica.items():
        group.sort(key=lambda m: m.stage)
        if _is_whole_chain(group):
            views[name] = ReplicaView(name=name, role=group[0].role, stages=tuple(group))
    return views


def _is_whole_chain(group: list[Member]) -> bool:
    n = group[0].num_stages
    if len(group) != n or [m.stage for m in group] != list(range(n)):
        return False
    if any(m.num_stages != n or m.role != group[0].role for m in group):
        return False  # records from two different deployments of the same name
    if group[0].layers[0] != 0:
        return False
    return all(a.layers[1] == b.layers[0] for a, b in itertools.pairwise(group))


def _json_object(what: str, text: str) -> dict[str, Any]:
    try:
        raw = json.loads(text)
    except (json.JSONDecodeError, TypeError) as e:
        raise InvalidRecordError(f"{what} record: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise InvalidRecordError(f"{what} record: expected a JSON object, got {type(raw).__name__}")
    return raw


def _known_fields(cls: type, raw: dict[str, Any]) -> dict[str, Any]:
    # Fields added by a newer writer are ignored, so readers and writers can be upgraded one by one.
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in raw.items() if k in names}


def checked_location(location: str) -> str:
    if not isinstance(location, str) or not location:
        raise InvalidRecordError(f"block index: location must be a non-empty string, got {location!r}")
    return location


def checked_ttl(what: str, ttl_s: float) -> float:
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, int | float) or not ttl_s > 0:
        raise InvalidRecordError(f"{what}: ttl_s must be > 0, got {ttl_s!r}")
    return float(ttl_s)


def checked_hashes(hashes: Sequence[int]) -> list[int]:
    out = list(hashes)
    for h in out:
        if type(h) is not int:
            raise InvalidRecordError(f"block index: block hashes must be integers, got {h!r}")
    return out


LeaseLostCallback = Callable[[Member], None]


class Registry(Protocol):
    """Global state shared by the router, the stage workers and the KV store.

    A *location* in the block index names one copy's holder (trellis.registry.locations: a replica
    instance, or a KV store instance's tier). Block hashes are the chained hashes of full KV blocks
    (one definition shared by every service).
    """

    async def register(
        self, member: Member, ttl_s: float, on_lease_lost: LeaseLostCallback | None = None
    ) -> None:
        """Announce a member. With leases (Redis), claim its slot and keep it alive every ttl_s / 3
        until deregister/close; on_lease_lost runs (in the event loop) if the lease is lost."""
        ...

    async def deregister(self, member: Member) -> None:
        """Withdraw a member (only if this instance still holds its slot)."""
        ...

    async def members(self) -> list[Member]:
        """Every live member."""
        ...

    async def replicas(self) -> dict[str, ReplicaView]:
        """The complete replicas (every stage alive), by name."""
        ...

    async def report_load(self, load: ReplicaLoad) -> None:
        """Record a replica's load; it is forgotten if not reported again within the load TTL."""
        ...

    async def loads(self) -> dict[str, ReplicaLoad]:
        """The latest fresh load of each replica, by name."""
        ...

    async def add_blocks(self, location: str, hashes: Sequence[int]) -> None:
        """Record that location holds these blocks (kept alive by this instance until close)."""
        ...

    async def remove_blocks(self, location: str, hashes: Sequence[int]) -> None:
        """Record that location no longer holds these blocks."""
        ...

    async def forget_location(self, location: str) -> None:
        """Drop every block entry of a location (e.g. a replica found dead)."""
        ...

    async def lookup_blocks(self, hashes: Sequence[int]) -> list[set[str]]:
        """For each hash, the set of live locations holding that block."""
        ...

    async def leading_runs(self, hashes: Sequence[int]) -> dict[str, int]:
        """For each live location, how many of ``hashes`` it holds from the start, up to its first
        miss (the block names of one prompt, in order). Locations with a run of 0 are left out."""
        ...

    async def open_transfer(self, record: TransferRecord, ttl_s: float) -> None:
        """Record a P/D hand-off in flight for ttl_s (never renewed: its lease is its deadline);
        opening the same transfer_id again replaces the record (a new epoch) and its lease."""
        ...

    async def close_transfer(self, transfer_id: str) -> None:
        """Drop a transfer's record (done, whatever the outcome); nothing if it is gone already."""
        ...

    async def transfers(self) -> list[TransferRecord]:
        """The live transfer records (none past its lease), by transfer id."""
        ...

    async def close(self) -> None:
        """Stop heartbeats, release this instance's leases and block entries, close connections."""
        ...
