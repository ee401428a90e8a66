"""The deploy generators render the one process description (trellis.deploy.processes) that
`trellis up` runs: same argv, env, ports, health checks and GPUs in every output, specs that the
real spec validator accepts, and no secret in any file. (The external validators and a run of the
generated commands are in tests/integration/test_deploy_generators.py.)"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from trellis.cli.main import main as trellis_main
from trellis.core.errors import SpecError
from trellis.core.net import free_ports
from trellis.core.spec import DeploySpec, load, parse
from trellis.deploy import compose, k8s, systemd
from trellis.deploy.mesh import Mesh
from trellis.deploy.processes import by_machine, isolated_gpus, processes_for

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = ROOT / "deploy" / "examples"
PY = "/opt/py/bin/python3"


def cuda_spec(**router: object) -> DeploySpec:
    """One replica of two TP-2 stages on GPUs 2,3 and 4,5 of one host (ids the containers renumber)."""
    stage = {"tp": 2, "device": "cuda", "host": "10.0.0.5"}
    return parse(
        {
            "model": {"preset": "llama-3-8b", "load_format": "dummy"},
            "replicas": [
                {
                    "name": "r0",
                    "stages": [
                        {**stage, "layers": [0, 16], "gpus": [2, 3], "port": 7001, "ucx_port": 7002},
                        {**stage, "layers": [16, 32], "gpus": [4, 5], "port": 7011, "ucx_port": 7012},
                    ],
                }
            ],
            "router": {"host": "0.0.0.0", "port": 7000, "http_port": 7080, "metrics_port": 7090, **router},
        }
    )


def test_processes_are_the_stages_then_the_router_with_their_ports_and_gpus() -> None:
    procs = processes_for(cuda_spec(), "/s.yaml", "redis://r:6379/0", cpu_count=8)
    assert [(p.name, p.kind) for p in procs] == [
        ("r0/stage-0", "stage"),
        ("r0/stage-1", "stage"),
        ("router", "router"),
    ]
    head, tail, router = procs
    assert head.argv("py") == [
        "py",
        "-m",
        "services.stage_worker",
        "--spec",
        "/s.yaml",
        "--replica",
        "r0",
        "--stage",
        "0",
    ]
    assert router.argv("py") == [
        "py",
        "-m",
        "services.router",
        "--spec",
        "/s.yaml",
        "--registry",
        "redis://r:6379/0",
    ]
    assert tail.ports.ucx == (7012, 7013)  # TP rank r of a multi-stage replica: ucx_port + r
    assert (head.gpus, tail.gpus) == ((2, 3), (4, 5))
    assert router.ports.named() == {"grpc": 7000, "http": 7080, "metrics": 7090}
    assert router.health.address == "127.0.0.1:7000"  # bound on every interface: probed on loopback
    assert head.health.address == "10.0.0.5:7001"
    assert head.environment == {"OMP_NUM_THREADS": "2"}  # 8 cores over 4 ranks; GPUs: no python futures
    assert list(by_machine(procs)) == ["10.0.0.5"]  # the router on 0.0.0.0 runs with the stages


def test_trellis_up_runs_the_described_processes(tmp_path: Path) -> None:
    spec = cuda_spec()
    mesh = Mesh(spec, spec_path=tmp_path / "s.yaml")  # nothing starts until mesh.start()
    procs = processes_for(spec, str(tmp_path / "s.yaml"))
    assert [(s.name, s.address, s.module, s.args, s.env) for s in mesh.services] == [
        (p.name, p.health.address, p.module, list(p.args), p.environment) for p in procs
    ]


def test_isolated_gpus_renumber_each_stage_from_zero_and_still_validate() -> None:
    view = isolated_gpus(cuda_spec())
    assert [st.gpus for st in view.replicas[0].stages] == [(0, 1), (0, 1)]
    assert parse(view.to_dict()) == view


def test_replica_names_that_collide_as_service_names_are_one_line_naming_the_field() -> None:
    raw = cuda_spec().to_dict()
    raw["replicas"].append({**raw["replicas"][0], "name": "R0"})
    raw["replicas"][1]["stages"] = [
        {**st, "port": st["port"] + 100, "ucx_port": st["ucx_port"] + 100}
        for st in raw["replicas"][1]["stages"]
    ]
    with pytest.raises(SpecError, match=r"^replicas\[1\]\.name: 'R0' makes the service name 'r0-stage-0'"):
        processes_for(parse(raw), "/s.yaml")


def test_compose_runs_the_processes_with_their_own_gpus_reserved() -> None:
    spec = cuda_spec()
    procs = processes_for(spec, compose.CONTAINER_SPEC)
    files = compose.render(spec, procs, image="img")
    services = yaml.safe_load(files["docker-compose.yaml"])["services"]
    assert list(services) == ["r0-stage-0", "r0-stage-1", "router"]
    for p in procs:
        svc = services[p.slug]
        assert svc["command"] == p.argv(compose.CONTAINER_PYTHON)
        assert svc["network_mode"] == "host"
        assert svc["healthcheck"]["test"][-1] == p.health.address
        assert "./spec.yaml:/etc/trellis/spec.yaml:ro" in svc["volumes"]
    devices = services["r0-stage-1"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "device_ids": ["4", "5"], "capabilities": ["gpu"]}]
    assert set(services["router"]["depends_on"]) == {"r0-stage-0", "r0-stage-1"}
    assert "deploy" not in services["router"]
    assert "TRELLIS_API_KEY" in services["router"]["environment"]  # passed through, no value
    shipped = parse(yaml.safe_load(files["spec.yaml"]))
    assert shipped == isolated_gpus(spec)


def test_systemd_stage_instances_expand_to_the_processes_argv(tmp_path: Path) -> None:
    spec = cuda_spec()
    procs = processes_for(spec, systemd.spec_path(tmp_path))
    files = systemd.render(spec, procs, install_dir=tmp_path, python=PY)
    template = files["trellis-stage@.service"]
    assert "Restart=on-failure" in template
    assert f"EnvironmentFile={tmp_path}/env/%i.env" in template
    (exec_start,) = re.findall(r"^ExecStart=(.*)$", template, re.M)
    for p in procs[:2]:
        env = dict(
            (k, v.strip('"'))
            for k, v in (ln.split("=", 1) for ln in files[f"env/{p.slug}.env"].splitlines()[1:])
        )
        argv = [
            env["TRELLIS_STAGE_ARGS"].split() if w == "$TRELLIS_STAGE_ARGS" else [w]
            for w in exec_start.split()
        ]
        assert [w for ws in argv for w in ws] == p.argv(PY)
        assert env["CUDA_VISIBLE_DEVICES"] == ",".join(map(str, p.gpus))
    router = files["trellis-router.service"]
    assert f"ExecStart={shlex.join(procs[2].argv(PY))}" in router
    assert (
        "After=network-online.target trellis-stage@r0-stage-0.service trellis-stage@r0-stage-1.service"
        in router
    )
    assert f"EnvironmentFile=-{tmp_path}/secrets.env" in router
    assert (
        "Wants=trellis-stage@r0-stage-0.service trellis-stage@r0-stage-1.service trellis-router.service"
        in (files["trellis.target"])
    )


def test_a_spec_on_several_hosts_gets_files_per_host(tmp_path: Path) -> None:
    spec = load(EXAMPLES / "plan-llama-3.1-405b-64xh100.yaml")
    procs = processes_for(spec, systemd.spec_path(tmp_path))
    units = systemd.render(spec, procs, install_dir=tmp_path, python=PY)
    machines = by_machine(procs)
    assert len(machines) > 1
    for host, mine in machines.items():
        assert sorted(
            n.removeprefix(f"{host}/env/") for n in units if n.startswith(f"{host}/env/")
        ) == sorted(f"{p.slug}.env" for p in mine)
    files = compose.render(spec, processes_for(spec, compose.CONTAINER_SPEC), image="img")
    assert sorted(files) == sorted(["spec.yaml", *(f"{h}/docker-compose.yaml" for h in machines)])


def test_k8s_pods_bind_their_dns_names_request_gpus_and_probe_grpc() -> None:
    view = k8s.cluster_view(cuda_spec(), "ml")
    assert parse(view.to_dict()) == view  # the ConfigMap's spec passes the spec validator
    procs = processes_for(view, k8s.CONTAINER_SPEC)
    docs = [
        d
        for text in k8s.render(view, procs, image="img", namespace="ml", router_replicas=3).values()
        for d in yaml.safe_load_all(text)
    ]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {
        ("StatefulSet", "trellis-r0-stage-0"),
        ("Deployment", "trellis-router"),
        ("Service", "trellis-peers"),
    } <= kinds
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    assert parse(yaml.safe_load(cm["data"]["spec.yaml"])) == view
    (peers,) = [d for d in docs if d["metadata"]["name"] == "trellis-peers"]
    assert peers["spec"]["clusterIP"] == "None" and peers["spec"]["publishNotReadyAddresses"]
    (sts,) = [d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "trellis-r0-stage-1"]
    container = sts["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == procs[1].argv(k8s.CONTAINER_PYTHON)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert container["readinessProbe"]["grpc"] == {"port": 7011}
    assert view.replicas[0].stages[1].host == "trellis-r0-stage-1-0.trellis-peers.ml.svc.cluster.local"
    (router,) = [d for d in docs if d["kind"] == "Deployment"]
    assert router["spec"]["replicas"] == 3
    env = router["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {
        "name": "TRELLIS_API_KEY",
        "valueFrom": {"secretKeyRef": {"name": "trellis-api-key", "key": "api-key"}},
    } in env


@pytest.mark.parametrize("target", ["compose", "systemd", "k8s"])
def test_no_secret_reaches_a_generated_file(
    target: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRELLIS_API_KEY", "sk-do-not-write-me")
    spec_file = tmp_path / "spec.yaml"
    cuda_spec().dump(spec_file)
    assert trellis_main(["deploy", target, str(spec_file), "-o", str(tmp_path / "out")]) == 0
    written = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert written and not [p for p in written if "sk-do-not-write-me" in p.read_text()]


def test_a_bad_spec_is_one_line_naming_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    raw = cuda_spec().to_dict()
    raw["replicas"][0]["stages"][1]["layers"] = [17, 32]
    bad.write_text(yaml.safe_dump(raw))
    out = subprocess.run(
        [sys.executable, "-m", "trellis.cli", "deploy", "k8s", str(bad), "-o", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        "trellis: error: replicas[0].stages[1].layers: starts at 17, expected 16 "
        "(stages must tile the layers in order)"
    ]
    assert not (tmp_path / "o").exists()


def test_the_images_provide_the_interpreter_the_files_run() -> None:
    for variant in ("cpu", "cuda"):
        text = (ROOT / "deploy" / "docker" / f"Dockerfile.{variant}").read_text()
        venv = re.search(r"^ENV VENV=(\S+)", text, re.M).group(1)
        assert f"{venv}/bin/python" == compose.CONTAINER_PYTHON == k8s.CONTAINER_PYTHON
        assert "make proto" in text and '.[cpu]"' in text
        assert compose.image_variant(compose.default_image(cuda_spec())) == "cuda"


def test_the_healthcheck_fails_where_nothing_serves() -> None:
    (port,) = free_ports(1)
    out = subprocess.run(
        [sys.executable, "-m", "trellis.deploy.healthcheck", f"127.0.0.1:{port}", "--timeout", "0.5"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert out.stderr.startswith(f"healthcheck: 127.0.0.1:{port}: UNAVAILABLE")
