"""Replica choice: which healthy replica a request goes to.

A policy is a function of the healthy replicas (never empty) and the request's prompt ids, so a
KV-aware policy (prefer the replica that holds the prompt's prefix blocks, trellis/routing/kv_aware.py)
can replace least-load without touching the router. A policy may be a plain function or a coroutine
function (its answer is awaited): it must always answer one of the replicas it was given (or, the
P/D wrapper trellis/routing/pd_policy.py, a prefill/decode Pair of them).
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import Protocol, TypeVar


class Candidate(Protocol):
    """What a policy may look at of a replica."""

    @property
    def name(self) -> str: ...

    @property
    def load(self) -> int:
        """Requests this router has in flight there plus what the replica reports queued."""
        ...


C = TypeVar("C", bound=Candidate)


class ReplicaPolicy(Protocol):
    def __call__(self, replicas: Sequence[C], prompt_ids: Sequence[int]) -> C | Awaitable[C]: ...


def least_load(replicas: Sequence[C], prompt_ids: Sequence[int]) -> C:
    """The replica with the least load; ties go to the first name, so the choice is deterministic."""
    return min(replicas, key=lambda r: (r.load, r.name))
