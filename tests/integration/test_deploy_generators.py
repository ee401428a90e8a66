"""`trellis deploy {compose,systemd,k8s}` output passes the real validators (`docker-compose config`,
`systemd-analyze verify`, kubernetes-validate against the Kubernetes schemas), and the very
commands the generated units run (their ExecStart lines, with their EnvironmentFiles) serve a
request on this host; the compose file's commands are the same ones."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.deploy_checks import check_compose_files, check_systemd_units, deploy, k8s_documents
from trellis.core.spec import load
from trellis.deploy import compose
from trellis.deploy.local_spec import local_spec
from trellis.wire.router_client import RouterClient

pytestmark = pytest.mark.timeout(400)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "deploy" / "examples"
START_TIMEOUT_S = 240.0
# Presets (no weights on disk): one host with GPUs; 4 DP replicas x 2 hosts each; a Redis registry.
SPECS = ["gpu-8b-tp2.yaml", "plan-llama-3.1-405b-64xh100.yaml", "redis"]


def spec_file(name: str, tmp_path: Path) -> Path:
    if name != "redis":
        return EXAMPLES / name
    raw = yaml.safe_load((EXAMPLES / "gpu-8b-tp2.yaml").read_text())
    raw["registry"] = "redis://127.0.0.1:6390/0"
    out = tmp_path / "redis-spec.yaml"
    out.write_text(yaml.safe_dump(raw))
    return out


@pytest.mark.parametrize("name", SPECS)
def test_compose_files_pass_docker_compose_config(name: str, tmp_path: Path) -> None:
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose is not installed (scripts/ensure-tools.sh installs it)")
    out = deploy("compose", spec_file(name, tmp_path), tmp_path / "out")
    files = sorted(out.rglob("docker-compose.yaml"))
    assert files
    check_compose_files(files)


@pytest.mark.parametrize("name", SPECS)
def test_systemd_units_pass_systemd_analyze_verify(name: str, tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    check_systemd_units(deploy("systemd", spec_file(name, tmp_path), tmp_path / "out"))


@pytest.mark.parametrize("name", SPECS)
def test_k8s_manifests_pass_kubernetes_validate(name: str, tmp_path: Path) -> None:
    docs = k8s_documents(deploy("k8s", spec_file(name, tmp_path), tmp_path / "out"))
    assert {"ConfigMap", "Service", "StatefulSet", "Deployment"} <= {d["kind"] for d in docs}


# ---- running what the units run ------------------------------------------------------------------


def env_file(path: Path) -> dict[str, str]:
    """A systemd EnvironmentFile as the generator writes it (KEY=VALUE, optional double quotes)."""
    out = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            key, value = line.split("=", 1)
            out[key] = value.strip('"')
    return out


def unit_command(unit_dir: Path, unit: str) -> tuple[list[str], dict[str, str]]:
    """A unit's ExecStart and environment, as systemd expands them (%i; $VAR split on whitespace)."""
    template, _, instance = unit.partition("@")
    path = unit_dir / (f"{template}@.service" if instance else unit)
    text = path.read_text().replace("%i", instance.removesuffix(".service"))
    env: dict[str, str] = {}
    for f in re.findall(r"^EnvironmentFile=(.*)$", text, re.M):
        optional, f = f.startswith("-"), f.removeprefix("-")
        if not (optional and not Path(f).exists()):
            env.update(env_file(Path(f)))
    (exec_start,) = re.findall(r"^ExecStart=(.*)$", text, re.M)
    argv = [w for word in exec_start.split() for w in (env[word[1:]].split() if word[0] == "$" else [word])]
    return argv, env


def test_the_generated_commands_serve_a_request(demo_dir: Path, tmp_path: Path) -> None:
    spec_path = tmp_path / "spec.yaml"
    local_spec(str(demo_dir), replicas=1, stages=2, tp=1).dump(spec_path)
    units = deploy("systemd", spec_path, tmp_path / "units")
    wants = re.search(r"^Wants=(.*)$", (units / "trellis.target").read_text(), re.M).group(1).split()
    commands = [unit_command(units, u) for u in wants]  # the stages, then the router
    assert len(commands) == 3 and commands[-1][0][2] == "services.router"

    # The compose file runs the same commands (its interpreter and mount point aside).
    composed = yaml.safe_load(
        (deploy("compose", spec_path, tmp_path / "compose") / "docker-compose.yaml").read_text()
    )
    swap = {compose.CONTAINER_PYTHON: sys.executable, compose.CONTAINER_SPEC: str(units / "spec.yaml")}
    assert [[swap.get(w, w) for w in s["command"]] for s in composed["services"].values()] == [
        c[0] for c in commands
    ]

    spec = load(units / "spec.yaml")
    procs: list[subprocess.Popen] = []
    try:
        for i, (argv, env) in enumerate(commands):
            log = open(tmp_path / f"{i}.log", "wb")  # noqa: SIM115 - the child holds it
            procs.append(
                subprocess.Popen(
                    argv,
                    env={**os.environ, "TRELLIS_LOG_LEVEL": "WARNING", **env},
                    cwd="/",  # as systemd starts them: nothing found through the working directory
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                )
            )
            log.close()
        # Ready when the compose healthchecks pass (the same command, on the host network).
        checks = [
            [swap.get(w, w) for w in s["healthcheck"]["test"][1:]] for s in composed["services"].values()
        ]
        end = time.monotonic() + START_TIMEOUT_S
        while pending := [c for c in checks if subprocess.run(c, capture_output=True).returncode != 0]:
            dead = [(i, p.returncode) for i, p in enumerate(procs) if p.poll() is not None]
            assert not dead, f"exited: {dead}: {(tmp_path / f'{dead[0][0]}.log').read_text()[-2000:]}"
            assert time.monotonic() < end, f"not healthy after {START_TIMEOUT_S:.0f} s: {pending}"
            time.sleep(1.0)
        with RouterClient(f"127.0.0.1:{spec.router.port}") as client:
            end = time.monotonic() + 60
            while not (info := client.info()).replicas or not all(s.alive for s in info.replicas[0].stages):
                assert time.monotonic() < end, "the router does not see the replica"
                time.sleep(0.2)
            done = client.generate("Pipeline parallelism gives each node", max_tokens=8)
        assert done.token_ids and done.finish_reason in ("length", "stop")
    finally:
        for p in reversed(procs):  # the router first, as systemd stops trellis.target's units
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    assert [p.returncode for p in procs] == [0, 0, 0]  # SIGTERM drains and exits 0
