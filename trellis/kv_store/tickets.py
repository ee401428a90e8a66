"""Open leases and open puts: things handed to a client that expire at a deadline.

An id is ``{instance_id}.{kind}{n}``: unique within the process, and telling a ticket of another
instance (a restarted store) from an unknown one. Invariant: an entry is in the table from `add`
until it is `pop`ped (released, committed, aborted) or returned by `take_expired(now)` for a `now`
past its deadline (never before); the store then frees what it held, exactly once.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class Entry(Generic[T]):
    value: T
    expires_at: float


class Tickets(Generic[T]):
    def __init__(self, instance_id: str, kind: str) -> None:
        self.instance_id = instance_id
        self._prefix = f"{instance_id}.{kind}"
        self._ids = itertools.count(1)
        self._open: dict[str, Entry[T]] = {}
        self._deadlines: list[tuple[float, str]] = []  # a heap; stale pairs are skipped

    def __len__(self) -> int:
        return len(self._open)

    def __contains__(self, ticket_id: str) -> bool:
        return ticket_id in self._open

    def add(self, value: T, expires_at: float) -> str:
        ticket_id = f"{self._prefix}{next(self._ids)}"
        self._open[ticket_id] = Entry(value, expires_at)
        heapq.heappush(self._deadlines, (expires_at, ticket_id))
        return ticket_id

    def get(self, ticket_id: str) -> Entry[T] | None:
        return self._open.get(ticket_id)

    def pop(self, ticket_id: str) -> Entry[T] | None:
        return self._open.pop(ticket_id, None)

    def is_foreign(self, ticket_id: str) -> bool:
        """A ticket shaped like ours but of another instance (the store restarted since)."""
        return "." in ticket_id and not ticket_id.startswith(f"{self.instance_id}.")

    def take_expired(self, now: float) -> list[tuple[str, Entry[T]]]:
        """Remove and return the entries whose deadline is before `now`."""
        out = []
        while self._deadlines and self._deadlines[0][0] < now:
            _, ticket_id = heapq.heappop(self._deadlines)
            entry = self._open.pop(ticket_id, None)
            if entry is not None:
                out.append((ticket_id, entry))
        if len(self._deadlines) > 4 * len(self._open) + 64:  # drop the stale pairs now and then
            self._deadlines = [(e.expires_at, i) for i, e in self._open.items()]
            heapq.heapify(self._deadlines)
        return out

    def values(self) -> list[T]:
        return [e.value for e in self._open.values()]
