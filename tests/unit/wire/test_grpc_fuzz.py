"""Property-based fuzz of the router's and the stage's gRPC APIs: every answer is OK or a status of
the tree with a one-line detail, never UNKNOWN / INTERNAL, and the servers keep serving.

The real RouterServicer over the in-process fake stages (tests/fake_stages.py) and the real
StageWorkerServicer over a fake service, each served by build_server on 127.0.0.1; one event loop in
a thread for all examples. Cases: TRELLIS_FUZZ_EXAMPLES per test (200 here; the nightly size 10000).
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import grpc
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from services.router.servicer import RouterServicer
from services.stage_worker.service import StageService
from services.stage_worker.servicer import StageWorkerServicer
from tests.fake_stages import chunks, mesh
from trellis.core.request import RequestLimits
from trellis.core.stage_api import StageStats
from trellis.runtime.head import TokenDelta
from trellis.v1 import router_pb2, router_pb2_grpc, sampling_pb2, stage_pb2, stage_pb2_grpc
from trellis.wire.server import WireServer, build_server

EXAMPLES = int(os.environ.get("TRELLIS_FUZZ_EXAMPLES", "200"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,  # no .hypothesis/ left in the tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
ANSWERS = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAVAILABLE,
}
METHODS = {  # path -> (streams?, request type)
    "/trellis.v1.Router/Generate": (True, "trellis.v1.GenerateRequest"),
    "/trellis.v1.Router/Info": (False, "trellis.v1.InfoRequest"),
    "/trellis.v1.StageWorker/Submit": (True, "trellis.v1.SubmitRequest"),
    "/trellis.v1.StageWorker/Stats": (False, "trellis.v1.StatsRequest"),
    "/trellis.v1.StageWorker/Drain": (False, "trellis.v1.DrainRequest"),
}
UNEXPECTED = re.compile(r"[A-Z]\w* failed: \w+: ")  # server.py's detail for an unexpected exception
T = TypeVar("T")


class _Stream:
    seq_id = 1

    async def __aiter__(self) -> AsyncIterator[TokenDelta]:
        yield TokenDelta((5,), True, "length")


class _Head:
    def submit(self, prompt_ids: list[int], sampling: object) -> _Stream:
        return _Stream()

    def abort(self, seq_id: int) -> None:
        pass


@dataclass
class _Engine:
    drain_grace_s: float = 1.0


@dataclass
class _Launch:
    replica: str = "r1"
    stage: int = 0
    engine: _Engine = field(default_factory=_Engine)


class _Service:
    """What StageWorkerServicer reads of a StageService: a ready head with one token per request."""

    is_head, ready, draining = True, True, False
    limits = RequestLimits(vocab_size=512, max_model_len=64)
    launch = _Launch()
    head = _Head()

    def stats(self) -> StageStats:
        return StageStats(replica="r1", stage=0, ready=True)

    async def drain(self, timeout: float) -> bool:
        return True  # a no-op here, so a fuzzed Drain leaves the fake serving


@dataclass
class Served:
    loop: asyncio.AbstractEventLoop
    channel: grpc.aio.Channel

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    async def call(self, method: str, data: bytes) -> tuple[grpc.StatusCode, str]:
        stream, _ = METHODS[method]
        try:
            if stream:
                _ = [r async for r in self.channel.unary_stream(method)(data, timeout=10)]
            else:
                await self.channel.unary_unary(method)(data, timeout=10)
        except grpc.aio.AioRpcError as e:
            return e.code(), e.details() or ""
        return grpc.StatusCode.OK, ""


@pytest.fixture(scope="module")
def served(demo_tokenizer: Tokenizer) -> Iterator[Served]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> tuple[WireServer, grpc.aio.Channel]:
        limits = RequestLimits(vocab_size=demo_tokenizer.get_vocab_size(), max_model_len=256)
        m = await mesh(tokenizer=demo_tokenizer, limits=limits)
        m.head("r1").chunks = chunks((5,), (6,))
        router, stage = RouterServicer(m.router), StageWorkerServicer(cast(StageService, _Service()))

        def register(server: grpc.aio.Server) -> None:
            router_pb2_grpc.add_RouterServicer_to_server(router, server)
            stage_pb2_grpc.add_StageWorkerServicer_to_server(stage, server)

        server = build_server("127.0.0.1", 0, register)
        await server.start()
        await server.set_serving(True)
        return server, grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")

    server, channel = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=30)
    s = Served(loop, channel)
    yield s
    s.run(channel.close())
    s.run(server.stop(None))
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)


def _check(code: grpc.StatusCode, detail: str, method: str, data: bytes) -> None:
    event(f"{method.rsplit('/', 1)[-1]}: {code.name}")  # --hypothesis-show-statistics: the mix
    assert code in ANSWERS, (method, data, code, detail)
    if code != grpc.StatusCode.OK:
        assert detail and "\n" not in detail, (method, data, code, detail)
        # The interceptor's words for an exception nobody expected: a bug, whatever its status.
        assert not UNEXPECTED.match(detail), (method, data, code, detail)


int32 = st.integers(-(2**31), 2**31 - 1)
float32 = st.floats(width=32)  # nan and the infinities included
texts = st.text(max_size=40)


@st.composite
def sampling(draw: st.DrawFn) -> sampling_pb2.SamplingParams:
    m = sampling_pb2.SamplingParams(
        temperature=draw(float32),
        top_k=draw(int32),
        stop_token_ids=draw(st.lists(int32, max_size=4)),
        ignore_eos=draw(st.booleans()),
    )
    for name, values in (("top_p", float32), ("seed", st.integers(0, 2**64 - 1)), ("max_tokens", int32)):
        if draw(st.booleans()):
            setattr(m, name, draw(values))
    if draw(st.booleans()):
        m.logprobs = draw(st.one_of(st.integers(-2, 24), int32))
    return m


@st.composite
def generate_requests(draw: st.DrawFn) -> router_pb2.GenerateRequest:
    r = router_pb2.GenerateRequest(request_id=draw(texts), stop=draw(st.lists(texts, max_size=3)))
    which = draw(st.sampled_from(["none", "text", "ids"]))
    if which == "text":
        r.text = draw(st.text(max_size=200))
    elif which == "ids":
        r.token_ids.SetInParent()
        r.token_ids.ids.extend(draw(st.lists(st.one_of(st.integers(-2, 600), int32), max_size=300)))
    if draw(st.booleans()):
        r.sampling.CopyFrom(draw(sampling()))
    return r


@st.composite
def submit_requests(draw: st.DrawFn) -> stage_pb2.SubmitRequest:
    return stage_pb2.SubmitRequest(
        request_id=draw(texts),
        prompt_ids=draw(st.lists(st.one_of(st.integers(-2, 600), int32), max_size=100)),
        sampling=draw(sampling()),
    )


@FUZZ
@given(method=st.sampled_from(sorted(METHODS)), data=st.binary(max_size=300))
def test_raw_bytes_on_every_method(served: Served, method: str, data: bytes) -> None:
    code, detail = served.run(served.call(method, data))
    _check(code, detail, method, data)
    if code == grpc.StatusCode.INVALID_ARGUMENT and "not a valid" in detail:
        assert f"not a valid {METHODS[method][1]}: " in detail


@FUZZ
@given(request=generate_requests(), cut=st.integers(0, 8), flip=st.integers(0, 255), at=st.integers(0))
def test_generate_well_formed_and_mutated(
    served: Served, request: router_pb2.GenerateRequest, cut: int, flip: int, at: int
) -> None:
    data = request.SerializeToString()
    code, detail = served.run(served.call("/trellis.v1.Router/Generate", data))
    _check(code, detail, "/Generate", data)
    if data:  # the same bytes corrupted: cut short, one byte changed
        mutated = bytearray(data[: max(0, len(data) - cut)] or data)
        mutated[at % len(mutated)] ^= flip
        code, detail = served.run(served.call("/trellis.v1.Router/Generate", bytes(mutated)))
        _check(code, detail, "/Generate (mutated)", bytes(mutated))


@FUZZ
@given(request=submit_requests())
def test_submit_well_formed(served: Served, request: stage_pb2.SubmitRequest) -> None:
    data = request.SerializeToString()
    code, detail = served.run(served.call("/trellis.v1.StageWorker/Submit", data))
    _check(code, detail, "/Submit", data)


def test_still_serving_after_the_fuzz(served: Served) -> None:
    good = router_pb2.GenerateRequest(token_ids=router_pb2.TokenIds(ids=[1, 2, 3])).SerializeToString()
    assert served.run(served.call("/trellis.v1.Router/Generate", good)) == (grpc.StatusCode.OK, "")
    good = stage_pb2.SubmitRequest(prompt_ids=[1, 2]).SerializeToString()
    assert served.run(served.call("/trellis.v1.StageWorker/Submit", good)) == (grpc.StatusCode.OK, "")
