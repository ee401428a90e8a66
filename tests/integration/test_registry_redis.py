"""The Redis registry against a real redis-server: leases, discovery, expiry, block index, namespaces."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.redis_server import free_port
from trellis.registry import (
    LeaseConflictError,
    Member,
    RedisRegistry,
    RegistryUnavailableError,
    ReplicaLoad,
    open_registry,
)

REPO = Path(__file__).resolve().parents[2]


def fresh_namespace() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


def stage(replica: str, index: int, layers: tuple[int, int], num_stages: int = 2) -> Member:
    return Member(
        replica=replica,
        stage=index,
        num_stages=num_stages,
        grpc_address=f"10.0.0.{index}:5000",
        ucx_address=f"10.0.0.{index}:6000",
        layers=layers,
        tp=2,
    )


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float) -> float:
    """Seconds until check() holds; fails past timeout_s."""
    start = time.monotonic()
    while not await check():
        if time.monotonic() - start > timeout_s:
            pytest.fail(f"condition still false after {timeout_s} s")
        await asyncio.sleep(0.05)
    return time.monotonic() - start


def test_router_discovers_complete_replicas(redis_url: str) -> None:
    async def scenario() -> None:
        ns = fresh_namespace()
        router = open_registry(redis_url, None, namespace=ns)
        workers = [RedisRegistry(redis_url, namespace=ns) for _ in range(4)]  # one per stage process
        r0 = [stage("r0", 0, (0, 3)), stage("r0", 1, (3, 4))]
        r1 = [stage("r1", 0, (0, 2)), stage("r1", 1, (2, 4))]
        await workers[0].register(r0[0], ttl_s=5)
        await workers[1].register(r0[1], ttl_s=5)
        await workers[2].register(r1[0], ttl_s=5)
        assert [m.slot for m in await router.members()] == ["r0:0", "r0:1", "r1:0"]
        views = await router.replicas()
        assert list(views) == ["r0"]  # r1 lacks its last stage
        assert views["r0"].stages == tuple(r0)

        await workers[3].register(r1[1], ttl_s=5)  # a replica completed later appears
        views = await router.replicas()
        assert sorted(views) == ["r0", "r1"]
        assert views["r1"].head == r1[0] and views["r1"].num_layers == 4

        await workers[1].close()  # clean shutdown: gone at once, no TTL wait
        assert sorted(await router.replicas()) == ["r1"]
        await workers[2].deregister(r1[0])
        assert await router.replicas() == {}
        for reg in (router, workers[0], workers[2], workers[3]):
            await reg.close()

    asyncio.run(scenario())


# The worker side in its own process, so that "killed" means SIGKILL: no deregistration, no cleanup.
WORKER = """
import asyncio, sys
from trellis.core import log
from trellis.registry import Member, RedisRegistry

async def main(url, ns):
    log.configure("test-worker", level="WARNING")  # logs to stderr: stdout carries "ready"
    reg = RedisRegistry(url, namespace=ns, block_ttl_s=1.0)
    await reg.register(Member(replica="rk", stage=0, num_stages=1, grpc_address="h:1", ucx_address="h:2",
                              layers=(0, 4)), ttl_s=1.0)
    await reg.add_blocks("rk", [7, 8, 9])
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def test_killed_worker_disappears_after_its_ttl(redis_url: str) -> None:
    ns = fresh_namespace()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKER, redis_url, ns], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"

        async def scenario() -> None:
            router = RedisRegistry(redis_url, namespace=ns)
            assert list(await router.replicas()) == ["rk"]
            await asyncio.sleep(1.6)  # past the 1 s TTL: the heartbeat keeps the lease and the blocks
            assert list(await router.replicas()) == ["rk"]
            assert await router.lookup_blocks([7, 9, 10]) == [{"rk"}, {"rk"}, set()]

            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()

            async def gone() -> bool:
                return await router.members() == []

            waited = await eventually(gone, timeout_s=4.0)
            assert waited <= 2.0, f"a dead member lingered {waited:.2f} s with a 1 s TTL"
            assert await router.replicas() == {}
            assert await router.lookup_blocks([7, 8, 9]) == [set(), set(), set()]  # expired with it
            raw = aioredis.from_url(redis_url, decode_responses=True)
            assert await raw.smembers(f"{ns}:members") == set()  # the index was swept too
            await raw.aclose()
            await router.close()

        asyncio.run(scenario())
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_a_held_lease_cannot_be_stolen(redis_url: str) -> None:
    async def scenario() -> None:
        ns = fresh_namespace()
        owner, thief = RedisRegistry(redis_url, namespace=ns), RedisRegistry(redis_url, namespace=ns)
        mine = stage("r0", 0, (0, 4), num_stages=1)
        await owner.register(mine, ttl_s=5)
        theirs = Member(**{**mine.__dict__, "grpc_address": "evil:1", "instance_id": "thief"})
        with pytest.raises(LeaseConflictError, match=f"slot r0:0 is held by instance {mine.instance_id}"):
            await thief.register(theirs, ttl_s=5)
        await thief.deregister(theirs)  # not the holder: no effect
        assert await owner.members() == [mine]

        # The holder itself may re-register, e.g. with a new address.
        moved = Member(**{**mine.__dict__, "grpc_address": "10.9.9.9:1"})
        await owner.register(moved, ttl_s=5)
        assert await thief.members() == [moved]
        await owner.close()
        await thief.register(theirs, ttl_s=5)  # free now
        assert await thief.members() == [theirs]
        await thief.close()

    asyncio.run(scenario())


