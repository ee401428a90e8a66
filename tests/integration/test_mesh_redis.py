"""Issue 3 acceptance: a mesh on the Redis registry (a real redis-server). The router starts alone; a
replica started after it is discovered and gets traffic; a replica killed with -9 drops out when its
lease expires, and traffic goes on to the one left."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis

from tests.mesh_fixtures import StreamReader, collect, running_mesh, service, wait_for
from trellis.core.engine_config import EngineConfig
from trellis.deploy.local_spec import local_spec
from trellis.deploy.mesh import Mesh, health
from trellis.wire.router_client import RouterClient

LEASE_TTL_S = EngineConfig().lease_ttl_s  # the specs here leave the stages' lease at its default

pytestmark = pytest.mark.timeout(300)

PROMPT = list(range(20, 40))
DISCOVERY_TIMEOUT_S = 15.0
STAGE_START_TIMEOUT_S = 120.0


@pytest.fixture
def redis_db(redis_url: str) -> str:
    """A database of its own on the session's redis-server (the mesh uses the default key namespace)."""
    url = redis_url.rsplit("/", 1)[0] + "/3"
    with redis.Redis.from_url(url) as r:
        r.flushdb()
    return url


@pytest.fixture
def mesh(plain_ckpt: Path, redis_db: str) -> Iterator[Mesh]:
    spec = local_spec(str(plain_ckpt), replicas=2, stages=1, tp=1, registry=redis_db)
    with running_mesh(spec, start=False) as m:
        yield m


def start_stage(mesh: Mesh, name: str) -> None:
    svc = service(mesh, name)
    mesh.start_service(svc)
    wait_for(lambda: health(svc.address), STAGE_START_TIMEOUT_S, f"{name} serving")


def replicas_seen(client: RouterClient) -> dict[str, bool]:
    """The replicas the router knows, and whether it finds them up."""
    return {r.name: all(s.alive for s in r.stages) for r in client.info().replicas}


def test_replicas_come_and_go_with_their_leases(mesh: Mesh) -> None:
    mesh.start_service(mesh.router)
    wait_for(lambda: health(mesh.router.address), STAGE_START_TIMEOUT_S, "router serving")
    with RouterClient(mesh.router.address) as client:
        assert replicas_seen(client) == {}
        nothing = collect(client.stream(PROMPT, max_tokens=2, timeout=30))
        assert nothing.code == grpc.StatusCode.UNAVAILABLE and "no replica" in nothing.details

        start_stage(mesh, "r0/stage-0")
        wait_for(lambda: replicas_seen(client) == {"r0": True}, DISCOVERY_TIMEOUT_S, "the router finds r0")
        assert collect(client.stream(PROMPT, max_tokens=2, timeout=60)).replica == "r0"

        start_stage(mesh, "r1/stage-0")  # a replica that comes after the router
        wait_for(
            lambda: replicas_seen(client) == {"r0": True, "r1": True},
            DISCOVERY_TIMEOUT_S,
            "the router finds r1",
        )
        busy = [
            StreamReader(client.stream(PROMPT, max_tokens=400, ignore_eos=True, timeout=120))
            for _ in range(2)
        ]
        for r in busy:
            assert r.first.wait(30), r.result.details
        assert {r.result.replica for r in busy} == {"r0", "r1"}, "r1 should take traffic"
        for r in busy:
            r.stream.cancel()
            r.join(10)

        service(mesh, "r0/stage-0").proc.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        wait_for(
            lambda: "r0" not in replicas_seen(client),
            LEASE_TTL_S + DISCOVERY_TIMEOUT_S,
            "r0 drops out of the registry",
        )
        assert time.monotonic() - killed_at < LEASE_TTL_S + 5.0
        outs = [collect(client.stream(PROMPT, max_tokens=2, timeout=60)) for _ in range(3)]
        assert [(o.replica, o.code) for o in outs] == [("r1", grpc.StatusCode.OK)] * 3
        assert mesh.router.alive()
