"""What the router has just sent where: decisions that count as "that replica holds the prefix" a while.

The block index lags a decision by the head's prefill plus the publisher's flush (tens of ms to
seconds); without this, a burst of requests with one new prefix would each see nobody holding it
and be spread over every replica, each recomputing it. A decision records the prompt's block names
for the chosen replica; they count as held there for ``ttl_s``.

Invariants:
- along any prompt's chain of names, the names a replica holds here are a prefix of the chain: a
  record covers a whole prompt from its first block, and records leave in the order they came (by
  expiry, or oldest first past ``max_hashes``), each stamped with a strictly increasing expiry, so
  the run of a prompt is found by binary search (O(log n) lookups, not n);
- memory is bounded: at most about ``max_hashes`` names are kept, over all replicas.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

DEFAULT_MAX_HASHES = 1 << 18


class SpeculativeHolds:
    def __init__(
        self, ttl_s: float, clock: Callable[[], float], max_hashes: int = DEFAULT_MAX_HASHES
    ) -> None:
        if not ttl_s > 0:
            raise ValueError(f"speculative ttl_s: must be > 0, got {ttl_s!r}")
        self.ttl_s = ttl_s
        self.clock = clock
        self.max_hashes = max_hashes
        self._held: dict[str, dict[int, float]] = {}  # replica -> name -> the expiry that set it
        self._records: deque[tuple[float, str, tuple[int, ...]]] = deque()  # oldest first
        self._size = 0  # names over all records
        self._last = float("-inf")

    def __len__(self) -> int:
        return sum(len(d) for d in self._held.values())

    def record(self, replica: str, hashes: Sequence[int]) -> None:
        """Count ``hashes`` (one prompt's names, from its first block) as held by replica for ttl_s."""
        if not hashes:
            return
        expiry = max(self.clock() + self.ttl_s, self._last + 1e-9)  # strictly increasing stamps
        self._last = expiry
        names = tuple(hashes)
        self._held.setdefault(replica, {}).update(dict.fromkeys(names, expiry))
        self._records.append((expiry, replica, names))
        self._size += len(names)
        while self._size > self.max_hashes and len(self._records) > 1:
            self._drop_oldest()

    def expire(self) -> None:
        """Forget the records whose time is up."""
        now = self.clock()
        while self._records and self._records[0][0] <= now:
            self._drop_oldest()

    def run(self, replica: str, hashes: Sequence[int]) -> int:
        """How many of ``hashes``, from the first, count as held by replica (call expire() first)."""
        held = self._held.get(replica)
        if not held or not hashes or hashes[0] not in held:
            return 0
        lo, hi = 1, len(hashes)  # hashes[lo - 1] is held; find the largest such lo
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if hashes[mid - 1] in held:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _drop_oldest(self) -> None:
        expiry, replica, names = self._records.popleft()
        self._size -= len(names)
        held = self._held.get(replica)
        if held is None:
            return
        for h in names:
            if held.get(h) == expiry:  # not renewed by a later record
                del held[h]
        if not held:
            del self._held[replica]
