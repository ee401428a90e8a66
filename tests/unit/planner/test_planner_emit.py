"""--emit-spec: the best plan as a deploy spec that trellis.core.spec loads back unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest

from trellis.core.spec import load
from trellis.planner.calibration import default_calibration
from trellis.planner.emit import build_spec, emit_spec
from trellis.planner.errors import PlanError
from trellis.planner.hardware import cluster_from_args, parse_cluster
from trellis.planner.model import load_model
from trellis.planner.search import Plan, PlanOptions, make_plan
from trellis.planner.workload import Lengths, Workload

W = Workload(Lengths("fixed", 1024), Lengths("fixed", 256))


def _plan(model: str, cluster: object, **options: object) -> Plan:
    return make_plan(load_model(model), cluster, W, default_calibration(), PlanOptions(**options))  # type: ignore


def test_one_node_plan_runs_on_localhost_and_round_trips(tmp_path: Path) -> None:
    p = _plan("llama-3-70b", cluster_from_args("h100-sxm"), tp=4, pp=1)
    assert p.best is not None
    spec = emit_spec(p, p.best, tmp_path / "spec.yaml", base_port=40000)
    assert load(tmp_path / "spec.yaml") == spec
    assert spec.model.preset == "llama-3-70b" and spec.model.load_format == "dummy"
    assert spec.router.port == 40000 and spec.router.host == "127.0.0.1"
    (r0, r1) = spec.replicas
    assert [s.gpus for s in (*r0.stages, *r1.stages)] == [(0, 1, 2, 3), (4, 5, 6, 7)]
    # Router, then per stage: control port, 4 UCX ports, torch.distributed port.
    assert (r0.stages[0].port, r0.stages[0].ucx_port, r0.stages[0].dist_port) == (40001, 40002, 40006)
    assert (r1.stages[0].port, r1.stages[0].ucx_port, r1.stages[0].dist_port) == (40007, 40008, 40012)
    assert spec.engine.max_num_batched_tokens == 2048
    spec.check_layers(80)


def test_multi_node_plan_names_hosts_and_places_stages(tmp_path: Path) -> None:
    p = _plan("llama-3.1-405b", cluster_from_args("h100-sxm", 4), tp=8, pp=2)
    assert p.best is not None
    spec = build_spec(p, p.best)
    assert [[s.host for s in r.stages] for r in spec.replicas] == [["node-0", "node-1"], ["node-2", "node-3"]]
    assert all(s.gpus == tuple(range(8)) for r in spec.replicas for s in r.stages)
    spec.check_layers(126)
    spec.dump(tmp_path / "s.yaml")
    assert load(tmp_path / "s.yaml") == spec
    ports = [spec.router.port] + [
        x
        for r in spec.replicas
        for s in r.stages
        for x in (s.port, *range(s.ucx_port, s.ucx_port + s.tp), s.dist_port)
    ]
    assert len(ports) == len(set(ports)) and ports == sorted(ports)


def test_cluster_file_host_names_and_split_roles(tmp_path: Path) -> None:
    cluster = parse_cluster({"gpu": "h100-sxm", "hosts": ["a", "b", "c", "d"]})
    p = _plan("llama-3.1-405b", cluster, tp=8, pp=2, pd_split=True)
    split = next(c for c in p.candidates if c.layout.split and c.usable)
    spec = build_spec(p, split)
    assert [r.role for r in spec.replicas] == ["prefill", "decode"]
    assert spec.replicas[1].stages[0].host == "c" and spec.kv_store is not None
    spec.dump(tmp_path / "s.yaml")
    assert load(tmp_path / "s.yaml") == spec


def test_model_path_and_fp8_and_port_range(tmp_path: Path) -> None:
    p = _plan("llama-3-8b", cluster_from_args("h100-sxm"), tp=1, pp=1)
    assert p.best is not None
    with pytest.raises(PlanError, match="past 65535"):
        build_spec(p, p.best, base_port=65530)
    fp8 = _plan("llama-3-8b", cluster_from_args("h100-sxm"), tp=1, pp=1, weight_dtype="fp8")
    with pytest.raises(PlanError, match="no fp8 weights"):
        build_spec(fp8, fp8.best)  # type: ignore[arg-type]
