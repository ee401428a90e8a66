"""The router's logic against an in-process fake of the stages: no process, no socket.

Stop strings (and the upstream cancel when one ends the text early), finish mapping, upstream
failure -> Unavailable, cancellation reaching the upstream, admission, validation, least-load.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest
from tokenizers import Tokenizer

from tests.fake_stages import chunks, collect, mesh
from trellis.core.errors import InvalidRequest, Overloaded, Unavailable
from trellis.core.request import RequestLimits
from trellis.core.sampling import DEFAULT_MAX_TOKENS, SamplingParams
from trellis.registry import ReplicaLoad
from trellis.routing.policy import least_load
from trellis.routing.replicas import MISSES_TO_DOWN
from trellis.routing.router import Delta
from trellis.routing.stage_client import StageChunk


@pytest.mark.parametrize(
    ("head_says", "client_sees"),
    [("stop", "stop"), ("length", "length"), ("too_long", "length"), ("abort", "abort")],
)
def test_finish_reasons_map_and_the_deltas_carry_replica_prompt_and_usage(
    head_says: str, client_sees: str
) -> None:
    async def scenario() -> None:
        m = await mesh()
        m.head("r1").chunks = chunks([5], [6, 7], [8], finish=head_says)
        out = await collect(m.router.generate((1, 2, 3), SamplingParams(max_tokens=4), request_id="q"))
        assert [d.token_ids for d in out] == [(5,), (6, 7), (8,)]
        assert [d.finish_reason for d in out] == ["", "", client_sees]
        assert out[0].replica == "r1" and out[0].prompt_ids == (1, 2, 3)
        assert all(not d.replica and not d.prompt_ids for d in out[1:])
        usage = out[-1].usage
        assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (3, 4)
        assert all(d.usage is None for d in out[:-1]) and all(d.request_id == "q" for d in out)
        assert not m.head("r1").streams[0].cancelled  # finished upstream: nothing to cancel
        assert m.router.outstanding == 0 and not m.replicas.replicas["r1"].streams

    asyncio.run(scenario())


def test_the_sampling_sent_upstream_is_validated_and_resolved() -> None:
    async def scenario() -> None:
        m = await mesh()
        m.head("r1").chunks = chunks([5])
        sp = SamplingParams(temperature=0.5, top_k=3, seed=7, max_tokens=999)
        await collect(m.router.generate((1, 2, 3), sp, max_tokens_given=False, request_id="q"))
        await collect(m.router.generate(tuple(range(60)), sp, max_tokens_given=False))
        await collect(m.router.generate((1, 2, 3), SamplingParams(max_tokens=61)))
        first, near_full, exact = m.head("r1").requests
        assert first.sampling == SamplingParams(
            temperature=0.5, top_k=3, seed=7, max_tokens=DEFAULT_MAX_TOKENS
        )
        assert first.request_id == "q" and first.prompt_ids == (1, 2, 3)
        assert near_full.sampling.max_tokens == 4  # the default, cut to the room left
        assert near_full.request_id  # one was made up
        assert exact.sampling.max_tokens == 61

    asyncio.run(scenario())


def test_stop_strings_cut_the_text_and_an_early_stop_cancels_the_upstream(demo_tokenizer: Tokenizer) -> None:
    limits = RequestLimits(vocab_size=demo_tokenizer.get_vocab_size(), max_model_len=256)

    async def scenario() -> None:
        m = await mesh(tokenizer=demo_tokenizer, limits=limits)
        ids = demo_tokenizer.encode("the cat sat. Then the dog ran away").ids
        head = m.head("r1")
        head.chunks = chunks(*([t] for t in ids), finish="length")
        out = await collect(m.router.generate("once", stop=(". Then",)))
        assert "".join(d.text for d in out) == "the cat sat"
        assert out[-1].finish_reason == "stop" and out[-1].usage is not None
        assert out[0].prompt_ids == tuple(demo_tokenizer.encode("once").ids)  # tokenized here
        assert len(out) < len(ids)  # it ended before the head did ...
        assert head.streams[0].cancelled  # ... so the upstream was cancelled to free its blocks

        # A stop string in the head's last chunk: the head finished, nothing to cancel.
        head.chunks = chunks(ids[:3], ids[3:], finish="length")
        out = await collect(m.router.generate((1, 2), stop=("away",)))
        assert "".join(d.text for d in out) == demo_tokenizer.decode(ids).split("away")[0]
        assert out[-1].finish_reason == "stop" and not head.streams[1].cancelled

        # No stop string: the deltas add up to the full decode, held back text flushed at the end.
        out = await collect(m.router.generate((1, 2), stop=("zebra",)))
        assert "".join(d.text for d in out) == demo_tokenizer.decode(ids)
        assert out[-1].finish_reason == "length"

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("fail", "words"),
    [
        (Unavailable("Socket closed (from the stage at r1-s0:1)"), "replica r1 failed: Socket closed"),
        (Unavailable("replica r1 failed: the ring broke"), "replica r1 failed: the ring broke"),
        (None, "replica r1 went down: its stream ended early"),
    ],
    ids=["transport error", "the head names the replica", "stream ends without a finish"],
)
def test_an_upstream_failure_is_unavailable_naming_the_replica(fail: Exception | None, words: str) -> None:
    async def scenario() -> None:
        m = await mesh()
        m.head("r1").chunks, m.head("r1").fail = [StageChunk((5,))], fail
        deltas: list[Delta] = []
        with pytest.raises(Unavailable) as err:
            async for d in m.router.generate((1, 2, 3)):
                deltas.append(d)
        assert words in str(err.value)
        assert [d.token_ids for d in deltas] == [(5,)]
        assert m.router.outstanding == 0

    asyncio.run(scenario())


def test_a_replica_going_down_cancels_its_streams_and_they_end_unavailable() -> None:
    async def scenario() -> None:
        m = await mesh(("r1",), num_stages=2)
        m.head("r1").chunks, m.head("r1").hang = [StageChunk((5,))], True
        agen = m.router.generate((1, 2, 3))
        assert (await anext(agen)).replica == "r1"
        m.stages["r1-s1:1"].up = False  # the second stage stops answering health
        for _ in range(MISSES_TO_DOWN):
            await m.replicas.refresh()
        assert not m.replicas.replicas["r1"].healthy
        assert m.head("r1").streams[0].cancelled
        with pytest.raises(Unavailable, match="replica r1 went down: stage 1 is not serving"):
            await anext(agen)
        with pytest.raises(Unavailable, match="no replica is serving"):
            await collect(m.router.generate((1, 2, 3)))

    asyncio.run(scenario())


def test_a_draining_replica_gets_no_new_requests_but_its_streams_finish_then_it_goes_down() -> None:
    """The monitor's rule: reachable but NOT_SERVING is draining (no new work, streams kept), only
    an unreachable stage is down (streams cancelled): a finished drain leaves none to cancel."""

    async def scenario() -> None:
        m = await mesh(("r1", "r2"))
        for name in ("r1", "r2"):
            m.head(name).chunks = chunks([5], [6], [7])
        agen = m.router.generate((1, 2, 3))
        first = await anext(agen)
        busy, other = first.replica, ({"r1", "r2"} - {first.replica}).pop()
        m.head(busy).draining = True  # SIGTERM or Drain: health NOT_SERVING, the server still streams
        for _ in range(MISSES_TO_DOWN + 1):
            await m.replicas.refresh()
        r = m.replicas.replicas[busy]
        assert not r.healthy and r.draining and not m.head(busy).streams[0].cancelled
        assert [x.name for x in m.replicas.healthy()] == [other]
        fresh = await collect(m.router.generate((1, 2, 3)))
        assert fresh[0].replica == other and fresh[-1].finish_reason == "length"
        rest = [d async for d in agen]  # the draining replica's stream runs to its end
        assert [d.token_ids for d in rest] == [(6,), (7,)] and rest[-1].finish_reason == "length"
        assert not m.head(busy).streams[0].cancelled and not r.streams
        m.head(busy).up = False  # the drain is over: the replica exits
        for _ in range(MISSES_TO_DOWN):
            await m.replicas.refresh()
        assert not r.healthy and not r.draining and r.down_reason == "stage 0 is not serving"
        m.head(busy).up, m.head(busy).draining = True, False  # restarted
        await m.replicas.refresh()
        assert r.healthy and not r.draining

    asyncio.run(scenario())


def test_a_request_refused_as_draining_before_the_monitor_saw_it_goes_to_another_replica() -> None:
    async def scenario() -> None:
        m = await mesh(("r1", "r2"))
        picked = least_load(m.replicas.healthy(), (1, 2, 3)).name
        other = ({"r1", "r2"} - {picked}).pop()
        for name in ("r1", "r2"):
            m.head(name).chunks = chunks([5], [6])
        m.head(picked).draining = True  # no poll yet: the router still thinks it serves
        out = await collect(m.router.generate((1, 2, 3)))
        assert out[0].replica == other and [d.token_ids for d in out] == [(5,), (6,)]
        assert len(m.head(picked).requests) == 1 and m.replicas.replicas[picked].draining
        assert m.router.outstanding == 0 and all(r.outstanding == 0 for r in m.replicas.replicas.values())
        m.head(other).draining = True  # every replica draining: the refusal is the answer
        with pytest.raises(Unavailable, match=f"replica {other} is draining"):
            await collect(m.router.generate((1, 2, 3)))
        with pytest.raises(Unavailable, match="no replica is serving"):
            await collect(m.router.generate((1, 2, 3)))

    asyncio.run(scenario())


def test_upstream_refusals_keep_their_branch_of_the_tree() -> None:
    async def scenario() -> None:
        m = await mesh()
        for error in (InvalidRequest("sampling.top_k is bad"), Overloaded("the head is full")):
            m.head("r1").chunks, m.head("r1").fail = [], error
            with pytest.raises(type(error), match=str(error)):
                await collect(m.router.generate((1, 2, 3)))

    asyncio.run(scenario())


def test_a_client_going_away_cancels_the_upstream() -> None:
    async def scenario() -> None:
        m = await mesh()
        m.head("r1").chunks, m.head("r1").hang = [StageChunk((5,))], True
        first = asyncio.Event()

        async def reader() -> None:
            async for _ in m.router.generate((1, 2, 3)):
                first.set()

        task = asyncio.create_task(reader())
        await first.wait()
        await asyncio.sleep(0.01)  # the reader now waits on the upstream
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert m.head("r1").streams[0].cancelled
        assert m.router.outstanding == 0 and m.replicas.replicas["r1"].outstanding == 0
        assert not m.replicas.replicas["r1"].streams

        # A reader that just stops reading (closes the generator) cancels it too.
        agen = m.router.generate((1, 2, 3))
        await anext(agen)
        await agen.aclose()
        assert m.head("r1").streams[1].cancelled and m.router.outstanding == 0

    asyncio.run(scenario())


def test_past_max_queue_requests_are_refused_as_overloaded() -> None:
    async def scenario() -> None:
        m = await mesh(max_queue=1)
        m.head("r1").chunks, m.head("r1").hang = [StageChunk((5,))], True
        busy = m.router.generate((1, 2, 3))
        await anext(busy)
        with pytest.raises(Overloaded, match="at its limit of 1 requests in flight"):
            await collect(m.router.generate((1, 2, 3)))
        await busy.aclose()
        m.head("r1").hang = False
        m.head("r1").chunks = chunks([5])
        assert (await collect(m.router.generate((1, 2, 3))))[-1].finish_reason == "length"

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("prompt", "kwargs", "words"),
    [
        (None, {}, "prompt is missing: set text or token_ids"),
        ((), {}, "prompt token_ids is empty"),
        ("", {}, "prompt text is empty"),
        ("hello", {}, "this model has no tokenizer: send the prompt as token_ids"),
        ((1, 2), {"stop": ("x",)}, "stop strings need the model's tokenizer"),
        ((1, 512), {}, "prompt token id 512 is outside the vocabulary [0, 512)"),
        (tuple([1] * 64), {}, "the prompt has 64 tokens; the context is 64"),
        ((1, 2), {"sampling": SamplingParams(temperature=-1.0)}, "sampling.temperature"),
        ((1, 2, 3), {"sampling": SamplingParams(max_tokens=62)}, "prompt (3 tokens) + max_tokens (62)"),
        ((1, 2), {"request_id": "r" * 300}, "request_id is longer than 256"),
    ],
    ids=[
        "no prompt",
        "empty ids",
        "empty text",
        "text without a tokenizer",
        "stop without a tokenizer",
        "id past the vocabulary",
        "prompt fills the context",
        "negative temperature",
        "past the context",
        "long request id",
    ],
)
def test_bad_requests_are_invalid_and_never_reach_a_replica(
    prompt: tuple[int, ...] | str | None, kwargs: dict[str, object], words: str
) -> None:
    async def scenario() -> None:
        m = await mesh()
        with pytest.raises(InvalidRequest) as err:
            await collect(m.router.generate(prompt, **kwargs))  # type: ignore[arg-type]
        assert words in str(err.value) and "\n" not in str(err.value)
        assert not m.head("r1").requests and m.router.outstanding == 0

    asyncio.run(scenario())


def test_requests_go_to_the_least_loaded_replica() -> None:
    async def scenario() -> None:
        m = await mesh(("r1", "r2", "r3"))
        for name in ("r1", "r2", "r3"):
            m.head(name).chunks, m.head(name).hang = [StageChunk((5,))], True
        m.registry.load = {"r1": ReplicaLoad("r1", waiting=1)}  # r1 reports a queued request
        await m.replicas.refresh()
        streams = [m.router.generate((1, 2, 3)) for _ in range(4)]
        chosen = [(await anext(s)).replica for s in streams]
        # r2 and r3 tie at 0 (by name), then r1 ties r2 and r3 at 1 ... by name again.
        assert chosen == ["r2", "r3", "r1", "r2"]
        for s in streams:
            await s.aclose()

    asyncio.run(scenario())


def test_least_load_breaks_ties_by_name() -> None:
    @dataclass(frozen=True)
    class R:
        name: str
        load: int

    assert least_load([R("b", 1), R("a", 1), R("c", 0)], [1]) == R("c", 0)
    assert least_load([R("b", 2), R("a", 2)], []) == R("a", 2)


def test_info_describes_the_replicas() -> None:
    async def scenario() -> None:
        m = await mesh(("r1",), num_stages=2)
        info = m.router.info()
        assert (info.model, info.vocab_size, info.max_model_len) == ("fake", 512, 64)
        (r1,) = info.replicas
        assert r1.name == "r1" and [s.index for s in r1.stages] == [0, 1]
        assert r1.stages[1].layer_start == 2 and r1.stages[1].address == "r1-s1:1"
        assert all(s.alive for s in r1.stages)

    asyncio.run(scenario())
