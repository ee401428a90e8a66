"""The router's side of a P/D hand-off over fake heads: one seamless stream, every fallback, every
cancel, and never a leak (streams cancelled, aborts fired, the transfer record closed)."""

from __future__ import annotations

import asyncio

import pytest
from structlog.testing import capture_logs

from tests.fake_stages import TARGET, chunks, collect, view
from tests.unit.routing.pd_fakes import PROMPT, pd_mesh, run
from trellis.core.errors import DeadlineExceeded, InvalidRequest, Overloaded, Unavailable
from trellis.core.handoff_api import HandoffRef
from trellis.core.sampling import SamplingParams
from trellis.metrics.router_metrics import RouterMetrics
from trellis.routing.router import Delta
from trellis.routing.stage_client import StageChunk
from trellis.routing.transfers import Transfers


def test_one_seamless_stream_first_token_from_p_the_rest_from_d() -> None:
    async def scenario() -> None:
        t = await pd_mesh()
        sp = SamplingParams(max_tokens=4)
        out = await collect(t.m.router.generate(PROMPT, sp, request_id="q"))
        assert [d.token_ids for d in out] == [(5,), (6, 7), (8,)]
        assert [d.finish_reason for d in out] == ["", "", "length"]
        assert out[0].replica == "p->d" and out[0].prompt_ids == PROMPT
        assert all(not d.replica for d in out[1:]) and all(d.request_id == "q" for d in out)
        usage = out[-1].usage
        assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (3, 4)
        (p_req,), (d_req,) = t.p.requests, t.d.requests
        tid = t.transfer_id()
        assert p_req.handoff == HandoffRef(tid, 1) and not p_req.handoff.is_decode_half
        assert d_req.handoff == HandoffRef(tid, 1, first_token=5, block_sums=(11, 12))
        for req in (p_req, d_req):  # one request, one trace: the same id, prompt, sampling, context
            assert (req.request_id, req.prompt_ids, req.sampling) == ("q", PROMPT, sp)
            assert req.trace_context == p_req.trace_context
        assert t.d.calls("reserve") == [("reserve", tid, PROMPT)]
        assert t.p.calls("attach") == [("attach", tid, TARGET)]
        assert not t.p.calls("abort") and not t.d.calls("abort")  # both sides finished
        await t.settled()
        (record,) = t.records.opened
        assert (record.transfer_id, record.epoch, record.prefill, record.decode) == (tid, 1, "p", "d")
        assert record.opened_by == "router-test" and t.records.closed == [tid]
        assert t.sink.outcomes == ["handoff"] and len(t.sink.latencies) == 1

    run(scenario)


def test_a_first_token_that_finishes_the_request_aborts_ds_reservation() -> None:
    async def scenario() -> None:
        t = await pd_mesh()
        t.p.handoff_chunks = chunks([5], finish="stop")
        out = await collect(t.m.router.generate(PROMPT))
        assert [d.token_ids for d in out] == [(5,)] and out[-1].finish_reason == "stop"
        assert out[-1].usage is not None and out[-1].usage.completion_tokens == 1
        assert not t.d.requests  # D never got the decode half ...
        await t.settled()
        assert t.d.calls("abort") == [("abort", t.transfer_id(), None)]  # ... and let its blocks go
        assert t.sink.outcomes == ["first_token_finished"]

    run(scenario)


@pytest.mark.parametrize(
    ("refusal", "d_aborted"),
    [
        (Overloaded("replica d: no free blocks"), False),
        (Unavailable("Socket closed"), True),
        (DeadlineExceeded("Deadline Exceeded"), True),
    ],
    ids=["no room (it holds nothing)", "unreachable (it may reserve late)", "too slow (it may reserve late)"],
)
def test_a_reservation_refused_runs_the_request_aggregated_on_p(refusal: Exception, d_aborted: bool) -> None:
    async def scenario() -> None:
        t = await pd_mesh()
        t.d.reserve_error = refusal
        out = await collect(t.m.router.generate(PROMPT, SamplingParams(max_tokens=4)))
        assert [d.token_ids for d in out] == [(5,), (6, 7), (8,)] and out[-1].finish_reason == "length"
        assert out[-1].usage is not None and out[-1].usage.completion_tokens == 4
        assert t.p.calls("attach") == [("attach", t.transfer_id(), None)] and not t.d.requests
        await t.settled()
        assert bool(t.d.calls("abort")) is d_aborted
        assert t.sink.outcomes == ["aggregated_fallback"]

    run(scenario)