def test_heartbeat_does_not_renew_a_lease_another_instance_owns(redis_url: str) -> None:
    async def scenario() -> None:
        ns = fresh_namespace()
        reg = RedisRegistry(redis_url, namespace=ns)
        raw = aioredis.from_url(redis_url, decode_responses=True)
        lost: list[Member] = []
        mine = stage("r0", 1, (2, 4))
        await reg.register(mine, ttl_s=0.6, on_lease_lost=lost.append)  # heartbeat every 0.2 s
        await asyncio.sleep(0.8)
        assert lost == [] and await raw.pttl(f"{ns}:member:r0:1") > 300  # renewed

        # As if our lease had run out during a stall and another instance had claimed the slot.
        other = Member(**{**mine.__dict__, "instance_id": "newcomer"})
        await raw.set(f"{ns}:member:r0:1", other.to_json(), px=1000)
        await asyncio.sleep(0.5)
        assert lost == [mine]  # told once
        assert await reg.members() == [other]
        assert 0 < await raw.pttl(f"{ns}:member:r0:1") <= 550  # the newcomer's TTL, not renewed by us

        # The newcomer dies: the slot is free again and our live heartbeat re-claims it.
        async def ours_again() -> bool:
            return await reg.members() == [mine]

        await eventually(ours_again, timeout_s=2.0)
        assert lost == [mine]
        await reg.close()
        await raw.aclose()

    asyncio.run(scenario())


def test_block_index_add_lookup_remove(redis_url: str) -> None:
    async def scenario() -> None:
        ns = fresh_namespace()
        worker, kv_store = RedisRegistry(redis_url, namespace=ns), RedisRegistry(redis_url, namespace=ns)
        router = RedisRegistry(redis_url, namespace=ns)
        top = 2**64 - 1  # hashes are kept as decimal strings: any int fits
        await worker.add_blocks("r0", [1, 2, 3, top, -5])
        await kv_store.add_blocks("10.0.0.9:7000", [2, 3, 4])
        assert await router.lookup_blocks([1, 2, 3, 4, top, -5, 6]) == [
            {"r0"},
            {"r0", "10.0.0.9:7000"},
            {"r0", "10.0.0.9:7000"},
            {"10.0.0.9:7000"},
            {"r0"},
            {"r0"},
            set(),
        ]

        await worker.remove_blocks("r0", [2, 3])
        assert await router.lookup_blocks([1, 2, 3]) == [{"r0"}, {"10.0.0.9:7000"}, {"10.0.0.9:7000"}]

        # A long prompt: more hashes than one Lua unpack slice takes.
        many = list(range(1000, 3500))
        await worker.add_blocks("r0", many[::2])
        found = await router.lookup_blocks(many)
        assert found == [{"r0"} if h % 2 == 0 else set() for h in many]

        await router.forget_location("10.0.0.9:7000")  # e.g. the router found it dead
        assert await router.lookup_blocks([3, 4]) == [set(), set()]
        await worker.close()  # a clean shutdown takes its entries along
        assert await router.lookup_blocks([1, 1000]) == [set(), set()]
        for reg in (kv_store, router):
            await reg.close()

    asyncio.run(scenario())


def test_load_round_trip_and_expiry(redis_url: str) -> None:
    async def scenario() -> None:
        ns = fresh_namespace()
        reg = RedisRegistry(redis_url, namespace=ns, load_ttl_s=0.6)
        r0 = ReplicaLoad("r0", outstanding=4, running=3, waiting=1, free_blocks=120)
        await reg.report_load(r0)
        await reg.report_load(ReplicaLoad("r1", free_blocks=7))
        loads = await reg.loads()
        assert loads["r0"] == r0 and loads["r1"].free_blocks == 7
        await asyncio.sleep(0.4)
        await reg.report_load(r0)  # reported again: stays
        await asyncio.sleep(0.4)
        assert list(await reg.loads()) == ["r0"]
        await asyncio.sleep(0.4)
        assert await reg.loads() == {}
        await reg.close()

    asyncio.run(scenario())


def test_namespaces_isolate(redis_url: str) -> None:
    async def scenario() -> None:
        a = RedisRegistry(redis_url, namespace=fresh_namespace())
        b = RedisRegistry(redis_url, namespace=fresh_namespace())
        member = stage("r0", 0, (0, 4), num_stages=1)
        await a.register(member, ttl_s=5)
        await a.report_load(ReplicaLoad("r0", outstanding=1))
        await a.add_blocks("r0", [42])
        assert (await b.members(), await b.loads(), await b.lookup_blocks([42])) == ([], {}, [set()])
        await b.register(member, ttl_s=5)  # the same slot in another namespace is free
        assert list(await b.replicas()) == ["r0"]
        assert await a.lookup_blocks([42]) == [{"r0"}]
        await a.close()
        await b.close()

    asyncio.run(scenario())


def test_bad_records_are_skipped(redis_url: str) -> None:
    async def scenario() -> None:
        ns = fresh_namespace()
        reg = RedisRegistry(redis_url, namespace=ns)
        raw = aioredis.from_url(redis_url, decode_responses=True)
        await raw.set(f"{ns}:member:x:0", "{not json")
        await raw.sadd(f"{ns}:members", "x:0")
        good = stage("r0", 0, (0, 4), num_stages=1)
        await reg.register(good, ttl_s=5)
        assert await reg.members() == [good]
        await reg.close()
        await raw.aclose()

    asyncio.run(scenario())


def test_unreachable_redis_is_one_clear_error() -> None:
    async def scenario() -> None:
        reg = RedisRegistry(f"redis://127.0.0.1:{free_port()}/0", namespace=fresh_namespace())
        with pytest.raises(RegistryUnavailableError, match=r"cannot list members") as info:
            await reg.members()
        assert "\n" not in str(info.value)
        await reg.close()

    asyncio.run(scenario())
