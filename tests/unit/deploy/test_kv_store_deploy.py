"""A spec with `kv_store:` runs the KV store everywhere Trellis runs: one process described once
(first to start, last to stop, its own ports and gRPC health), which `trellis up` starts before
the stage workers and serves on without, and which compose, systemd and Kubernetes render as a
service of their own with its shared memory; `trellis serve --kv-store-bytes N` makes that spec.
Nothing here runs the store (the validators and a real `trellis up` are in
tests/integration/test_kv_store_deploy.py)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from trellis.cli.main import build_parser
from trellis.cli.serve import build_spec
from trellis.cli.up import host_problem
from trellis.core.errors import ConfigError, SpecError
from trellis.core.spec import DeploySpec, KVStoreSpec, load, parse
from trellis.deploy import compose, k8s, mesh, systemd
from trellis.deploy.local_spec import local_spec, spec_ports
from trellis.deploy.mesh import Mesh, Service
from trellis.deploy.processes import KV_SHM_MARGIN_BYTES, by_machine, processes_for

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = ROOT / "deploy" / "examples"
KV_EXAMPLE = EXAMPLES / "cpu-kv-store.yaml"
PY = "/opt/py/bin/python3"
GIB = 1 << 30


def kv_spec(**kv: object) -> DeploySpec:
    """Two CPU replicas of two stages and a KV store of 2 GiB, on one host."""
    stage = {"tp": 1, "device": "cpu", "host": "10.0.0.5"}
    reps = [
        {
            "name": f"r{r}",
            "stages": [
                {**stage, "layers": [0, 16], "port": 7001 + 20 * r, "ucx_port": 7002 + 20 * r},
                {**stage, "layers": [16, 32], "port": 7011 + 20 * r, "ucx_port": 7012 + 20 * r},
            ],
        }
        for r in range(2)
    ]
    store = {"host": "10.0.0.5", "port": 7100, "metrics_port": 7101, "capacity_bytes": 2 * GIB, **kv}
    return parse(
        {
            "model": {"preset": "llama-3-8b", "load_format": "dummy"},
            "replicas": reps,
            "router": {"host": "10.0.0.5", "port": 7000, "policy": "kv-aware"},
            "kv_store": store,
        }
    )


# ---- the process description -----------------------------------------------------------------------


def test_the_store_is_the_first_process_with_its_ports_and_health() -> None:
    procs = processes_for(kv_spec(ucx_port=7102), "/s.yaml", cpu_count=8)
    assert [p.kind for p in procs] == ["kv_store", "stage", "stage", "stage", "stage", "router"]
    store = procs[0]
    assert (store.name, store.slug) == ("kv-store", "kv-store")
    assert store.argv("py") == ["py", "-m", "services.kv_store", "--spec", "/s.yaml"]
    assert store.ports.named() == {"grpc": 7100, "metrics": 7101, "ucx-0": 7102}
    assert store.health.address == "10.0.0.5:7100"
    assert not store.gpus and store.replica is None
    assert list(by_machine(procs)) == ["10.0.0.5"]


def test_a_store_without_a_port_is_one_line_naming_the_field() -> None:
    spec = kv_spec(port=0)
    with pytest.raises(SpecError, match=r"^kv_store\.port: not set \(0\)"):
        processes_for(spec, "/s.yaml")
    assert host_problem(spec).startswith("kv_store.port: not set (0)")


def test_the_store_ports_are_checked_before_start() -> None:
    assert ("kv_store.port", "10.0.0.5", 7100) in list(spec_ports(kv_spec()))
    assert ("kv_store.metrics_port", "10.0.0.5", 7101) in list(spec_ports(kv_spec()))


# ---- trellis up ----------------------------------------------------------------------------------


class FakeProc:
    """A child that records its signals in `log` and exits on SIGTERM (or when told to)."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log, self.code = name, log, None

    def poll(self) -> int | None:
        return self.code

    def send_signal(self, sig: int) -> None:
        self.log.append(f"{signal.Signals(sig).name} {self.name}")

    def wait(self, timeout: float | None = None) -> int:
        self.log.append(f"exited {self.name}")
        self.code = 0
        return 0

    def kill(self) -> None:
        self.code = -9