def test_p_refusing_the_target_decodes_it_itself_and_d_is_let_go() -> None:
    async def scenario() -> None:
        t = await pd_mesh()
        t.p.attach_error = InvalidRequest("the decode replica names blocks under 'fp'")
        out = await collect(t.m.router.generate(PROMPT, SamplingParams(max_tokens=4)))
        assert [d.token_ids for d in out] == [(5,), (6, 7), (8,)] and not t.d.requests
        await t.settled()
        assert t.d.calls("abort") and t.sink.outcomes == ["aggregated_fallback"]

    run(scenario)


@pytest.mark.parametrize("how", ["its stream fails", "its attach fails", "it refuses as draining"])
def test_p_failing_before_the_first_token_runs_the_request_on_d(how: str) -> None:
    async def scenario() -> None:
        t = await pd_mesh()
        if how == "its stream fails":
            t.p.chunks, t.p.fail = [], Unavailable("Socket closed (from the stage at p-s0:1)")
        elif how == "its attach fails":
            t.p.attach_error = Unavailable("Socket closed (from the stage at p-s0:1)")
        else:
            t.p.draining = True
        t.d.chunks = chunks([5], [6, 7], [8])  # a plain request on D: every token
        out = await collect(t.m.router.generate(PROMPT, SamplingParams(max_tokens=4)))
        assert [d.token_ids for d in out] == [(5,), (6, 7), (8,)] and out[-1].finish_reason == "length"
        assert out[-1].usage is not None and out[-1].usage.completion_tokens == 4
        (plain,) = t.d.requests
        assert plain.handoff is None and plain.prompt_ids == PROMPT
        await t.settled()
        tid = t.transfer_id()
        assert ("abort", tid, None) in t.d.handoff_calls and ("abort", tid, None) in t.p.handoff_calls
        assert t.sink.outcomes == ["aggregated_fallback"]

    run(scenario)


@pytest.mark.parametrize("d_tokens", [0, 1], ids=["before its first token", "after its first token"])
def test_d_failing_after_the_first_token_is_unavailable_naming_it(d_tokens: int) -> None:
    async def scenario() -> None:
        t = await pd_mesh()
        t.d.chunks = [StageChunk((6,))][:d_tokens]
        t.d.fail = Unavailable("Socket closed (from the stage at d-s0:1)")
        seen: list[Delta] = []
        with pytest.raises(Unavailable, match="replica d failed: Socket closed") as err:
            async for delta in t.m.router.generate(PROMPT):
                seen.append(delta)
        assert "p->d" not in str(err.value)  # it names the one that failed
        assert [d.token_ids for d in seen] == [(5,), (6,)][: 1 + d_tokens]
        await t.settled()
        assert t.d.calls("abort")  # whatever D still held of the transfer
        assert t.sink.outcomes == ["handoff" if d_tokens else "failed"]

    run(scenario)


def test_p_failing_after_its_first_token_is_unavailable_naming_it() -> None:
    async def scenario() -> None:
        t = await pd_mesh()
        t.p.handoff_chunks = [StageChunk((5,))]  # then its stream ends: no hand-off, no finish
        seen: list[Delta] = []
        with pytest.raises(Unavailable, match="replica p failed: its stream ended early"):
            async for delta in t.m.router.generate(PROMPT):
                seen.append(delta)
        assert [d.token_ids for d in seen] == [(5,)] and not t.d.requests
        await t.settled()
        assert t.d.calls("abort") and t.p.calls("abort")
        assert t.sink.outcomes == ["failed"]

    run(scenario)


