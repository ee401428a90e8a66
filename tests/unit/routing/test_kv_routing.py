"""KV-aware routing through the router and the fake stages; HeadQueryLocator on its own."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from structlog.testing import capture_logs

from tests.fake_stages import chunks, collect, mesh
from trellis.core.kv_names import KVFingerprint
from trellis.core.kv_store_api import StoreRun
from trellis.core.sampling import SamplingParams
from trellis.routing.kv_aware import KVAwarePolicy
from trellis.routing.kv_locators import HeadQueryLocator

FP = KVFingerprint("fake", "bfloat16", 2, 16, 2, "theta=1e4", 16)
P = tuple(range(1, 49))  # three full blocks, within the fake limits (64 tokens)
Q = tuple(range(100, 148))
SAMPLING = SamplingParams(max_tokens=4)


class FakeStore:
    def __init__(self, run: StoreRun, delay_s: float = 0.0) -> None:
        self.run, self.delay_s, self.asked = run, delay_s, 0

    async def lookup(self, hashes: Sequence[int]) -> StoreRun:
        self.asked += 1
        await asyncio.sleep(self.delay_s)
        return self.run


async def kv_mesh(store: FakeStore | None = None):  # type: ignore[no-untyped-def]
    m = await mesh(("r1", "r2"))
    for name in ("r1", "r2"):
        m.head(name).fingerprint = FP
        m.head(name).chunks = chunks([5], [6], finish="length")
    locator = HeadQueryLocator(m.replicas, store, deadline_s=0.05)
    m.router.policy = KVAwarePolicy(locator, FP, speculative_ttl_s=2.0)
    return m


async def served_by(m, prompt: tuple[int, ...]) -> str:  # type: ignore[no-untyped-def]
    deltas = await collect(m.router.generate(prompt, SAMPLING))
    assert deltas[-1].finish_reason == "length"
    return deltas[0].replica


def test_router_sends_a_prompt_to_the_replica_that_holds_its_prefix() -> None:
    async def main() -> None:
        m = await kv_mesh()
        m.head("r2").cached.update(FP.block_hashes(P))
        assert await served_by(m, P) == "r2"  # least-load alone would pick r1 (first name)
        assert await served_by(m, Q) == "r1"  # held nowhere: ties go by name
        assert await served_by(m, Q) == "r1"  # now r1 holds it
        assert m.head("r1").match_calls == 3 and m.head("r2").match_calls == 3

        # r2 restarts naming blocks differently: no KV preference for it any more.
        m.head("r2").kv_canary = 987654321
        m.head("r2").up = False
        await m.replicas.refresh()
        await m.replicas.refresh()
        m.head("r2").up = True
        with capture_logs() as logs:
            await m.replicas.refresh()
            assert await served_by(m, P) == "r1"
        assert any(e["event"].startswith("replica names KV blocks differently") for e in logs)
        await m.replicas.close()

    asyncio.run(main())


def test_head_query_locator_asks_heads_and_store_under_one_deadline() -> None:
    async def main() -> None:
        store = FakeStore(StoreRun(host=1, total=2))
        m = await kv_mesh(store)
        m.head("r1").cached.update(FP.block_hashes(P))
        locator = m.router.policy.locator  # type: ignore[attr-defined]
        hashes = FP.block_hashes(P)
        assert await locator.leading_runs(hashes) == {
            "r1@spec": 3,
            "kv_store:kv0@spec:host": 1,
            "kv_store:kv0@spec:disk": 2,
        }
        # A head that fails and a store that is late count as holding nothing, logged once each.
        m.head("r1").up = False
        store.delay_s = 1.0
        with capture_logs() as logs:
            start = asyncio.get_running_loop().time()
            for _ in range(2):
                assert await locator.leading_runs(hashes) == {}
            assert asyncio.get_running_loop().time() - start < 0.5
        warned = sorted(e["source"] for e in logs if e["log_level"] == "warning")
        assert warned == ["kv_store", "replica r1"]
        # Nobody answers: the locator raises, and the policy falls back to least load.
        m.head("r2").up = False
        with capture_logs():
            try:
                await locator.leading_runs(hashes)
            except Exception as e:
                assert "no block source answered" in str(e)
            else:
                raise AssertionError("expected the locator to raise")
        assert await locator.leading_runs([]) == {}
        await m.replicas.close()

    asyncio.run(main())
