"""The metrics over fakes: the router's request families move by exactly what each request did (and
each request logs one line), the stage collector reports its stats (blocks add up, the bubble over
an interval), the /metrics server answers and refuses a taken port, and the OTLP exporter sends."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from tests.fake_stages import chunks, collect, mesh
from trellis.core.errors import ConfigError, DeadlineExceeded, Unavailable
from trellis.core.net import free_ports
from trellis.core.sampling import SamplingParams
from trellis.core.telemetry import setup_tracing, step_tracer
from trellis.metrics.http_server import start_metrics_server
from trellis.metrics.stage_collector import StageCollector
from trellis.routing.stage_client import StageChunk


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    found = registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def r1(outcome: str = "", **more: str) -> dict[str, str]:
    labels = {"model_name": "fake", "replica": "r1", **more}
    return {**labels, "outcome": outcome} if outcome else labels


# ---- the router's request families ----------------------------------------------------------------


def test_finished_requests_count_their_tokens_latencies_and_outcome_once() -> None:
    async def scenario() -> None:
        m = await mesh()
        m.head("r1").chunks = chunks([5], [6, 7], [8], finish="length")
        reg = m.router.metrics.registry
        with capture_logs() as logs:
            for i in range(3):
                await collect(m.router.generate((1, 2, 3), SamplingParams(max_tokens=4), request_id=f"q{i}"))
        assert value(reg, "trellis:requests_total", **r1("ok")) == 3
        assert value(reg, "trellis:request_success_total", **r1(finished_reason="length")) == 3
        assert value(reg, "trellis:prompt_tokens_total", **r1()) == 9
        assert value(reg, "trellis:generation_tokens_total", **r1()) == 12
        assert value(reg, "trellis:time_to_first_token_seconds_count", **r1()) == 3
        # The first delta's token is the TTFT; the 3 after it are inter-token gaps, per request.
        assert value(reg, "trellis:inter_token_latency_seconds_count", **r1()) == 9
        assert value(reg, "trellis:e2e_request_latency_seconds_count", **r1()) == 3
        assert value(reg, "trellis:e2e_request_latency_seconds_sum", **r1()) > 0
        assert value(reg, "trellis:num_requests_running", model_name="fake") == 0
        assert value(reg, "trellis:num_requests_waiting", model_name="fake") == 0
        lines = [e for e in logs if e["event"] == "request finished"]
        assert [e["request_id"] for e in lines] == ["q0", "q1", "q2"]
        line = lines[0]
        assert line["log_level"] == "info" and line["replica"] == "r1" and line["outcome"] == "ok"
        assert (line["prompt_tokens"], line["completion_tokens"], line["finish_reason"]) == (3, 4, "length")
        assert 0 <= line["ttft_ms"] <= line["duration_ms"]

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("fail", "outcome"),
    [(Unavailable("the ring broke"), "unavailable"), (DeadlineExceeded("too slow"), "deadline")],
)
def test_a_request_that_fails_upstream_counts_by_its_error(fail: Exception, outcome: str) -> None:
    async def scenario() -> None:
        m = await mesh()
        m.head("r1").chunks, m.head("r1").fail = [StageChunk((5,))], fail
        with capture_logs() as logs, pytest.raises(type(fail)):
            await collect(m.router.generate((1, 2), request_id="bad"))
        reg = m.router.metrics.registry
        assert value(reg, "trellis:requests_total", **r1(outcome)) == 1
        assert value(reg, "trellis:requests_total", **r1("ok")) == 0
        assert value(reg, "trellis:e2e_request_latency_seconds_count", **r1()) == 0  # it never finished
        assert value(reg, "trellis:generation_tokens_total", **r1()) == 1
        assert value(reg, "trellis:num_requests_running", model_name="fake") == 0
        (line,) = [e for e in logs if e["event"] == "request finished"]
        assert line["outcome"] == outcome and str(fail) in line["error"]

    asyncio.run(scenario())


def test_refused_requests_count_without_a_replica() -> None:
    async def scenario() -> None:
        m = await mesh(max_queue=0)
        reg = m.router.metrics.registry
        with capture_logs() as logs:
            for prompt in [(1, 2), (10_000,)]:  # admission refuses the first, validation the second
                with pytest.raises(Exception):  # noqa: B017 (the outcome label says which)
                    await collect(m.router.generate(prompt))
        refused = {"model_name": "fake", "replica": ""}
        assert value(reg, "trellis:requests_total", **refused, outcome="overloaded") == 1
        assert value(reg, "trellis:requests_total", **refused, outcome="invalid") == 1
        assert value(reg, "trellis:prompt_tokens_total", **refused) == 0
        assert value(reg, "trellis:num_requests_waiting", model_name="fake") == 0
        lines = [e for e in logs if e["event"] == "request finished"]
        assert [e["outcome"] for e in lines] == ["overloaded", "invalid"]
        assert all(len(e["request_id"]) == 32 and "replica" not in e for e in lines)  # ids made here

    asyncio.run(scenario())


def test_a_reader_that_leaves_counts_as_cancelled_and_the_gauges_follow() -> None:
    async def scenario() -> None:
        m = await mesh()
        m.head("r1").chunks, m.head("r1").hang = [StageChunk((5,))], True
        reg = m.router.metrics.registry
        stream = m.router.generate((1, 2, 3), request_id="gone")
        await anext(stream)
        assert value(reg, "trellis:num_requests_running", model_name="fake") == 1
        assert value(reg, "trellis:num_requests_waiting", model_name="fake") == 0
        await stream.aclose()
        assert value(reg, "trellis:num_requests_running", model_name="fake") == 0
        assert value(reg, "trellis:requests_total", **r1("cancelled")) == 1
        assert m.head("r1").streams[0].cancelled  # and the upstream request was freed

    asyncio.run(scenario())


# ---- the stage collector --------------------------------------------------------------------------


@dataclass(frozen=True)
class Figures:
    num_blocks: int = 100
    free_blocks: int = 70
    running: int = 3
    waiting: int = 2
    prefix_query_tokens: int = 40
    prefix_hit_tokens: int = 16
    preemptions: int = 1
    stage_busy_s: tuple[float, ...] = ()
    handoff_bytes_sent: int = 4096
    handoff_bytes_received: int = 128
    handoff_seconds: float = 0.25
    store_loaded_blocks: int = 12
    store_voided_loads: int = 1
    store_committed_blocks: int = 30
    store_errors: int = 2
    pd_prefills: int = 5
    pd_fallbacks: int = 1
    pd_blocks_sent: int = 40
    pd_reserved: int = 0
    pd_committed: int = 0
    pd_recomputed: int = 0
    pd_voided: int = 0
    pd_blocks_loaded: int = 0


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


Key = tuple[str, tuple[tuple[str, str], ...]]


def key(name: str, labels: tuple[tuple[str, str], ...]) -> Key:
    return name, tuple(sorted(labels))


def scrape(registry: CollectorRegistry) -> dict[Key, float]:
    """The registry as exposed and parsed back: {(sample name, sorted labels): value}."""
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out[key(s.name, tuple(s.labels.items()))] = s.value
    return out


def test_the_head_reports_its_scheduler_blocks_prefix_cache_and_bubble() -> None:
    figures = [Figures(stage_busy_s=(0.5, 0.3))]
    clock = FakeClock()
    registry = CollectorRegistry()
    registry.register(StageCollector(lambda: figures[0], model_name="m", replica="r0", stage=0, clock=clock))
    me = (("model_name", "m"), ("replica", "r0"), ("stage", "0"))

    clock.now = 1.0  # 0.8 busy seconds of 2 stages x 1 s
    got = scrape(registry)
    assert got[key("trellis:kv_cache_blocks", (*me, ("state", "used")))] == 30
    assert got[key("trellis:kv_cache_blocks", (*me, ("state", "free")))] == 70
    assert got[key("trellis:kv_cache_usage_perc", me)] == pytest.approx(0.3)
    assert (
        got[key("trellis:num_requests_running", me)] == 3
        and got[key("trellis:num_requests_waiting", me)] == 2
    )
    assert got[key("trellis:prefix_cache_queries_total", me)] == 40
    assert got[key("trellis:prefix_cache_hits_total", me)] == 16
    assert got[key("trellis:num_preemptions_total", me)] == 1
    assert got[key("trellis:kv_store_loaded_blocks_total", me)] == 12
    assert got[key("trellis:kv_store_voided_loads_total", me)] == 1
    assert got[key("trellis:pd_blocks_sent_total", me)] == 40
    assert got[key("trellis:kv_store_committed_blocks_total", me)] == 30
    assert got[key("trellis:kv_store_errors_total", me)] == 2
    assert got[key("trellis:stage_busy_seconds_total", me)] == 0.5
    assert got[key("trellis:stage_busy_seconds_total", (*me[:2], ("stage", "1")))] == 0.3
    assert got[key("trellis:handoff_bytes_total", (*me, ("direction", "sent")))] == 4096
    assert got[key("trellis:handoff_bytes_total", (*me, ("direction", "received")))] == 128
    assert got[key("trellis:handoff_seconds_total", me)] == 0.25
    assert got[key("trellis:pipeline_bubble", me[:2])] == pytest.approx(0.6)

    figures[0] = Figures(stage_busy_s=(1.5, 1.3))  # both stages busy all of the next 1 s
    clock.now = 1.5  # too soon: the last interval's value stays
    assert scrape(registry)[key("trellis:pipeline_bubble", me[:2])] == pytest.approx(0.6)
    clock.now = 2.0
    assert scrape(registry)[key("trellis:pipeline_bubble", me[:2])] == pytest.approx(0.0)


def test_a_later_stage_reports_only_its_handoff() -> None:
    registry = CollectorRegistry()
    registry.register(StageCollector(lambda: Figures(), model_name="m", replica="r0", stage=1))
    names = {name for name, _ in scrape(registry)}
    assert names == {"trellis:handoff_bytes_total", "trellis:handoff_seconds_total"}


# ---- the /metrics server --------------------------------------------------------------------------


def test_the_metrics_server_serves_the_registry_and_refuses_a_taken_port() -> None:
    async def scenario() -> None:
        registry = CollectorRegistry()
        registry.register(StageCollector(lambda: Figures(), model_name="m", replica="r0", stage=1))
        assert await start_metrics_server("127.0.0.1", 0, registry, where="x.metrics_port") is None
        (port,) = free_ports(1)
        server = await start_metrics_server("127.0.0.1", port, registry, where="x.metrics_port")
        assert server is not None and server.port == port
        try:

            def get(path: str) -> tuple[int, str]:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                        return r.status, r.read().decode()
                except urllib.error.HTTPError as e:
                    return e.code, ""

            status, body = await asyncio.to_thread(get, "/metrics")
            assert status == 200
            families = {f.name for f in text_string_to_metric_families(body)}
            assert "trellis:handoff_bytes" in families
            assert (await asyncio.to_thread(get, "/elsewhere"))[0] == 404
            with pytest.raises(ConfigError, match=rf"x\.metrics_port: 127\.0\.0\.1:{port} is already in use"):
                await start_metrics_server("127.0.0.1", port, registry, where="x.metrics_port")
        finally:
            await server.close()

    asyncio.run(scenario())


# ---- traces ---------------------------------------------------------------------------------------


def test_tracing_is_off_unless_asked_and_a_bad_mode_is_one_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRELLIS_TRACE", raising=False)
    assert step_tracer("x") is None  # the step loops then make no span at all
    monkeypatch.setenv("TRELLIS_TRACE", "jaeger")
    with pytest.raises(ConfigError, match="TRELLIS_TRACE: expected 'console' or 'otlp'"):
        setup_tracing("t")
    assert step_tracer("x") is not None


def test_otlp_sends_the_spans_to_the_collector() -> None:
    received: list[tuple[str, bytes]] = []

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append((self.path, self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    env = {
        **os.environ,
        "TRELLIS_TRACE": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{httpd.server_address[1]}",
    }
    code = (
        "from trellis.core.telemetry import setup_tracing, step_tracer, flush_tracing\n"
        "setup_tracing('trellis-test')\n"
        "step_tracer('t').start_span('stage.step', attributes={'step_id': 7}).end()\n"
        "flush_tracing()\n"
    )
    try:
        subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
    finally:
        httpd.shutdown()
    assert [path for path, _ in received] == ["/v1/traces"]
    assert b"stage.step" in received[0][1] and b"trellis-test" in received[0][1]
