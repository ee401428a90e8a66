"""A spec with `kv_store:` deploys with the store: `trellis deploy {compose,systemd,k8s}` output
passes the real validators (`docker-compose config`, `systemd-analyze verify`, kubernetes-validate),
and `trellis up` serves on when the store dies (once services.kv_store exists to run)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import yaml

from tests.deploy_checks import check_compose_files, check_systemd_units, deploy, k8s_documents
from tests.mesh_fixtures import running_mesh
from trellis.core.spec import KVStoreSpec
from trellis.deploy.local_spec import local_spec
from trellis.deploy.processes import has_entry_point
from trellis.wire.router_client import RouterClient

pytestmark = pytest.mark.timeout(400)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "deploy" / "examples" / "cpu-kv-store.yaml"
GIB = 1 << 30


def spec_file(name: str, tmp_path: Path) -> Path:
    """The example (on a preset: the deploy command checks the model, and the demo one may not be
    built); with a sized disk tier (a claim in k8s); on GPU hosts, the store with one of them."""
    raw = yaml.safe_load(EXAMPLE.read_text())
    raw["model"] = {"preset": "llama-3-8b", "load_format": "dummy", "dtype": "float32"}
    for rep in raw["replicas"]:
        rep["stages"] = [{**rep["stages"][0], "layers": [0, 32]}]
    if name == "disk":
        raw["kv_store"] |= {"disk_path": str(tmp_path / "kv-disk"), "disk_capacity_bytes": 8 * GIB}
    elif name == "gpu-two-hosts":  # the store with one replica's stage, the router with the other's
        for i, rep in enumerate(raw["replicas"]):
            rep["stages"] = [{**rep["stages"][0], "device": "cuda", "gpus": [0], "host": f"10.0.0.{5 + i}"}]
        raw["kv_store"]["host"] = "10.0.0.5"
        raw["router"]["host"] = "10.0.0.6"
    out = tmp_path / f"{name}.yaml"
    out.write_text(yaml.safe_dump(raw))
    return out


SPECS = ["example", "disk", "gpu-two-hosts"]


@pytest.mark.parametrize("name", SPECS)
def test_compose_with_a_store_passes_docker_compose_config(name: str, tmp_path: Path) -> None:
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose is not installed (scripts/ensure-tools.sh installs it)")
    out = deploy("compose", spec_file(name, tmp_path), tmp_path / "out")
    files = sorted(out.rglob("docker-compose.yaml"))
    assert any("kv-store:" in f.read_text() for f in files)
    check_compose_files(files)


@pytest.mark.parametrize("name", SPECS)
def test_systemd_with_a_store_passes_systemd_analyze_verify(name: str, tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    out = deploy("systemd", spec_file(name, tmp_path), tmp_path / "out")
    assert list(out.rglob("trellis-kv-store.service"))
    check_systemd_units(out)


@pytest.mark.parametrize("name", SPECS)
def test_k8s_with_a_store_passes_kubernetes_validate(name: str, tmp_path: Path) -> None:
    docs = k8s_documents(deploy("k8s", spec_file(name, tmp_path), tmp_path / "out"))
    assert ("StatefulSet", "trellis-kv-store") in {(d["kind"], d["metadata"]["name"]) for d in docs}


@pytest.mark.skipif(not has_entry_point("services.kv_store"), reason="services.kv_store is not built yet")
def test_trellis_up_serves_on_when_the_store_dies(demo_dir: Path, tmp_path: Path) -> None:
    spec = local_spec(str(demo_dir), replicas=1, kv_store=KVStoreSpec(capacity_bytes=64 << 20))
    warnings: list[str] = []
    with running_mesh(spec, log_dir=tmp_path / "logs") as mesh:
        mesh.warn = warnings.append
        store = mesh.kv_store
        assert store is not None and store.alive()
        store.proc.kill()
        store.proc.wait()
        assert mesh.tend() is None and "kv-store exited with code" in warnings[0]
        with RouterClient(mesh.router.address) as client:
            done = client.generate("Pipeline parallelism gives each node", max_tokens=4)
        assert done.token_ids
        end = time.monotonic() + 30
        while not store.alive():  # restarted after the backoff
            assert mesh.tend() is None and time.monotonic() < end
            time.sleep(0.2)
