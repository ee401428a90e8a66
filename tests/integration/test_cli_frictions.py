"""Issue 13's frictions, as a user meets them (real subprocesses): each bad start is one line on stderr
that says what to do (a CUDA spec on a CPU host, a busy port, an unknown preset, a hub id, a missing
directory), a signal during start-up stops everything at once, a stage whose successor never comes
up says so while it waits and fails naming the address, and `trellis serve` serves the demo model
over the OpenAI-compatible API (with the key it was given) and gRPC, streaming `generate --router`."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.integration.test_mesh_cli import Lines
from tests.mesh_fixtures import descendants, pid_alive
from trellis.core.engine_config import EngineConfig
from trellis.deploy.local_spec import local_spec

pytestmark = pytest.mark.timeout(300)

PY = sys.executable
ENV = {**os.environ, "TRELLIS_LOG_LEVEL": "WARNING", "TRELLIS_PROGRESS": "0"}
TRELLIS = [PY, "-m", "trellis.cli"]
SERVE_TIMEOUT_S = 180.0


def one_line(cmd: list[str], timeout: float = 120) -> str:
    """Run a command that must fail with exactly one line on stderr; that line."""
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0, done.stdout
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return lines[0]


@pytest.fixture
def listening() -> Iterator[int]:
    """A port some other program listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def stage_cmd(spec: Path, stage: int = 0) -> list[str]:
    return [PY, "-m", "services.stage_worker", "--spec", str(spec), "--replica", "r0", "--stage", str(stage)]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a host without CUDA")
def test_a_cuda_spec_on_a_cpu_host_is_one_line(tmp_path: Path, plain_ckpt: Path) -> None:
    spec = tmp_path / "gpu.yaml"
    local_spec(str(plain_ckpt), stages=2, device="cuda").dump(spec)
    want = "replicas[0].stages[0].device: cuda asked for, but this host has no CUDA GPU; use device: cpu"
    assert one_line([*TRELLIS, "up", str(spec)]).endswith(want)
    assert one_line(stage_cmd(spec)).endswith(want)
    line = one_line([*TRELLIS, "serve", str(plain_ckpt), "--device", "cuda"])
    assert line.endswith("--device cuda: cuda asked for, but this host has no CUDA GPU; use --device cpu")


def test_a_busy_port_is_one_line_naming_the_field(tmp_path: Path, plain_ckpt: Path, listening: int) -> None:
    base = local_spec(str(plain_ckpt), stages=2)
    router_busy, stage_busy = tmp_path / "router.yaml", tmp_path / "stage.yaml"
    dataclasses.replace(base, router=dataclasses.replace(base.router, port=listening)).dump(router_busy)
    st = dataclasses.replace(base.replicas[0].stages[1], port=listening)
    rep = dataclasses.replace(base.replicas[0], stages=(base.replicas[0].stages[0], st))
    dataclasses.replace(base, replicas=(rep,)).dump(stage_busy)
    at = f"cannot listen on 127.0.0.1:{listening}: the port is already in use"
    assert f"error: router.port: {at}" in one_line([*TRELLIS, "up", str(router_busy)])
    assert f"error: router.port: {at}" in one_line([PY, "-m", "services.router", "--spec", str(router_busy)])
    assert f"error: replicas[0].stages[1].port: {at}" in one_line([*TRELLIS, "up", str(stage_busy)])
    assert f"error: replicas[0].stages[1].port: {at}" in one_line(stage_cmd(stage_busy, 1))
    served = one_line([*TRELLIS, "serve", str(plain_ckpt), "--port", str(listening)])
    assert f"error: router.port: {at}" in served


@pytest.mark.parametrize(
    ("model", "words"),
    [
        (["--preset", "nope"], "unknown model preset 'nope'; known presets: llama-3-8b, "),
        (
            ["meta-llama/Llama-3-8B"],
            "meta-llama/Llama-3-8B is not a directory; Trellis loads local checkpoints: "
            "download it first (huggingface-cli download meta-llama/Llama-3-8B",
        ),
        (
            ["/no/such/model"],
            "model path /no/such/model does not exist; give the directory that holds config",
        ),
    ],
    ids=["unknown preset", "hub id", "missing directory"],
)
def test_a_model_that_is_not_there_is_one_line(model: list[str], words: str) -> None:
    assert words in one_line([*TRELLIS, "serve", *model])
    if model[0] != "--preset":  # offline generate: its own line, not "has no tokenizer.json"
        assert words in one_line([*TRELLIS, "generate", "--model", model[0], "a prompt"])


