"""OpenTelemetry: a request's span at the router and its span at the head stage share one trace."""

from __future__ import annotations

import json

from tests.mesh_fixtures import running_mesh
from trellis.deploy.local_spec import local_spec
from trellis.wire.router_client import RouterClient


def spans(path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        if line.startswith("{") and '"trace_id"' in line:
            out.append(json.loads(line))
    return out


def test_router_and_stage_spans_share_a_trace(plain_ckpt, tmp_path) -> None:
    spec = local_spec(str(plain_ckpt), replicas=1, stages=1, tp=1)
    with running_mesh(spec, env={"TRELLIS_TRACE": "console"}, log_dir=tmp_path) as mesh:
        with RouterClient(mesh.router.address) as client:
            out = client.generate([5, 6, 7], max_tokens=4, request_id="traced-1")
        assert len(out.token_ids) == 4
    router = [s for s in spans(tmp_path / "router.log") if s["name"] == "router.generate"]
    stage = [s for s in spans(tmp_path / "r0-stage-0.log") if s["name"] == "stage.submit"]
    assert len(router) == 1 and len(stage) == 1
    assert router[0]["attributes"]["request_id"] == stage[0]["attributes"]["request_id"] == "traced-1"
    assert stage[0]["context"]["trace_id"] == router[0]["context"]["trace_id"]
    assert stage[0]["parent_id"] == router[0]["context"]["span_id"]
    assert stage[0]["attributes"]["generated_tokens"] == 4
