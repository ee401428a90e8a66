"""KVAwarePolicy: held prefixes, queues, speculation, the store, canaries, a failing locator."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from structlog.testing import capture_logs

from trellis.core.kv_names import KVFingerprint
from trellis.registry import EmbeddedRegistry, RegistryUnavailableError, ReplicaLoad
from trellis.routing.kv_aware import KVAwarePolicy, TTFTModel
from trellis.routing.speculative import SpeculativeHolds

FP = KVFingerprint("m", "bfloat16", 2, 16, 2, "theta=1e4", 16)
PROMPT = tuple(range(1, 1025))  # 64 blocks
OTHER = tuple(range(2000, 3024))
HASHES = FP.block_hashes(PROMPT)


@dataclass
class Cand:
    name: str
    outstanding: int = 0
    reported: ReplicaLoad | None = None
    kv_canary: int = 0

    @property
    def load(self) -> int:
        return self.outstanding + (self.reported.waiting if self.reported else 0)


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class Sink:
    def __init__(self) -> None:
        self.decisions: list[tuple[str, int, int]] = []
        self.fallbacks: list[str] = []

    def kv_decision(self, replica: str, predicted_hit_blocks: int, prompt_blocks: int) -> None:
        self.decisions.append((replica, predicted_hit_blocks, prompt_blocks))

    def kv_fallback(self, reason: str) -> None:
        self.fallbacks.append(reason)


class Broken:
    def __init__(self, hang: bool = False) -> None:
        self.hang = hang

    async def leading_runs(self, hashes: Sequence[int]) -> dict[str, int]:
        if self.hang:
            await asyncio.sleep(10)
        raise RegistryUnavailableError("registry redis://127.0.0.1:1/0: cannot look up: refused")


def policy(reg: object, **kw: object) -> tuple[KVAwarePolicy, Clock, Sink]:
    clock, sink = Clock(), Sink()
    kw.setdefault("speculative_ttl_s", 2.0)
    p = KVAwarePolicy(reg, FP, clock=clock, metrics=sink, **kw)  # type: ignore[arg-type]
    return p, clock, sink


def waiting(name: str, n: int) -> ReplicaLoad:
    return ReplicaLoad(name, waiting=n)


def test_prefix_holder_wins_over_slightly_less_load_but_not_over_a_big_queue() -> None:
    async def main() -> None:
        reg = EmbeddedRegistry()
        await reg.add_blocks("B@i1", HASHES)
        p, _, sink = policy(reg)
        a, b = Cand("A"), Cand("B", outstanding=1)
        assert (await p([a, b], PROMPT)).name == "B"
        assert sink.decisions == [("B", 64, 64)]
        p2, _, _ = policy(reg)
        b.reported = waiting("B", 50)  # 50 x 512 queued prompt tokens >> one 1024-token prefill
        assert (await p2([a, b], PROMPT)).name == "A"
        # A partial hold: B has half, which still beats an idle A.
        reg2 = EmbeddedRegistry()
        await reg2.add_blocks("B@i2", HASHES[:32])
        p3, _, sink3 = policy(reg2)
        assert (await p3([Cand("A"), Cand("B", outstanding=1)], PROMPT)).name == "B"
        assert sink3.decisions == [("B", 32, 64)]

    asyncio.run(main())


def test_speculation_prevents_a_stampede_then_expires() -> None:
    async def main() -> None:
        reg = EmbeddedRegistry()  # the index knows nothing yet (it lags the decisions)
        p, clock, _ = policy(reg, speculative_ttl_s=2.0)
        reps = [Cand(n) for n in ("A", "B", "C", "D")]
        chosen = []
        for _ in range(6):  # a burst of one new prefix; the router counts each in flight
            r = await p(reps, PROMPT)
            r.outstanding += 1
            chosen.append(r.name)
        assert chosen == ["A"] * 6
        # A distinct prompt is not held anywhere: it goes to the least loaded.
        assert (await p(reps, OTHER)).name == "B"
        clock.t += 2.5  # both entries expired
        for r in reps:
            r.outstanding = 0
        reps[0].outstanding = 1
        assert (await p(reps, PROMPT)).name == "B"
        assert len(p.speculative) == 64  # only the last decision's names are left

    asyncio.run(main())


def test_speculative_holds_are_prefix_runs_and_bounded() -> None:
    clock = Clock()
    holds = SpeculativeHolds(1.0, clock, max_hashes=100)
    holds.record("A", HASHES[:40])
    holds.record("A", HASHES[:10])
    assert holds.run("A", HASHES) == 40
    assert holds.run("B", HASHES) == 0
    holds.record("B", FP.block_hashes(OTHER)[:64])  # past max_hashes: the oldest record goes
    assert holds.run("A", HASHES) == 10 and len(holds) == 74
    clock.t += 1.5
    holds.expire()
    assert holds.run("A", HASHES) == 0 and len(holds) == 0


def test_store_held_prefix_lowers_every_cost_equally() -> None:
    async def main() -> None:
        reg = EmbeddedRegistry()
        await reg.add_blocks("kv_store:kv0@s1:host", HASHES[:48])
        await reg.add_blocks("kv_store:kv0@s1:disk", HASHES)
        p, _, sink = policy(reg)
        a, b = Cand("A", outstanding=1), Cand("B")
        assert (await p([a, b], PROMPT)).name == "B"  # equal store benefit: the load decides
        assert sink.decisions == [("B", 64, 64)]
        ttft_a = p._estimate(a, True, HASHES, len(PROMPT), await p._runs(HASHES))[1]  # type: ignore[arg-type]
        cost = TTFTModel()
        assert (
            abs(
                ttft_a
                - (48 * cost.host_fetch_s_per_block + 16 * cost.disk_fetch_s_per_block + cost.decode_step_s)
            )
            < 1e-9
        )
        # A replica's own copy beats fetching from the store.
        await reg.add_blocks("A@x", HASHES)
        p2, _, _ = policy(reg)
        assert (await p2([a, b], PROMPT)).name == "A"

    asyncio.run(main())


def test_canary_mismatch_removes_the_kv_preference_and_is_logged_once() -> None:
    async def main() -> None:
        reg = EmbeddedRegistry()
        await reg.add_blocks("B@i1", HASHES)
        p, clock, _ = policy(reg)
        a, b = Cand("A", kv_canary=FP.canary()), Cand("B", outstanding=1, kv_canary=12345)
        with capture_logs() as logs:
            for _ in range(3):
                assert (await p([a, b], PROMPT)).name == "A"
        errors = [e for e in logs if e["log_level"] == "error"]
        assert len(errors) == 1
        assert (errors[0]["replica_canary"], errors[0]["router_canary"]) == (12345, FP.canary())
        b.kv_canary = FP.canary()  # the replica restarted with our names
        clock.t += 5  # A's speculative holds from the decisions above are gone
        assert (await p([a, b], PROMPT)).name == "B"

    asyncio.run(main())


def test_locator_failure_or_timeout_falls_back_to_least_load() -> None:
    async def main() -> None:
        for locator, reason in ((Broken(), "error"), (Broken(hang=True), "timeout")):
            p, _, sink = policy(locator, locator_timeout_s=0.02)
            a, b = Cand("A", outstanding=2), Cand("B", outstanding=1)
            with capture_logs() as logs:
                for _ in range(3):
                    assert (await p([a, b], PROMPT)).name == "B"
            assert sink.fallbacks == [reason] * 3 and sink.decisions == []
            assert [e["event"] for e in logs] == ["block index unavailable; routing by least load"]
            p.locator = EmbeddedRegistry()
            with capture_logs() as logs:
                assert (await p([a, b], PROMPT)).name == "B"
            assert [e["event"] for e in logs] == ["block index available again; routing by KV"]

    asyncio.run(main())


def test_short_prompt_has_no_blocks_and_goes_by_least_load() -> None:
    async def main() -> None:
        p, _, sink = policy(Broken())
        assert (await p([Cand("A", outstanding=1), Cand("B")], (1, 2, 3))).name == "B"
        assert sink.fallbacks == []  # no locator call for a prompt without a full block

    asyncio.run(main())