@pytest.mark.parametrize("stage", ["reserving", "after the first token", "decoding"])
@pytest.mark.parametrize("how", ["task cancelled", "reader closes"])
def test_a_client_cancel_at_any_stage_cancels_every_open_stream_and_aborts_d(stage: str, how: str) -> None:
    async def scenario() -> None:
        t = await pd_mesh()
        wanted = 0  # deltas the reader gets before it goes away
        if stage == "reserving":
            t.d.reserve_gate = asyncio.Event()  # D never answers: P waits for its target
        elif stage == "after the first token":
            t.p.handoff_chunks, t.p.hang, wanted = [StageChunk((5,))], True, 1
        else:
            t.d.chunks, t.d.hang, wanted = [StageChunk((6,))], True, 2
        got: list[Delta] = []
        enough = asyncio.Event()

        async def reader() -> None:
            async for delta in t.m.router.generate(PROMPT):
                got.append(delta)
                if len(got) == wanted:
                    enough.set()

        if how == "task cancelled":
            task = asyncio.create_task(reader())
            if wanted:
                await enough.wait()
            await asyncio.sleep(0.01)  # the reader now waits on an upstream
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            agen = t.m.router.generate(PROMPT)
            for _ in range(wanted):
                got.append(await anext(agen))
            if not wanted:
                first = asyncio.ensure_future(anext(agen))
                await asyncio.sleep(0.01)
                first.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await first
            await agen.aclose()
        assert len(got) == wanted
        open_stream = t.d.streams[0] if stage == "decoding" else t.p.streams[0]
        assert open_stream.cancelled
        await t.settled()
        tid = t.transfer_id()
        assert t.d.calls("abort") == [("abort", tid, None)]
        assert bool(t.p.calls("abort")) is (stage != "decoding")  # done with it once it handed off
        assert t.sink.outcomes == ["handoff" if stage == "decoding" else "cancelled"]

    run(scenario)


def test_the_registry_is_a_soft_dependency() -> None:
    async def scenario() -> None:
        t = await pd_mesh(registry_fails=True)
        with capture_logs() as logs:
            for _ in range(3):
                out = await collect(t.m.router.generate(PROMPT))
                assert [d.token_ids for d in out] == [(5,), (6, 7), (8,)]
            await t.transfers.drain(1.0)
        warnings = [e for e in logs if e["log_level"] == "warning"]
        assert len(warnings) == 1 and "transfer records unavailable" in warnings[0]["event"]
        assert t.sink.outcomes == ["handoff"] * 3

    run(scenario)


def test_a_short_prompt_is_not_disaggregated() -> None:
    async def scenario() -> None:
        t = await pd_mesh()
        t.d.chunks = chunks([5], [6])
        out = await collect(t.m.router.generate((1, 2)))  # 2 tokens <= 2: D runs it whole
        assert out[0].replica == "d" and [d.token_ids for d in out] == [(5,), (6,)]
        assert not t.p.requests and t.d.requests[0].handoff is None
        assert not t.d.handoff_calls and not t.records.opened and not t.sink.outcomes

    run(scenario)


def test_a_decode_replica_refusing_as_draining_is_skipped_for_another() -> None:
    async def scenario() -> None:
        t = await pd_mesh()
        t.m.registry.views["d2"] = view("d2", role="decode")
        await t.m.replicas.refresh()
        d2 = t.m.head("d2")
        t.m.replicas.replicas["d2"].outstanding = 1  # busier: d is chosen first
        t.p.chunks, t.p.fail = [], Unavailable("Socket closed (from the stage at p-s0:1)")
        t.d.draining = True  # the monitor has not seen it yet
        d2.chunks = chunks([5], [6])
        out = await collect(t.m.router.generate(PROMPT))
        assert out[0].replica == "p->d2" and [d.token_ids for d in out] == [(5,), (6,)]
        assert t.m.replicas.replicas["d"].draining and not t.m.replicas.replicas["p"].draining
        t.m.replicas.replicas["d2"].outstanding -= 1
        await t.settled()

    run(scenario)


def test_the_router_metrics_count_outcomes_and_the_gap_between_first_tokens() -> None:
    metrics = RouterMetrics("fake")
    transfers = Transfers(sink=metrics)
    transfers.ended("handoff")
    transfers.ended("handoff")
    transfers.ended("cancelled")
    transfers.latency(0.02)
    reg = metrics.registry

    def count(outcome: str) -> float | None:
        return reg.get_sample_value(
            "trellis_router_handoffs_total", {"model_name": "fake", "outcome": outcome}
        )

    assert (count("handoff"), count("cancelled"), count("failed")) == (2, 1, 0)  # every outcome shown
    assert reg.get_sample_value("trellis_router_handoff_seconds_count", {"model_name": "fake"}) == 1
