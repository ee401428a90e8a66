"""Registry.leading_runs on both back ends (same cases), and Redis answering in one round trip."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from trellis.registry import (
    EmbeddedRegistry,
    RedisRegistry,
    Registry,
    parse_location,
    replica_location,
    store_location,
)
from trellis.registry.base import InvalidRecordError

H = [(1 << 63) + 12345 * i + 7 for i in range(40)]  # 64-bit names: above any Lua number's precision


def run(backend: str, redis_url: str | None, scenario: Callable[[Registry], Awaitable[None]]) -> None:
    async def main() -> None:
        if backend == "embedded":
            reg: Registry = EmbeddedRegistry()
        else:
            assert redis_url is not None
            reg = RedisRegistry(redis_url, namespace=f"test-{uuid.uuid4().hex[:12]}")
        try:
            await scenario(reg)
        finally:
            await reg.close()

    asyncio.run(main())


@pytest.fixture(params=["embedded", "redis"])
def backend(request: pytest.FixtureRequest) -> tuple[str, str | None]:
    if request.param == "redis":
        return "redis", request.getfixturevalue("redis_url")
    return "embedded", None


def test_prefixes_gaps_and_several_locations(backend: tuple[str, str | None]) -> None:
    async def scenario(reg: Registry) -> None:
        await reg.add_blocks("a@1", H[:10])
        await reg.add_blocks("b@2", [*H[:3], *H[4:30]])  # a gap at 3
        await reg.add_blocks("c@3", H[1:20])  # no first block: no run
        await reg.add_blocks("kv_store:kv0@9:host", H)
        assert await reg.leading_runs(H) == {"a@1": 10, "b@2": 3, "kv_store:kv0@9:host": 40}
        assert await reg.leading_runs(H[:5]) == {"a@1": 5, "b@2": 3, "kv_store:kv0@9:host": 5}
        assert await reg.leading_runs(H[1:]) == {"a@1": 9, "b@2": 2, "c@3": 19, "kv_store:kv0@9:host": 39}
        assert await reg.leading_runs(H[20:]) == {"b@2": 10, "kv_store:kv0@9:host": 20}
        assert await reg.leading_runs([]) == {}
        assert await reg.leading_runs([5, 6]) == {}
        await reg.remove_blocks("a@1", [H[4]])
        assert (await reg.leading_runs(H))["a@1"] == 4
        await reg.forget_location("kv_store:kv0@9:host")
        assert await reg.leading_runs(H) == {"a@1": 4, "b@2": 3}
        with pytest.raises(InvalidRecordError):
            await reg.leading_runs(["1"])  # type: ignore[list-item]

    run(*backend, scenario)


def test_long_prompt_crosses_the_script_slices(backend: tuple[str, str | None]) -> None:
    long = [(1 << 64) - 1 - i for i in range(2500)]

    async def scenario(reg: Registry) -> None:
        await reg.add_blocks("a@1", long)
        await reg.add_blocks("b@1", long[:1500])
        assert await reg.leading_runs(long) == {"a@1": 2500, "b@1": 1500}

    run(*backend, scenario)


def test_redis_sweeps_expired_locations(redis_url: str) -> None:
    async def main() -> None:
        ns = f"test-{uuid.uuid4().hex[:12]}"
        reg = RedisRegistry(redis_url, namespace=ns)
        raw = aioredis.from_url(redis_url, decode_responses=True)
        try:
            await reg.add_blocks("a@1", H[:5])
            await reg.add_blocks("b@1", H[:5])
            await raw.delete(f"{ns}:blocks:b@1")  # as if its owner died and the TTL ran out
            assert await reg.leading_runs(H) == {"a@1": 5}
            assert await raw.smembers(f"{ns}:block_locations") == {"a@1"}
        finally:
            await reg.close()
            await raw.aclose()

    asyncio.run(main())


def test_redis_answers_in_one_round_trip(redis_url: str) -> None:
    async def main() -> None:
        reg = RedisRegistry(redis_url, namespace=f"test-{uuid.uuid4().hex[:12]}")
        try:
            for i in range(8):
                await reg.add_blocks(f"r{i}@x", H[: 5 * i])
            await reg.leading_runs(H)  # the first call may load the script
            sent: list[tuple[Any, ...]] = []
            client = reg._redis
            original = client.execute_command

            async def counting(*args: Any, **kw: Any) -> Any:
                sent.append(args)
                return await original(*args, **kw)

            client.execute_command = counting  # type: ignore[method-assign]
            runs = await reg.leading_runs(H)
            client.execute_command = original  # type: ignore[method-assign]
            assert runs == {f"r{i}@x": 5 * i for i in range(1, 8)}
            assert [a[0] for a in sent] == ["EVALSHA"]
        finally:
            await reg.close()

    asyncio.run(main())


def test_location_names_round_trip() -> None:
    loc = parse_location(replica_location("r-0@east", "abc123"))
    assert loc is not None and (loc.kind, loc.name, loc.instance_id, loc.tier) == (
        "replica",
        "r-0@east",
        "abc123",
        "",
    )
    assert not loc.is_store
    name = store_location("kv0", "def", "disk")
    assert name == "kv_store:kv0@def:disk"
    loc = parse_location(name)
    assert (
        loc is not None and loc.is_store and (loc.name, loc.instance_id, loc.tier) == ("kv0", "def", "disk")
    )
    assert replica_location("r1", "spec") == "r1@spec"
    for junk in ("r1", "@x", "r1@", "kv_store:kv0@x:ssd", "kv_store:@x:host", "r1@a:b"):
        assert parse_location(junk) is None, junk
    for bad in (lambda: replica_location("", "x"), lambda: store_location("kv0", "a@b", "host")):
        with pytest.raises(InvalidRecordError):
            bad()
    with pytest.raises(InvalidRecordError):
        store_location("kv0", "x", "ssd")