@pytest.fixture
def store_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mesh, "has_entry_point", lambda module: True)


def fake_mesh(tmp_path: Path, warnings: list[str], log: list[str]) -> Mesh:
    m = Mesh(kv_spec(), spec_path=tmp_path / "s.yaml", warn=warnings.append)

    def start(svc: Service) -> None:
        log.append(f"start {svc.name}")
        svc.proc = FakeProc(svc.name, log)

    m.start_service = start  # type: ignore[method-assign]
    return m


def test_trellis_up_starts_the_store_first_and_stops_it_last(
    tmp_path: Path, store_installed: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    warnings: list[str] = []
    log: list[str] = []
    m = fake_mesh(tmp_path, warnings, log)
    procs = processes_for(m.spec, str(tmp_path / "s.yaml"))
    assert [(s.name, s.address, s.module, s.args) for s in m.services] == [
        (p.name, p.health.address, p.module, list(p.args)) for p in procs
    ]
    assert m.kv_store is m.services[0] and m.kv_store not in m.essential
    waited: list[str] = []
    monkeypatch.setattr(mesh, "health", lambda address: waited.append(address) or True)
    ready: list[str] = []
    m.start(progress=ready.append)
    assert log[0] == "start kv-store" and waited == ["10.0.0.5:7100"]  # serving before any stage starts
    assert ready == ["kv-store serving at 10.0.0.5:7100"]
    assert log[1:] == [f"start {s.name}" for s in [*m.stages, m.router]]
    log.clear()
    m.stop(timeout=5)
    assert log.index("exited kv-store") == len(log) - 1  # after every worker exited
    assert log.index("SIGTERM kv-store") > max(log.index(f"exited {s.name}") for s in m.stages)
    assert not warnings


def test_a_store_that_does_not_serve_in_time_lets_the_workers_start(
    tmp_path: Path, store_installed: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    warnings: list[str] = []
    log: list[str] = []
    m = fake_mesh(tmp_path, warnings, log)
    monkeypatch.setattr(mesh, "health", lambda address: False)
    m.start(kv_ready_s=0.2)
    assert log[-1] == "start router"
    assert warnings == [
        "kv-store not serving at 10.0.0.5:7100 after 0s: starting the stage workers anyway "
        "(they use the store once it serves)"
    ]


def test_the_store_dying_is_a_warning_and_a_restart_after_a_backoff(
    tmp_path: Path, store_installed: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    warnings: list[str] = []
    log: list[str] = []
    m = fake_mesh(tmp_path, warnings, log)
    monkeypatch.setattr(mesh, "health", lambda address: True)
    m.start()
    clock = [1000.0]
    monkeypatch.setattr(mesh.time, "monotonic", lambda: clock[0])
    m._kv_started_at = clock[0]
    for delay in (1, 2, 4):
        m.kv_store.proc.code = 3  # the store dies
        assert m.tend() is None  # the mesh serves on
        assert warnings[-1].startswith("kv-store exited with code 3: serving on without it")
        assert warnings[-1].endswith(f"restarting it in {delay}s")
        clock[0] += delay - 0.5
        assert m.tend() is None and not m.kv_store.alive()  # not yet
        clock[0] += 0.5
        assert m.tend() is None and m.kv_store.alive()
        assert log[-1] == "start kv-store"
    clock[0] += mesh.KV_STABLE_S + 1  # up long enough: the backoff starts over
    m.kv_store.proc.code = 3
    m.tend()
    assert warnings[-1].endswith("restarting it in 1s")
    m.stages[1].proc.code = 1  # a stage's death is the mesh's
    assert m.tend() is m.stages[1]


def test_without_the_store_installed_trellis_up_serves_without_it(tmp_path: Path) -> None:
    warnings: list[str] = []
    m = Mesh(kv_spec(), spec_path=tmp_path / "s.yaml", warn=warnings.append)
    if mesh.has_entry_point("services.kv_store"):
        assert m.kv_store is not None and not warnings
    else:
        assert m.kv_store is None and "services.kv_store is not installed here" in warnings[0]
        assert [s.name for s in m.services][-1] == "router"


def test_run_mesh_serves_on_when_the_store_dies(tmp_path: Path) -> None:
    """The run loop's test: Mesh.tend (the loop stops only on what it returns)."""
    svc = Service("kv-store", "127.0.0.1:1", "json.tool", ["--nope"])
    svc.proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    svc.proc.wait()
    m = Mesh(kv_spec(), spec_path=tmp_path / "s.yaml", warn=lambda msg: None)
    m.kv_store = svc
    m.start_service = lambda s: None  # type: ignore[method-assign]
    assert m.tend() is None  # the stages and the router never started: nothing essential died


# ---- the generators ------------------------------------------------------------------------------


def test_compose_gives_the_store_a_service_and_its_shared_memory_to_the_workers() -> None:
    spec = kv_spec(disk_path="/var/lib/trellis-kv")
    procs = processes_for(spec, compose.CONTAINER_SPEC)
    text = compose.render(spec, procs, image="img")["docker-compose.yaml"]
    doc = yaml.safe_load(text)
    services = doc["services"]
    assert next(iter(services)) == "kv-store"
    store = services["kv-store"]
    assert store["command"] == procs[0].argv(compose.CONTAINER_PYTHON)
    assert store["healthcheck"]["test"][-1] == "10.0.0.5:7100"
    assert store["labels"] == {"trellis.port.grpc": "7100", "trellis.port.metrics": "7101"}
    assert "kv-shm:/dev/shm" in store["volumes"]
    assert "/var/lib/trellis-kv:/var/lib/trellis-kv" in store["volumes"]
    assert "deploy" not in store and "depends_on" not in store
    for p in procs[1:-1]:
        svc = services[p.slug]
        assert "kv-shm:/dev/shm" in svc["volumes"]
        assert "/var/lib/trellis-kv:/var/lib/trellis-kv" not in svc["volumes"]  # the store's alone
        assert svc["depends_on"] == {"kv-store": {"condition": "service_started"}}  # never healthy
    router = services["router"]
    assert "kv-store" not in router["depends_on"] and "kv-shm:/dev/shm" not in router["volumes"]
    opts = doc["volumes"]["kv-shm"]["driver_opts"]
    assert opts == {"type": "tmpfs", "device": "tmpfs", "o": f"size={2 * GIB + KV_SHM_MARGIN_BYTES}"}
    assert "service_healthy" in text and "never wait for its health" in text


def test_compose_with_a_store_elsewhere_mounts_no_shared_memory() -> None:
    spec = replace(kv_spec(), kv_store=replace(kv_spec().kv_store, host="10.0.0.9"))
    files = compose.render(spec, processes_for(spec, compose.CONTAINER_SPEC), image="img")
    here = yaml.safe_load(files["10.0.0.5/docker-compose.yaml"])
    assert "volumes" not in here and all("depends_on" not in s for s in list(here["services"].values())[:-1])
    there = yaml.safe_load(files["10.0.0.9/docker-compose.yaml"])
    assert list(there["services"]) == ["kv-store"] and "kv-shm" in there["volumes"]


def test_systemd_gives_the_store_a_unit_the_stages_start_after(tmp_path: Path) -> None:
    spec = kv_spec()
    procs = processes_for(spec, systemd.spec_path(tmp_path))
    files = systemd.render(spec, procs, install_dir=tmp_path, python=PY)
    unit = files["trellis-kv-store.service"]
    assert f"ExecStart={PY} -m services.kv_store --spec {tmp_path}/spec.yaml" in unit
    assert "Restart=on-failure" in unit and f"EnvironmentFile={tmp_path}/env/kv-store.env" in unit
    template = files["trellis-stage@.service"]
    assert "After=network-online.target trellis-kv-store.service" in template
    assert "Wants=network-online.target trellis-kv-store.service" in template  # soft: no Requires=
    assert "Requires=" not in template and "BindsTo=" not in template
    assert "trellis-kv-store" not in files["trellis-router.service"]
    wants = next(ln for ln in files["trellis.target"].splitlines() if ln.startswith("Wants="))
    assert wants.split("=", 1)[1].split()[0] == "trellis-kv-store.service"
    assert "env/kv-store.env" in files


def test_k8s_gives_the_store_its_own_pod_memory_and_a_warning() -> None:
    view = k8s.cluster_view(kv_spec(disk_path="/var/lib/kv", disk_capacity_bytes=100 * GIB), "ml")
    assert view.kv_store.host == "trellis-kv-store-0.trellis-kv-store.ml.svc.cluster.local"
    assert parse(view.to_dict()) == view
    procs = processes_for(view, k8s.CONTAINER_SPEC)
    files = k8s.render(view, procs, image="img", namespace="ml")
    text = files["kv-store.yaml"]
    assert text.startswith("# WARNING: the KV store is read through shared memory")
    assert "the store must run in the same pod" in text and "shared memory does not cross pods" in text
    sts, svc = yaml.safe_load_all(text)
    assert (sts["kind"], sts["metadata"]["name"], sts["spec"]["replicas"]) == (
        "StatefulSet",
        "trellis-kv-store",
        1,
    )
    assert sts["spec"]["serviceName"] == svc["metadata"]["name"] == "trellis-kv-store"
    pod = sts["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == procs[0].argv(k8s.CONTAINER_PYTHON)
    assert container["readinessProbe"]["grpc"] == {"port": 7100}
    assert {"name": "kv-shm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert {"name": "kv-disk", "mountPath": "/var/lib/kv"} in container["volumeMounts"]
    shm = next(v for v in pod["volumes"] if v["name"] == "kv-shm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "3072Mi"}  # 2 GiB + the margin
    assert container["resources"]["limits"]["memory"] == "4096Mi"  # and the process itself
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "kv-disk"
    assert claim["spec"]["resources"]["requests"]["storage"] == f"{101 * 1024}Mi"
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"]
    assert svc["metadata"]["annotations"]["prometheus.io/port"] == "7101"
    stage = yaml.safe_load_all(files["stage-r0-stage-0.yaml"]).__next__()
    assert "kv-shm" not in str(stage)


def test_k8s_disk_tier_without_a_size_is_an_empty_dir() -> None:
    view = k8s.cluster_view(kv_spec(disk_path="/var/lib/kv"), "ml")
    sts, _ = yaml.safe_load_all(
        k8s.render(view, processes_for(view, k8s.CONTAINER_SPEC), image="i")["kv-store.yaml"]
    )
    assert "volumeClaimTemplates" not in sts["spec"]
    assert {"name": "kv-disk", "emptyDir": {}} in sts["spec"]["template"]["spec"]["volumes"]


@pytest.mark.parametrize("example", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_spec_loads_and_renders(example: Path, tmp_path: Path) -> None:
    spec = load(example)
    assert parse(spec.to_dict()) == spec
    assert compose.render(spec, processes_for(spec, compose.CONTAINER_SPEC), image="i")
    assert systemd.render(
        spec, processes_for(spec, systemd.spec_path(tmp_path)), install_dir=tmp_path, python=PY
    )
    view = k8s.cluster_view(spec)
    assert k8s.render(view, processes_for(view, k8s.CONTAINER_SPEC), image="i")


def test_the_kv_store_example_is_two_cpu_replicas_with_a_kv_aware_router() -> None:
    spec = load(KV_EXAMPLE)
    assert len(spec.replicas) == 2 and all(st.device == "cpu" for r in spec.replicas for st in r.stages)
    assert spec.router.policy == "kv-aware" and spec.registry == "embedded"
    assert spec.kv_store is not None and spec.kv_store.port
    assert next(p.kind for p in processes_for(spec, "/s.yaml")) == "kv_store"


# ---- trellis serve -------------------------------------------------------------------------------


def serve_args(*flags: str):
    return build_parser().parse_args(
        ["serve", "--preset", "llama-3-8b", "--device", "cpu", "--dp", "2", *flags]
    )


def test_serve_kv_store_flags_build_the_spec(tmp_path: Path) -> None:
    disk = tmp_path / "kv"
    spec = build_spec(
        serve_args(
            "--kv-store-bytes",
            str(4 * GIB),
            "--kv-store-disk",
            str(disk),
            "--kv-store-disk-bytes",
            str(64 * GIB),
            "--kv-write-policy",
            "write-through",
            "--router-policy",
            "kv-aware",
        )
    )
    kv = spec.kv_store
    assert kv is not None
    assert (kv.capacity_bytes, kv.disk_path, kv.disk_capacity_bytes) == (4 * GIB, str(disk), 64 * GIB)
    assert kv.write_policy == "write-through" and spec.router.policy == "kv-aware"
    assert kv.host == "127.0.0.1" and kv.port and kv.ucx_port == 0
    ports = [port for _, _, port in spec_ports(spec) if port]
    assert len(ports) == len(set(ports))  # placed apart from every other
    assert parse(spec.to_dict()) == spec  # what --write-spec writes, `trellis up` reads
    assert next(p.kind for p in processes_for(spec, "/s.yaml")) == "kv_store"


def test_serve_without_kv_store_bytes_has_no_store() -> None:
    spec = build_spec(serve_args())
    assert spec.kv_store is None and spec.router.policy == "least-load"
    assert KVStoreSpec().write_policy == "second-use"
    spec = build_spec(serve_args("--kv-store-bytes", str(GIB)))
    assert spec.kv_store.write_policy == "second-use" and spec.kv_store.disk_path is None


@pytest.mark.parametrize(
    ("flags", "error"),
    [
        (["--kv-store-disk", "/x"], "--kv-store-disk needs --kv-store-bytes N"),
        (["--kv-write-policy", "write-through"], "--kv-write-policy needs --kv-store-bytes N"),
        (
            ["--kv-store-bytes", "1024", "--kv-store-disk-bytes", "5"],
            "--kv-store-disk-bytes needs --kv-store-disk",
        ),
        (["--kv-store-bytes", "-1"], "--kv-store-bytes must be >= 0"),
    ],
)
def test_serve_kv_store_flags_that_cannot_be_are_one_line(flags: list[str], error: str) -> None:
    with pytest.raises(ConfigError, match=f"^{error}"):
        build_spec(serve_args(*flags))


def test_serve_help_names_the_kv_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    out = capsys.readouterr().out
    for flag in (
        "--kv-store-bytes",
        "--kv-store-disk",
        "--kv-store-disk-bytes",
        "--kv-write-policy",
        "--router-policy",
    ):
        assert flag in out


def test_local_spec_places_the_store_metrics_port_when_asked() -> None:
    spec = local_spec(preset="llama-3-8b", replicas=2, metrics=True, kv_store=KVStoreSpec(capacity_bytes=GIB))
    assert spec.kv_store.metrics_port and spec.kv_store.port
    ports = [port for _, _, port in spec_ports(spec) if port]
    assert len(ports) == len(set(ports))


def test_a_store_refusing_its_configuration_is_not_restarted(
    tmp_path: Path, store_installed: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    warnings: list[str] = []
    log: list[str] = []
    m = fake_mesh(tmp_path, warnings, log)
    monkeypatch.setattr(mesh, "health", lambda address: True)
    m.start()
    m.kv_store.proc.code = 2  # `kv_store: error: ...` (a slab that does not fit, a port taken)
    clock = [time.monotonic()]
    monkeypatch.setattr(mesh.time, "monotonic", lambda: clock[0])
    for _ in range(3):
        assert m.tend() is None
        clock[0] += 1000
    assert len(warnings) == 1 and "not restarting it" in warnings[0]
    assert log.count("start kv-store") == 1