def test_sigterm_during_start_up_stops_everything_at_once(tmp_path: Path, plain_ckpt: Path) -> None:
    spec = tmp_path / "mesh.yaml"
    local_spec(str(plain_ckpt), stages=2, tp=2).dump(spec)
    proc = subprocess.Popen([*TRELLIS, "up", str(spec)], env=ENV, stdout=subprocess.PIPE, text=True)
    lines = Lines(proc)
    lines.wait_for(r"starting 2 stage worker", 60)
    time.sleep(1.0)  # the children are up, importing torch: long before the mesh serves
    children = descendants(proc.pid)
    assert children
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert time.monotonic() - t0 < 15
    lines.wait_for(r"interrupted while starting", 5)
    assert not any("serving: router" in line for line in lines.seen)
    assert [p for p in children if pid_alive(p)] == []


def test_a_stage_whose_successor_never_comes_up_says_so_and_fails(tmp_path: Path, plain_ckpt: Path) -> None:
    spec_obj = local_spec(str(plain_ckpt), stages=2, engine=EngineConfig(link_timeout_s=11))
    spec = tmp_path / "mesh.yaml"
    spec_obj.dump(spec)
    nxt = f"127.0.0.1:{spec_obj.replicas[0].stages[1].ucx_port}"
    t0 = time.monotonic()
    done = subprocess.run(
        stage_cmd(spec), env={**ENV, "TRELLIS_LOG_LEVEL": "INFO"}, capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0 and time.monotonic() - t0 < 60
    assert "Traceback" not in done.stderr, done.stderr
    assert re.search(rf"waiting for stage 1 at {nxt} \(1\d s of 11\)", done.stderr), done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"stage_worker: error: cannot reach stage 1 at {nxt} over UCX within 11 s"), last


def post(url: str, body: dict, key: str | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(url, json.dumps(body).encode(), headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def test_trellis_serve_serves_the_demo_model(tmp_path: Path) -> None:
    written = tmp_path / "served.yaml"
    cmd = [
        *TRELLIS,
        "serve",
        "--api-key",
        "sesame",
        "--served-model-name",
        "demo",
        "--write-spec",
        str(written),
    ]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    lines = Lines(proc)
    try:
        base = lines.wait_for(
            r"OpenAI-compatible API at (\S+) \(model 'demo'\); gRPC at (\S+)", SERVE_TIMEOUT_S
        )
        url, address = base.group(1), base.group(2)
        assert "models" not in url and "sesame" not in written.read_text()  # the key never in the spec
        body = {"model": "demo", "prompt": "Trellis serves", "max_tokens": 8, "temperature": 0}
        assert post(f"{url}/completions", body)[0] == 401
        status, out = post(f"{url}/completions", body, key="sesame")
        assert status == 200 and out["usage"]["completion_tokens"] >= 1, out
        streamed = subprocess.run(
            [*TRELLIS, "generate", "--router", address, "Trellis serves", "--max-tokens", "8"],
            env=ENV,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert streamed.returncode == 0 and streamed.stdout == out["choices"][0]["text"] + "\n", streamed
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            for pid in descendants(proc.pid):
                os.kill(pid, signal.SIGKILL)
            proc.kill()
            proc.wait()


def test_the_demo_goes_through_the_http_api_and_prints_curl() -> None:
    done = subprocess.run(
        [*TRELLIS, "demo", "--max-tokens", "8"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=SERVE_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr
    assert "the same text as over gRPC" in done.stdout, done.stdout
    curl = [line for line in done.stdout.splitlines() if line.startswith("curl -s http://127.0.0.1:8000/v1/")]
    assert len(curl) == 1 and '"max_tokens": 8' in curl[0], done.stdout


def test_progress_bars_only_for_rank_0_at_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    from trellis.runtime.model.loader import show_progress

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    monkeypatch.setenv("TRELLIS_PROGRESS", "1")
    assert show_progress(0) and not show_progress(1)
    monkeypatch.setenv("TRELLIS_PROGRESS", "0")
    assert not show_progress(0)
    monkeypatch.setenv("TRELLIS_PROGRESS", "1")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert not show_progress(0)


def test_serve_plan_lays_the_planners_choice_on_the_gpus() -> None:
    from trellis.cli.serve_plan import gpu_preset, planned_layout

    assert gpu_preset("NVIDIA H200") == "h200" and gpu_preset("NVIDIA H100 80GB HBM3") == "h100-sxm"
    tp, pp, dp = planned_layout("llama-3-70b", 8, gpu_name="NVIDIA H200")
    assert tp * pp * dp <= 8 and tp * pp > 1  # 70B in bf16 does not fit one GPU with room for KV
    assert planned_layout("llama-3-70b", 8, tp=8, gpu_name="NVIDIA H200")[0] == 8
