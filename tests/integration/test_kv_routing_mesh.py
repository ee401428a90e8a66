"""KV-aware routing on a real mesh (2 replicas, a kv_store, the router; separate processes).

A prompt's prefix cached on one replica draws every later request with that prefix there, even
four at once (kv-aware); least-load spreads them. Once that replica evicted the prefix, the request
goes to the store-backed path: its blocks come from the store, and its tokens are the same. Both
locators: the embedded registry (the router asks the heads) and Redis (the live index)."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis

from tests.mesh_fixtures import StreamReader, collect, head_address, running_mesh, stage_stats, wait_for
from trellis.core.engine_config import EngineConfig
from trellis.core.spec import KVStoreSpec
from trellis.deploy.local_spec import local_spec
from trellis.deploy.mesh import Mesh, health
from trellis.v1 import sampling_pb2, stage_pb2, stage_pb2_grpc
from trellis.wire.router_client import RouterClient

pytestmark = pytest.mark.timeout(400)

PREFIX = 320  # 20 blocks
rng = random.Random(3)
P = [rng.randrange(2, 1000) for _ in range(PREFIX)]
TAILS = [[rng.randrange(2, 1000) for _ in range(7)] for _ in range(8)]


def mesh_for(ckpt: Path, tmp: Path, policy: str, registry: str) -> Iterator[Mesh]:
    spec = local_spec(
        str(ckpt),
        replicas=2,
        registry=registry,
        router_policy=policy,
        engine=EngineConfig(num_blocks=48),  # 768 tokens: three fillers evict the prefix
        kv_store=KVStoreSpec(capacity_bytes=16 << 20, shm_dir=str(tmp), write_policy="write-through"),
    )
    with running_mesh(spec) as mesh:
        yield mesh


@pytest.fixture(params=[("kv-aware", "embedded"), ("kv-aware", "redis"), ("least-load", "embedded")])
def mesh(request: pytest.FixtureRequest, plain_ckpt: Path, tmp_path: Path, redis_url: str) -> Iterator[Mesh]:
    policy, registry = request.param
    if registry == "redis":
        registry = redis_url.rsplit("/", 1)[0] + "/5"
        with redis.Redis.from_url(registry) as r:
            r.flushdb()
    yield from mesh_for(plain_ckpt, tmp_path, policy, registry)


def generated(mesh: Mesh) -> dict[str, int]:
    return {r: stage_stats(head_address(mesh, r)).generated_tokens for r in ("r0", "r1")}


def fill_cache(address: str) -> None:
    """Prompts straight to one head (not through the router) until its prefix cache turned over."""
    with grpc.insecure_channel(address) as ch:
        stub = stage_pb2_grpc.StageWorkerStub(ch)
        for i in range(3):
            filler = [rng.randrange(2, 1000) for _ in range(400)]
            req = stage_pb2.SubmitRequest(
                request_id=f"filler-{i}",
                prompt_ids=filler,
                sampling=sampling_pb2.SamplingParams(max_tokens=1),
            )
            for _ in stub.Submit(req, timeout=60):
                pass


def test_prefix_routing(mesh: Mesh) -> None:
    kv_aware = mesh.spec.router.policy == "kv-aware"
    wait_for(lambda: health(mesh.router.address), 60, "router serving")
    with RouterClient(mesh.router.address) as client:
        warm = collect(client.stream(P + TAILS[0], max_tokens=2, timeout=60))
        assert warm.code == grpc.StatusCode.OK, warm.details
        holder = warm.replica
        other = "r1" if holder == "r0" else "r0"
        time.sleep(0.3)  # the head's blocks reach the Redis index within ~50 ms
        before = generated(mesh)
        streams = [
            StreamReader(client.stream(P + t, max_tokens=24, ignore_eos=True, timeout=60)) for t in TAILS[1:5]
        ]
        results = [s.join(60) for s in streams]
        assert all(r.code == grpc.StatusCode.OK for r in results), [r.details for r in results]
        served = {r.replica for r in results}
        after = generated(mesh)
        if kv_aware:
            assert served == {holder}, f"kv-aware spread the prefix to {served}"
            assert after[other] == before[other]
        else:
            assert served == {"r0", "r1"}, f"least-load kept four concurrent requests on {served}"
        if not kv_aware:
            return
        # The holder evicts the prefix; the same request comes back through the store, exactly.
        again_before = collect(client.stream(P + TAILS[1], max_tokens=24, ignore_eos=True, timeout=60))
        fill_cache(head_address(mesh, holder))
        loaded = {r: stage_stats(head_address(mesh, r)).store_loaded_blocks for r in ("r0", "r1")}
        again = collect(client.stream(P + TAILS[1], max_tokens=24, ignore_eos=True, timeout=60))
        assert again.code == grpc.StatusCode.OK, again.details
        assert again.token_ids == again_before.token_ids
        now = stage_stats(head_address(mesh, again.replica))
        assert now.store_loaded_blocks - loaded[again.replica] == PREFIX // 16, "not served from the store"
        assert now.store_voided_loads == 0
