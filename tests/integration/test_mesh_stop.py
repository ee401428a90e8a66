"""Streaming text through the mesh: deltas add up to the tokens' text, and a stop string (or stop token)
ends the stream with finish_reason "stop", the text cut right before the match, the replica freed."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer

from tests.mesh_fixtures import StreamResult, collect, head_address, stage_stats, wait_for
from trellis.deploy.mesh import Mesh
from trellis.wire.router_client import RouterClient

pytestmark = pytest.mark.timeout(180)

PROMPT = "Pipeline parallelism gives each node"
MAX_TOKENS = 60
REPLACEMENT = "\ufffd"


def generate(mesh: Mesh, **kw: object) -> StreamResult:
    with RouterClient(mesh.router.address) as client:
        result = collect(client.stream(PROMPT, max_tokens=MAX_TOKENS, timeout=60, **kw))
    assert result.details == "", result.details
    return result


@pytest.fixture(scope="module")
def unstopped(serving_mesh: Mesh) -> StreamResult:
    """The greedy completion with no stop condition: what the stop tests cut."""
    return generate(serving_mesh, ignore_eos=True)


def printable(text: str) -> bool:
    return bool(text) and REPLACEMENT not in text and text.isprintable()


def test_deltas_add_up_to_the_text_of_the_tokens(unstopped: StreamResult, demo_tokenizer: Tokenizer) -> None:
    assert unstopped.finish_reason == "length" and len(unstopped.token_ids) == MAX_TOKENS
    assert unstopped.text == demo_tokenizer.decode(unstopped.token_ids)
    assert sum(d == "" for d in unstopped.deltas) > 0, "some tokens should have been partial characters"


def test_a_stop_string_across_tokens_cuts_the_text_before_it(
    serving_mesh: Mesh, unstopped: StreamResult
) -> None:
    deltas = unstopped.deltas
    # Two consecutive printable deltas from the middle: a stop string that straddles their boundary.
    k = next(
        k
        for k in range(len(deltas) // 3, len(deltas) - 1)
        if printable(deltas[k]) and printable(deltas[k + 1])
    )
    stop = deltas[k][-2:] + deltas[k + 1][:2]
    want = unstopped.text[: unstopped.text.find(stop)]

    result = generate(serving_mesh, stop=["never appears 1234", stop], ignore_eos=True)
    assert result.finish_reason == "stop"
    assert result.text == want
    assert len(result.token_ids) < MAX_TOKENS
    assert result.token_ids == unstopped.token_ids[: len(result.token_ids)]
    # The router cancelled the rest on the replica: nothing keeps running there.
    head = head_address(serving_mesh, result.replica)
    wait_for(lambda: stage_stats(head).running == 0, 10.0, "the stopped request leaves the head")


def test_a_stop_token_ends_the_stream_with_stop(serving_mesh: Mesh, unstopped: StreamResult) -> None:
    stop_token = unstopped.token_ids[10]
    cut = unstopped.token_ids.index(stop_token) + 1  # its first occurrence, included
    result = generate(serving_mesh, stop_token_ids=[stop_token], ignore_eos=True)
    assert result.finish_reason == "stop"
    assert result.token_ids == unstopped.token_ids[:cut]
