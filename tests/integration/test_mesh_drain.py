"""Issue 14, item 3: a drain that finishes. SIGTERM of a replica's head while 32 greedy streams run on
2 replicas: every stream completes, tokens identical to a run without the signal; the signalled
stage exits 0 within engine.drain_grace_s; requests sent after the signal go to the other replica."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.mesh_fixtures import (
    StreamReader,
    collect,
    head_address,
    running_mesh,
    service,
    stage_stats,
    wait_for,
)
from trellis.core.engine_config import EngineConfig
from trellis.deploy.local_spec import local_spec
from trellis.deploy.mesh import Mesh
from trellis.wire.router_client import RouterClient

pytestmark = pytest.mark.timeout(300)

GRACE_S = 60.0
STREAMS = 32
LONG = 96  # tokens: long enough that the signal comes mid-stream
PROMPTS = ["Pipeline parallelism gives each node", "The ring of stages", "Drain, then exit", "Hello"]


@pytest.fixture(scope="module")
def mesh(tokenized_ckpt: Path) -> Iterator[Mesh]:
    """2 replicas x 1 stage x TP 1: what is tested is the replica's life cycle, not the split."""
    spec = local_spec(str(tokenized_ckpt), replicas=2, engine=EngineConfig(drain_grace_s=GRACE_S))
    with running_mesh(spec) as m:
        yield m


def test_sigterm_during_32_streams_finishes_them_all_and_exits_0(mesh: Mesh) -> None:
    with RouterClient(mesh.router.address) as client:
        want = {
            p: client.generate(p, max_tokens=LONG, ignore_eos=True, timeout=60).token_ids for p in PROMPTS
        }
        assert all(len(ids) == LONG for ids in want.values())

        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(STREAMS)]
        readers = [
            StreamReader(client.stream(p, max_tokens=LONG, ignore_eos=True, timeout=120)) for p in prompts
        ]
        for r in readers:
            assert r.first.wait(30), "no first token within 30 s"
        victim = readers[0].result.replica
        other = ({"r0", "r1"} - {victim}).pop()
        on_victim = [r for r in readers if r.result.replica == victim]
        assert {r.result.replica for r in readers} == {"r0", "r1"}

        proc = service(mesh, f"{victim}/stage-0").proc
        signalled_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        head = head_address(mesh, victim)
        wait_for(lambda: stage_stats(head).draining, 5.0, f"{victim} drains")

        # New work goes elsewhere at once (a request that reaches the draining head before the
        # router's next health poll is refused there and sent to the other replica).
        for p in PROMPTS:
            fresh = collect(client.stream(p, max_tokens=8, ignore_eos=True, timeout=60))
            assert fresh.code == grpc.StatusCode.OK, fresh.details
            assert fresh.replica == other and fresh.token_ids == want[p][:8], fresh.replica

        results = [r.join(GRACE_S) for r in readers]
        for p, res in zip(prompts, results, strict=True):
            assert res.code == grpc.StatusCode.OK, (res.replica, res.code, res.details)
            assert res.finish_reason == "length" and res.completion_tokens == LONG
            assert res.token_ids == want[p], res.replica
        assert any(r.result.ended_at > signalled_at for r in on_victim), "the signal came after the streams"

        assert proc.wait(timeout=GRACE_S) == 0
        assert time.monotonic() - signalled_at < GRACE_S
        wait_for(
            lambda: not any(r.name == victim and r.stages[0].alive for r in client.info().replicas),
            10.0,
            f"the router sees {victim} gone",
        )
        done = collect(client.stream(PROMPTS[0], max_tokens=4, ignore_eos=True, timeout=60))
        assert done.replica == other and done.token_ids == want[PROMPTS[0]][:4], done.details
