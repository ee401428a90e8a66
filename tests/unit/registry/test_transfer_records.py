"""P/D transfer records on both back ends (same cases): open, list, replace, close, expire at the
TTL; on Redis one key per record with its own expiry, and a closing registry takes its records."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable

import pytest
import redis.asyncio as aioredis

from trellis.registry import EmbeddedRegistry, InvalidRecordError, RedisRegistry, Registry, TransferRecord


def record(tid: str, epoch: int = 1, **kw: object) -> TransferRecord:
    fields: dict[str, object] = {
        "prefill": "p0",
        "decode": "d0",
        "deadline": time.time() + 30,
        "opened_by": "router-a",
    }
    fields.update(kw)
    return TransferRecord(tid, epoch, **fields)  # type: ignore[arg-type]


def run(backend: tuple[str, str | None], scenario: Callable[[Registry, str], Awaitable[None]]) -> None:
    kind, url = backend

    async def main() -> None:
        namespace = f"test-{uuid.uuid4().hex[:12]}"
        reg: Registry = (
            EmbeddedRegistry() if kind == "embedded" else RedisRegistry(url or "", namespace=namespace)
        )
        try:
            await scenario(reg, namespace)
        finally:
            await reg.close()

    asyncio.run(main())


@pytest.fixture(params=["embedded", "redis"])
def backend(request: pytest.FixtureRequest) -> tuple[str, str | None]:
    if request.param == "redis":
        return "redis", request.getfixturevalue("redis_url")
    return "embedded", None


def test_open_list_replace_close(backend: tuple[str, str | None]) -> None:
    async def scenario(reg: Registry, _: str) -> None:
        assert await reg.transfers() == []
        a, b = record("a"), record("b", decode="d1")
        await reg.open_transfer(b, 30)
        await reg.open_transfer(a, 30)
        assert await reg.transfers() == [a, b]  # by transfer id
        a2 = record("a", epoch=2, prefill="p1")
        await reg.open_transfer(a2, 30)  # a new epoch replaces the record
        assert await reg.transfers() == [a2, b]
        await reg.close_transfer("a")
        await reg.close_transfer("a")  # gone already: nothing
        await reg.close_transfer("never-opened")
        assert await reg.transfers() == [b]
        with pytest.raises(InvalidRecordError, match="ttl_s must be > 0"):
            await reg.open_transfer(record("c"), 0)

    run(backend, scenario)


def test_a_record_goes_at_its_ttl(backend: tuple[str, str | None]) -> None:
    async def scenario(reg: Registry, _: str) -> None:
        short, long = record("short"), record("long")
        await reg.open_transfer(short, 0.15)
        await reg.open_transfer(long, 30)
        assert [r.transfer_id for r in await reg.transfers()] == ["long", "short"]
        await asyncio.sleep(0.3)
        assert await reg.transfers() == [long]

    run(backend, scenario)


def test_on_redis_each_record_is_a_key_with_its_lease_and_nothing_outlives_them(redis_url: str) -> None:
    async def scenario(reg: Registry, ns: str) -> None:
        raw = aioredis.from_url(redis_url, decode_responses=True)
        try:
            rec = record("t1")
            await reg.open_transfer(rec, 0.2)
            ttl_ms = await raw.pttl(f"{ns}:transfer:t1")
            assert 0 < ttl_ms <= 200
            assert json.loads(await raw.get(f"{ns}:transfer:t1"))["decode"] == "d0"  # JSON, never pickle
            assert 0 < await raw.pttl(f"{ns}:transfers") <= 200  # the index lives as long as its records
            await asyncio.sleep(0.35)
            assert await raw.exists(f"{ns}:transfer:t1", f"{ns}:transfers") == 0
            # A bad record (another writer's) is skipped, not fatal.
            await raw.set(f"{ns}:transfer:bad", "{not json")
            await raw.sadd(f"{ns}:transfers", "bad")
            await reg.open_transfer(record("t2"), 30)
            assert [r.transfer_id for r in await reg.transfers()] == ["t2"]
        finally:
            await raw.aclose()

    run(("redis", redis_url), scenario)


def test_a_closing_redis_registry_takes_its_open_records_with_it(redis_url: str) -> None:
    async def main() -> None:
        ns = f"test-{uuid.uuid4().hex[:12]}"
        mine, other = RedisRegistry(redis_url, namespace=ns), RedisRegistry(redis_url, namespace=ns)
        try:
            await mine.open_transfer(record("m1"), 30)
            await mine.open_transfer(record("m2"), 30)
            await mine.close_transfer("m2")
            await other.open_transfer(record("o1", opened_by="router-b"), 30)
            await mine.close()
            assert [r.transfer_id for r in await other.transfers()] == ["o1"]
        finally:
            await other.close()

    asyncio.run(main())


def test_transfer_records_validate_and_round_trip_as_json() -> None:
    rec = record("x", epoch=3, deadline=1_700_000_000.5)
    assert TransferRecord.from_json(rec.to_json()) == rec
    newer = json.dumps({**json.loads(rec.to_json()), "added_later": 1})
    assert TransferRecord.from_json(newer) == rec  # a newer writer's fields are ignored
    for bad, words in (
        ({"transfer_id": ""}, "transfer_id must be a non-empty string"),
        ({"epoch": 0}, "epoch must be an integer >= 1"),
        ({"epoch": True}, "epoch must be an integer >= 1"),
        ({"deadline": "soon"}, "deadline must be a number"),
        ({"decode": None}, "decode must be a non-empty string"),
    ):
        with pytest.raises(InvalidRecordError, match=words):
            TransferRecord.from_json(json.dumps({**json.loads(rec.to_json()), **bad}))
    with pytest.raises(InvalidRecordError, match="transfer record"):
        TransferRecord.from_json('{"transfer_id": "x"}')
    with pytest.raises(InvalidRecordError, match="not valid JSON"):
        TransferRecord.from_json("{")
