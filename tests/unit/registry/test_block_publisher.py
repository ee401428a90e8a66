"""BlockPublisher: batching (at most one flush per flush_s), coalescing, failures logged not raised."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence

import pytest
from structlog.testing import capture_logs

from trellis.registry import BlockPublisher, EmbeddedRegistry, RegistryUnavailableError


class RecordingRegistry(EmbeddedRegistry):
    """An embedded registry that records its block calls and can be made to fail."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, float, frozenset[int]]] = []
        self.failing = False
        self.forgotten: list[str] = []

    def _note(self, what: str, hashes: Sequence[int]) -> None:
        if self.failing:
            raise RegistryUnavailableError("registry redis://x: cannot add blocks: down")
        self.calls.append((what, asyncio.get_running_loop().time(), frozenset(hashes)))

    async def add_blocks(self, location: str, hashes: Sequence[int]) -> None:
        self._note("add", hashes)
        await super().add_blocks(location, hashes)

    async def remove_blocks(self, location: str, hashes: Sequence[int]) -> None:
        self._note("remove", hashes)
        await super().remove_blocks(location, hashes)

    async def forget_location(self, location: str) -> None:
        self.forgotten.append(location)
        await super().forget_location(location)


def test_batches_at_most_one_flush_per_interval() -> None:
    async def main() -> None:
        reg = RecordingRegistry()
        pub = BlockPublisher(reg, "r1@a", flush_s=0.05)
        pub.start()
        start = asyncio.get_running_loop().time()
        for i in range(40):  # 200 ms of changes, one every 5 ms
            pub.added([i])
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.12)
        adds = [t for what, t, _ in reg.calls if what == "add"]
        assert 3 <= len(adds) <= 6, adds  # not 40
        gaps = [b - a for a, b in itertools.pairwise(adds)]
        assert all(g >= 0.045 for g in gaps), gaps
        assert adds[0] - start < 0.02  # the first change after a quiet spell goes at once
        assert await reg.leading_runs(list(range(40))) == {"r1@a": 40}
        assert pub.pending == 0 and pub.flushes == len(adds)
        await pub.close()
        assert reg.forgotten == ["r1@a"]
        assert await reg.leading_runs([0]) == {}

    asyncio.run(main())


def test_add_then_remove_coalesce() -> None:
    async def main() -> None:
        reg = RecordingRegistry()
        pub = BlockPublisher(reg, "r1@a", flush_s=10.0)  # flushed by hand
        pub.added([1, 2, 3])
        await pub.flush()
        pub.added([4, 5])
        pub.removed([5, 1])  # 5: never published; 1: published, so removed
        pub.removed([2])
        pub.added([2])  # removed then back: nothing to send
        assert pub.pending == 2
        await pub.flush()
        assert [(w, set(h)) for w, _, h in reg.calls] == [
            ("add", {1, 2, 3}),
            ("remove", {1}),
            ("add", {4}),
        ]
        assert await reg.leading_runs([2, 3, 4]) == {"r1@a": 3}
        await pub.flush()  # nothing pending: no call
        assert len(reg.calls) == 3
        await pub.close()

    asyncio.run(main())


def test_failures_are_logged_once_and_never_raised() -> None:
    async def main() -> None:
        reg = RecordingRegistry()
        pub = BlockPublisher(reg, "r1@a", flush_s=0.01)
        pub.start()
        reg.failing = True
        for i in range(5):
            pub.added([i])  # never raises
            await asyncio.sleep(0.03)
        assert pub.dropped_batches == 5
        reg.failing = False
        pub.added([99])
        await asyncio.sleep(0.03)
        assert pub.flushes == 1
        assert await reg.leading_runs([99]) == {"r1@a": 1}
        await pub.close()

    with capture_logs() as logs:
        asyncio.run(main())
    events = [e["event"] for e in logs]
    assert events.count("block index updates failing; dropping them") == 1
    assert events.count("block index updates recovered") == 1


def test_close_survives_a_registry_that_is_down() -> None:
    class Down(RecordingRegistry):
        async def forget_location(self, location: str) -> None:
            raise RegistryUnavailableError("down")

    async def main() -> None:
        pub = BlockPublisher(Down(), "r1@a")
        pub.start()
        await pub.close()

    with capture_logs() as logs:
        asyncio.run(main())
    assert [e["event"] for e in logs] == ["block index: cannot forget the location"]
    with pytest.raises(ValueError):
        BlockPublisher(EmbeddedRegistry(), "x", flush_s=0)
