"""Issue 3 acceptance: a client that cancels its stream mid-way, or whose deadline passes, ends the request
on the replica (CANCELLED / DEADLINE_EXCEEDED) and the head stage gets every KV block back."""

from __future__ import annotations

import time

import grpc
import pytest

from tests.mesh_fixtures import collect, head_address, stage_stats, wait_for
from trellis.deploy.mesh import Mesh
from trellis.v1 import stage_pb2
from trellis.wire.router_client import RouterClient

pytestmark = pytest.mark.timeout(180)

PROMPT = list(range(3, 40))
LONG = 400  # tokens: far more than either test lets finish
RELEASE_TIMEOUT_S = 10.0


def idle_heads(mesh: Mesh) -> dict[str, stage_pb2.StageStats]:
    """Each replica's head stats, once nothing runs there (an earlier test's request may still drain)."""
    stats: dict[str, stage_pb2.StageStats] = {}

    def idle() -> bool:
        stats.update({r: stage_stats(head_address(mesh, r)) for r in ("r0", "r1")})
        return all(s.running == 0 and s.waiting == 0 for s in stats.values())

    wait_for(idle, RELEASE_TIMEOUT_S, "both heads idle")
    return stats


def assert_released(mesh: Mesh, replica: str, before: stage_pb2.StageStats) -> None:
    """The request is gone from the head: blocks back to the start count, and it generates no more."""
    address = head_address(mesh, replica)
    wait_for(
        lambda: (
            (s := stage_stats(address)).free_blocks == before.free_blocks
            and s.running == 0
            and s.waiting == 0
        ),
        RELEASE_TIMEOUT_S,
        f"{replica}'s free blocks back to {before.free_blocks}",
    )
    generated = stage_stats(address).generated_tokens
    time.sleep(0.5)
    assert stage_stats(address).generated_tokens == generated, "the replica still generates for it"


def test_cancelling_a_stream_mid_way_frees_its_blocks(serving_mesh: Mesh) -> None:
    before = idle_heads(serving_mesh)
    with RouterClient(serving_mesh.router.address) as client:
        stream = client.stream(PROMPT, max_tokens=LONG, ignore_eos=True, timeout=120)
        first = next(stream)
        replica, received = first.replica, len(first.token_ids)
        while received < 5:
            received += len(next(stream).token_ids)
        during = stage_stats(head_address(serving_mesh, replica))
        assert during.running == 1 and during.free_blocks < before[replica].free_blocks
        stream.cancel()
        rest = collect(stream)
    assert rest.code == grpc.StatusCode.CANCELLED
    assert received + len(rest.token_ids) < LONG
    assert_released(serving_mesh, replica, before[replica])


def test_an_expired_deadline_ends_the_request_and_frees_its_blocks(serving_mesh: Mesh) -> None:
    before = idle_heads(serving_mesh)
    with RouterClient(serving_mesh.router.address) as client:
        started = time.monotonic()
        result = collect(client.stream(PROMPT, max_tokens=LONG, ignore_eos=True, timeout=2.0))
    assert result.code == grpc.StatusCode.DEADLINE_EXCEEDED, (result.code, result.details)
    assert 0 < len(result.token_ids) < LONG, "the deadline should pass mid-way through the stream"
    assert result.ended_at - started < 5.0
    assert_released(serving_mesh, result.replica, before[result.replica])
