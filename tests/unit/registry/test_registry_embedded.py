"""The embedded registry: membership from a spec, load, block index; and the shared records."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

from trellis.core.spec import DeploySpec, parse
from trellis.registry import (
    EmbeddedRegistry,
    InvalidRecordError,
    Member,
    RedisRegistry,
    RegistryError,
    ReplicaLoad,
    complete_replicas,
    open_registry,
)


def two_by_two_spec() -> DeploySpec:
    def stage(layers: list[int], port: int) -> dict[str, object]:
        return {"layers": layers, "host": "10.0.0.1", "port": port, "ucx_port": port + 100}

    return parse(
        {
            "model": {"preset": "tiny", "load_format": "dummy"},
            "replicas": [
                {"name": "r0", "stages": [stage([0, 3], 7000), stage([3, 4], 7001)]},
                {"name": "r1", "role": "decode", "stages": [stage([0, 2], 7002), stage([2, 4], 7003)]},
            ],
        }
    )


def member(replica: str, stage: int, layers: tuple[int, int], num_stages: int = 2, **kw: object) -> Member:
    return Member(
        replica=replica,
        stage=stage,
        num_stages=num_stages,
        grpc_address=f"h:{100 + stage}",
        ucx_address=f"h:{200 + stage}",
        layers=layers,
        **kw,
    )


def test_members_and_replicas_come_from_the_spec() -> None:
    async def scenario() -> None:
        reg = open_registry("embedded", two_by_two_spec())
        assert isinstance(reg, EmbeddedRegistry)
        members = await reg.members()
        assert [m.slot for m in members] == ["r0:0", "r0:1", "r1:0", "r1:1"]
        r0s1 = members[1]
        assert (r0s1.grpc_address, r0s1.ucx_address, r0s1.layers, r0s1.num_stages, r0s1.tp) == (
            "10.0.0.1:7001",
            "10.0.0.1:7101",
            (3, 4),
            2,
            1,
        )

        views = await reg.replicas()
        assert sorted(views) == ["r0", "r1"]
        assert [s.stage for s in views["r0"].stages] == [0, 1]
        assert views["r0"].head.grpc_address == "10.0.0.1:7000"
        assert views["r0"].num_layers == 4
        assert (views["r0"].role, views["r1"].role) == ("both", "decode")

        # A stage withdrawn (e.g. found dead) leaves its replica incomplete; back again, complete.
        await reg.deregister(members[3])
        assert sorted(await reg.replicas()) == ["r0"]
        moved = dataclasses.replace(members[3], grpc_address="10.0.0.2:9000", instance_id="worker-7")
        await reg.register(moved, ttl_s=1.0)
        views = await reg.replicas()
        assert views["r1"].stages[1].grpc_address == "10.0.0.2:9000"

        # Deregistering with a stale instance id leaves the newer record alone.
        await reg.deregister(members[3])
        assert "r1" in await reg.replicas()

    asyncio.run(scenario())


def test_without_a_spec_membership_is_what_registers() -> None:
    async def scenario() -> None:
        reg = EmbeddedRegistry()
        assert await reg.members() == []
        await reg.register(member("a", 0, (0, 2)), ttl_s=1.0)
        assert await reg.replicas() == {}
        await reg.register(member("a", 1, (2, 5)), ttl_s=1.0)
        assert (await reg.replicas())["a"].num_layers == 5

    asyncio.run(scenario())


def test_load_round_trip_and_staleness() -> None:
    async def scenario() -> None:
        reg = EmbeddedRegistry(two_by_two_spec(), load_ttl_s=0.2)
        assert await reg.loads() == {}
        first = ReplicaLoad("r0", outstanding=3, running=2, waiting=1, free_blocks=40)
        await reg.report_load(first)
        await reg.report_load(ReplicaLoad("r1", outstanding=0, free_blocks=64))
        newer = dataclasses.replace(first, outstanding=5, timestamp=time.time())
        await reg.report_load(newer)
        loads = await reg.loads()
        assert loads == {"r0": newer, "r1": loads["r1"]}
        assert loads["r1"].free_blocks == 64
        await asyncio.sleep(0.3)
        assert await reg.loads() == {}

    asyncio.run(scenario())


def test_block_index_add_lookup_remove_forget() -> None:
    async def scenario() -> None:
        reg = EmbeddedRegistry()
        big = 2**63 + 12345  # chained hashes may use the full 64-bit range
        await reg.add_blocks("r0", [11, 12, 13, big])
        await reg.add_blocks("kv0:6000", [11, 12])
        await reg.add_blocks("r1", [])
        assert await reg.lookup_blocks([11, 12, 13, big, 99]) == [
            {"r0", "kv0:6000"},
            {"r0", "kv0:6000"},
            {"r0"},
            {"r0"},
            set(),
        ]
        assert await reg.lookup_blocks([]) == []

        await reg.remove_blocks("r0", [12, 13, 404])
        assert await reg.lookup_blocks([11, 12, 13]) == [{"r0", "kv0:6000"}, {"kv0:6000"}, set()]

        await reg.forget_location("kv0:6000")
        assert await reg.lookup_blocks([11, 12, big]) == [{"r0"}, set(), {"r0"}]

        await reg.close()
        assert await reg.lookup_blocks([11]) == [set()]

    asyncio.run(scenario())


def test_bad_block_index_arguments_are_one_line_errors() -> None:
    async def scenario() -> None:
        reg = EmbeddedRegistry()
        with pytest.raises(InvalidRecordError, match="block hashes must be integers"):
            await reg.add_blocks("r0", [1, "2"])  # type: ignore[list-item]
        with pytest.raises(InvalidRecordError, match="location must be a non-empty string"):
            await reg.add_blocks("", [1])

    asyncio.run(scenario())


def test_complete_replicas_rejects_gaps_and_mismatches() -> None:
    whole = [member("a", 0, (0, 2)), member("a", 1, (2, 4))]
    assert list(complete_replicas(whole)) == ["a"]
    assert complete_replicas(whole[:1]) == {}  # stage 1 missing
    assert complete_replicas([whole[0], member("a", 1, (3, 4))]) == {}  # layers do not tile
    assert complete_replicas([member("a", 0, (1, 2)), whole[1]]) == {}  # does not start at layer 0
    assert complete_replicas([whole[0], member("a", 1, (2, 4), num_stages=3)]) == {}  # two deployments
    assert complete_replicas([whole[0], member("a", 1, (2, 4), role="decode")]) == {}
    assert list(complete_replicas([member("solo", 0, (0, 8), num_stages=1)])) == ["solo"]


def test_records_round_trip_through_json_and_validate() -> None:
    m = member("r0", 1, (3, 4), tp=2, role="prefill")
    assert Member.from_json(m.to_json()) == m
    assert member("r0", 1, [3, 4], tp=2, role="prefill", instance_id=m.instance_id) == m  # type: ignore[arg-type]
    load = ReplicaLoad("r0", outstanding=1, running=2, waiting=3, free_blocks=4, timestamp=5.0)
    assert ReplicaLoad.from_json(load.to_json()) == load
    # A field added by a newer writer is ignored.
    assert Member.from_json(m.to_json()[:-1] + ', "zone": "eu"}') == m

    with pytest.raises(InvalidRecordError, match="stage must be in"):
        member("r0", 2, (0, 1))
    with pytest.raises(InvalidRecordError, match="layers must be"):
        member("r0", 0, (4, 4))
    with pytest.raises(InvalidRecordError, match="role must be one of"):
        member("r0", 0, (0, 1), role="chef")
    with pytest.raises(InvalidRecordError, match="tp must be >= 1"):
        member("r0", 0, (0, 1), tp=0)
    with pytest.raises(InvalidRecordError, match="outstanding must be an integer >= 0"):
        ReplicaLoad("r0", outstanding=-1)
    with pytest.raises(InvalidRecordError, match="not valid JSON"):
        Member.from_json("{nope")
    with pytest.raises(InvalidRecordError, match="expected a JSON object"):
        ReplicaLoad.from_json("[1]")
    with pytest.raises(InvalidRecordError, match="missing"):
        Member.from_json('{"replica": "r0"}')


def test_open_registry_picks_the_back_end_and_rejects_bad_urls() -> None:
    async def scenario() -> None:
        reg = open_registry("redis://127.0.0.1:1/0", None, namespace="unit")
        assert isinstance(reg, RedisRegistry)
        await reg.close()  # never connected: closing must still work

    asyncio.run(scenario())
    with pytest.raises(RegistryError, match="expected 'embedded' or redis://"):
        open_registry("etcd://x", None)
    with pytest.raises(RegistryError, match="namespace"):
        open_registry("redis://127.0.0.1:1/0", None, namespace="a b:c")
