"""Admission at the router of a small mesh (2 replicas x 1 stage x TP 1, no tokenizer, max_queue 2): past the
queue depth a request gets RESOURCE_EXHAUSTED; work goes to the least loaded replica; text prompts and
stop strings, which need a tokenizer, are refused with a message saying so; the mesh keeps serving."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.mesh_fixtures import StreamReader, collect, mesh_pids, pid_alive, running_mesh, wait_for
from trellis.deploy.local_spec import local_spec
from trellis.deploy.mesh import Mesh
from trellis.wire.router_client import RouterClient

pytestmark = pytest.mark.timeout(240)

MAX_QUEUE = 2
LONG = 400  # tokens: slow requests that hold their place in the queue
PROMPT = list(range(10, 30))


@pytest.fixture(scope="module")
def mesh(plain_ckpt: Path) -> Iterator[Mesh]:
    with running_mesh(local_spec(str(plain_ckpt), replicas=2, stages=1, tp=1, max_queue=MAX_QUEUE)) as m:
        yield m


def test_past_max_queue_requests_get_resource_exhausted(mesh: Mesh) -> None:
    with RouterClient(mesh.router.address) as client:
        slow = [
            StreamReader(client.stream(PROMPT, max_tokens=LONG, ignore_eos=True, timeout=120))
            for _ in range(MAX_QUEUE)
        ]
        for r in slow:
            assert r.first.wait(30) and r.result.code == grpc.StatusCode.OK, r.result.details
        # Least outstanding work: the two in-flight requests sit on different replicas.
        assert {r.result.replica for r in slow} == {"r0", "r1"}

        refused = collect(client.stream(PROMPT, max_tokens=4, timeout=30))
        assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"limit of {MAX_QUEUE} requests in flight" in refused.details

        for r in slow:
            r.stream.cancel()
            assert r.join(10).code == grpc.StatusCode.CANCELLED
        # Room again once the router has seen the cancellations: the next request is admitted.
        wait_for(
            lambda: all(r.outstanding == 0 for r in client.info().replicas), 10.0, "no request in flight"
        )
        out = client.generate(PROMPT, max_tokens=4, ignore_eos=True, timeout=60)
        assert len(out.token_ids) == 4


@pytest.mark.parametrize(
    ("kw", "words"),
    [
        ({"prompt": "hello there"}, "this model has no tokenizer: send the prompt as token_ids"),
        ({"prompt": [1, 2], "stop": ["end"]}, "stop strings need the model's tokenizer"),
    ],
    ids=["text prompt", "stop string"],
)
def test_what_needs_a_tokenizer_is_refused_without_one(mesh: Mesh, kw: dict, words: str) -> None:
    pids = mesh_pids(mesh)
    with RouterClient(mesh.router.address) as client:
        result = collect(client.stream(max_tokens=4, timeout=30, **kw))
        assert result.code == grpc.StatusCode.INVALID_ARGUMENT
        assert words in result.details
        assert len(client.generate([1, 2], max_tokens=2, timeout=60).token_ids) == 2
    assert all(pid_alive(p) for p in pids) and len(pids) == 3
