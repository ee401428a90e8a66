"""/metrics of a real mesh (1 replica x 2 stages): after a known number of requests the router's and
the stages' counters moved by exactly what those requests did, the KV block gauges add up to the
head's blocks, each request left one INFO log line, and a taken metrics port is one error line."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.mesh_fixtures import head_address, running_mesh, stage_stats
from trellis.core.net import free_ports
from trellis.core.spec import DeploySpec
from trellis.deploy.local_spec import local_spec
from trellis.deploy.mesh import Mesh
from trellis.wire.router_client import RouterClient

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14]]
MAX_TOKENS = 6

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def spec_with_metrics(ckpt: Path) -> DeploySpec:
    spec = local_spec(str(ckpt), replicas=1, stages=2, tp=1)
    router_port, *stage_ports = free_ports(3)
    rep = spec.replicas[0]
    stages = tuple(
        dataclasses.replace(st, metrics_port=p) for st, p in zip(rep.stages, stage_ports, strict=True)
    )
    return dataclasses.replace(
        spec,
        router=dataclasses.replace(spec.router, metrics_port=router_port),
        replicas=(dataclasses.replace(rep, stages=stages),),
    )


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def get(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module")
def mesh(plain_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Mesh, Path]]:
    logs = tmp_path_factory.mktemp("metrics-logs")
    with running_mesh(spec_with_metrics(plain_ckpt), env={"TRELLIS_LOG_LEVEL": "INFO"}, log_dir=logs) as m:
        yield m, logs


def test_counters_move_by_exactly_the_requests_served(mesh: tuple[Mesh, Path]) -> None:
    m, logs = mesh
    spec = m.spec
    router_port = spec.router.metrics_port
    head_port, last_port = (st.metrics_port for st in spec.replicas[0].stages)
    replica, model = spec.replicas[0].name, spec.model.name
    served = {"model_name": model, "replica": replica}
    head = {**served, "stage": "0"}
    last = {**served, "stage": "1"}
    before = {port: scrape(port) for port in (router_port, head_port, last_port)}

    with RouterClient(m.router.address) as client:
        for i, prompt in enumerate(PROMPTS):
            out = client.generate(prompt, max_tokens=MAX_TOKENS, ignore_eos=True, request_id=f"m{i}")
            assert len(out.token_ids) == MAX_TOKENS
        with pytest.raises(grpc.RpcError) as refused:
            client.generate([10**6], max_tokens=2, request_id="m-bad")  # a token id past the vocabulary
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    after = {port: scrape(port) for port in (router_port, head_port, last_port)}

    def moved(port: int, name: str, **labels: str) -> float:
        return get(after[port], name, **labels) - get(before[port], name, **labels)

    n, prompt_tokens = len(PROMPTS), sum(map(len, PROMPTS))
    assert moved(router_port, "trellis:requests_total", **served, outcome="ok") == n
    assert moved(router_port, "trellis:requests_total", model_name=model, replica="", outcome="invalid") == 1
    assert moved(router_port, "trellis:request_success_total", **served, finished_reason="length") == n
    assert moved(router_port, "trellis:prompt_tokens_total", **served) == prompt_tokens
    assert moved(router_port, "trellis:generation_tokens_total", **served) == n * MAX_TOKENS
    assert moved(router_port, "trellis:time_to_first_token_seconds_count", **served) == n
    assert moved(router_port, "trellis:e2e_request_latency_seconds_count", **served) == n
    assert moved(router_port, "trellis:inter_token_latency_seconds_count", **served) == n * (MAX_TOKENS - 1)
    assert get(after[router_port], "trellis:num_requests_running", model_name=model) == 0
    assert get(after[router_port], "trellis:num_requests_waiting", model_name=model) == 0

    # The head: its scheduler, the whole prompt looked up in the prefix cache once per request.
    assert moved(head_port, "trellis:prefix_cache_queries_total", **head) == prompt_tokens
    assert moved(head_port, "trellis:num_preemptions_total", **head) == 0
    num_blocks = stage_stats(head_address(m, replica)).num_blocks
    used = get(after[head_port], "trellis:kv_cache_blocks", **head, state="used")
    free = get(after[head_port], "trellis:kv_cache_blocks", **head, state="free")
    assert num_blocks > 0 and used + free == num_blocks and free > 0
    assert get(after[head_port], "trellis:num_requests_running", **head) == 0
    for stage in ("0", "1"):
        assert moved(head_port, "trellis:stage_busy_seconds_total", **served, stage=stage) > 0
    assert 0.0 <= get(after[head_port], "trellis:pipeline_bubble", **served) <= 1.0

    # The hand-off: what the head sent on its link, the last stage received; nothing came back as
    # payload (no logits were asked for), and the sends took time.
    sent = moved(head_port, "trellis:handoff_bytes_total", **head, direction="sent")
    assert sent > 0 and sent == moved(last_port, "trellis:handoff_bytes_total", **last, direction="received")
    assert moved(last_port, "trellis:handoff_bytes_total", **last, direction="sent") == 0
    assert moved(head_port, "trellis:handoff_seconds_total", **head) > 0
    assert moved(last_port, "trellis:handoff_seconds_total", **last) > 0
    assert not any(name.startswith("trellis:kv_cache") for name, _ in after[last_port])

    lines = [
        json.loads(line) for line in (logs / "router.log").read_text().splitlines() if line.startswith("{")
    ]
    done = {e["request_id"]: e for e in lines if e.get("event") == "request finished"}
    assert {f"m{i}" for i in range(n)} | {"m-bad"} <= done.keys()
    first = done["m0"]
    assert first["level"] == "info"
    assert (first["replica"], first["prompt_tokens"], first["completion_tokens"]) == (replica, 3, MAX_TOKENS)
    assert first["outcome"] == "ok" and first["finish_reason"] == "length"
    assert 0 < first["ttft_ms"] <= first["duration_ms"]
    assert done["m-bad"]["outcome"] == "invalid" and "vocab" in done["m-bad"]["error"]


@pytest.mark.parametrize("service", ["router", "stage_worker"])
def test_a_taken_metrics_port_is_one_error_line_and_exit_2(
    service: str, plain_ckpt: Path, tmp_path: Path
) -> None:
    spec = spec_with_metrics(plain_ckpt)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    if service == "router":
        spec = dataclasses.replace(spec, router=dataclasses.replace(spec.router, metrics_port=port))
        where, args = "router.metrics_port", []
    else:
        rep = spec.replicas[0]
        stages = (dataclasses.replace(rep.stages[0], metrics_port=port), *rep.stages[1:])
        spec = dataclasses.replace(spec, replicas=(dataclasses.replace(rep, stages=stages),))
        where, args = "replicas[0].stages[0].metrics_port", ["--replica", "0", "--stage", "0"]
    path = tmp_path / "spec.yaml"
    spec.dump(path)
    try:
        done = subprocess.run(
            [sys.executable, "-m", f"services.{service}", "--spec", str(path), *args],
            capture_output=True,
            text=True,
            timeout=120,
            env={
                **{k: v for k, v in os.environ.items() if k != "TRELLIS_TRACE"},
                "TRELLIS_LOG_LEVEL": "WARNING",
            },
        )
    finally:
        taken.close()
    assert done.returncode == 2, done.stderr
    busy = f"{where}: 127.0.0.1:{port} is already in use; pick a free port (or 0 for no /metrics)"
    assert done.stderr.strip() == f"{service}: error: {busy}"
