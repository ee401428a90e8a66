"""Issue 3 acceptance: malformed requests through a running mesh each get INVALID_ARGUMENT with a message
saying what is wrong, and every service (every process) stays up and keeps serving."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest

from tests.mesh_fixtures import mesh_pids, pid_alive
from trellis.deploy.mesh import Mesh
from trellis.v1 import router_pb2, router_pb2_grpc
from trellis.wire.router_client import RouterClient

pytestmark = pytest.mark.timeout(180)

CONTEXT = 512  # the tokenized checkpoint's max_position_embeddings
VOCAB = 512
Edit = Callable[[router_pb2.GenerateRequest], None]


def prompt_ids(*ids: int) -> Edit:
    def edit(r: router_pb2.GenerateRequest) -> None:
        r.token_ids.SetInParent()
        r.token_ids.ids.extend(ids)

    return edit


def prompt_text(text: str) -> Edit:
    return lambda r: setattr(r, "text", text)


def sampling(**fields: object) -> Edit:
    def edit(r: router_pb2.GenerateRequest) -> None:
        prompt_ids(1, 2, 3)(r)
        for name, value in fields.items():
            if isinstance(value, list):
                getattr(r.sampling, name).extend(value)
            else:
                setattr(r.sampling, name, value)

    return edit


def stop(*strings: str) -> Edit:
    def edit(r: router_pb2.GenerateRequest) -> None:
        prompt_ids(1, 2, 3)(r)
        r.stop.extend(strings)

    return edit


def request_id(value: str) -> Edit:
    def edit(r: router_pb2.GenerateRequest) -> None:
        prompt_ids(1, 2, 3)(r)
        r.request_id = value

    return edit


# (case id, how to build the request, words the INVALID_ARGUMENT message must hold)
MALFORMED: list[tuple[str, Edit, str]] = [
    ("no prompt", lambda r: None, "prompt is missing"),
    ("empty text", prompt_text(""), "prompt text is empty"),
    ("empty token ids", prompt_ids(), "token_ids is empty"),
    ("token id past the vocabulary", prompt_ids(5, VOCAB), f"token id {VOCAB} is outside the vocabulary"),
    ("negative token id", prompt_ids(-7), "token id -7 is outside the vocabulary"),
    ("negative temperature", sampling(temperature=-1.0), "sampling.temperature must be a finite number >= 0"),
    ("NaN temperature", sampling(temperature=float("nan")), "sampling.temperature"),
    ("top_p zero", sampling(top_p=0.0), "sampling.top_p must be in (0, 1]"),
    ("top_p above one", sampling(top_p=1.01), "sampling.top_p must be in (0, 1]"),
    ("negative top_k", sampling(top_k=-2), "sampling.top_k must be >= 0"),
    ("max_tokens zero", sampling(max_tokens=0), "sampling.max_tokens must be > 0"),
    ("negative max_tokens", sampling(max_tokens=-1), "sampling.max_tokens must be > 0"),
    ("max_tokens past the context", sampling(max_tokens=CONTEXT), f"past the context of {CONTEXT}"),
    (
        "prompt and max_tokens past the context",
        sampling(max_tokens=CONTEXT - 2),
        f"prompt (3 tokens) + max_tokens ({CONTEXT - 2}) is past the context",
    ),
    (
        "prompt longer than the context",
        prompt_ids(*([5] * (CONTEXT + 10))),
        f"the prompt has {CONTEXT + 10} tokens; the context is {CONTEXT}",
    ),
    ("text prompt longer than the context", prompt_text("ab " * CONTEXT), "tokens; the context is"),
    ("empty stop string", stop("ok", ""), "stop contains an empty string"),
    ("too many stop strings", stop(*(f"s{i}" for i in range(40))), "stop has 40 strings"),
    ("seed of 2^63", sampling(seed=2**63), "sampling.seed must be in [0, 2^63)"),
    (
        "stop token id past the vocabulary",
        sampling(stop_token_ids=[1, VOCAB + 5]),
        f"sampling.stop_token_ids: {VOCAB + 5} is outside the vocabulary",
    ),
    ("over-long request id", request_id("x" * 300), "request_id is longer than"),
]


@pytest.fixture(scope="module")
def processes(serving_mesh: Mesh) -> list[int]:
    """Every process of the mesh before the malformed requests (services and TP peers)."""
    pids = mesh_pids(serving_mesh)
    assert len(pids) == 1 + 4 * 2  # the router, and 2 replicas x 2 stages x TP 2 ranks
    return pids


@pytest.mark.parametrize(("edit", "words"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_a_malformed_request_gets_invalid_argument(
    serving_mesh: Mesh, processes: list[int], edit: Edit, words: str
) -> None:
    request = router_pb2.GenerateRequest()
    edit(request)
    with grpc.insecure_channel(serving_mesh.router.address) as channel:
        stream = router_pb2_grpc.RouterStub(channel).Generate(request, timeout=30)
        with pytest.raises(grpc.RpcError) as err:
            next(stream)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert words in err.value.details()


def test_every_service_stays_up_and_serves_after_the_malformed_requests(
    serving_mesh: Mesh, processes: list[int]
) -> None:
    assert all(pid_alive(p) for p in processes)
    with RouterClient(serving_mesh.router.address) as client:
        out = client.generate([1, 2, 3], max_tokens=4, ignore_eos=True, timeout=60)
        info = client.info()
    assert len(out.token_ids) == 4 and out.finish_reason == "length"
    assert [r.name for r in info.replicas] == ["r0", "r1"]
    assert all(s.alive for r in info.replicas for s in r.stages)
    assert sorted(mesh_pids(serving_mesh)) == sorted(processes)
