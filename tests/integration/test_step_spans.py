"""Traces per stage step: with TRELLIS_TRACE set, the head spans each step it schedules (naming the
sequences in it) and every later stage spans its part of the same steps (by step id), so a request's
trace (router -> head `stage.submit`) leads to the steps that served it on each stage."""

from __future__ import annotations

from pathlib import Path

from tests.integration.test_tracing import spans
from tests.mesh_fixtures import running_mesh
from trellis.deploy.local_spec import local_spec
from trellis.wire.router_client import RouterClient


def test_every_stage_spans_each_step_and_the_head_names_its_sequences(
    plain_ckpt: Path, tmp_path: Path
) -> None:
    spec = local_spec(str(plain_ckpt), replicas=1, stages=2, tp=1)
    with running_mesh(spec, env={"TRELLIS_TRACE": "console"}, log_dir=tmp_path) as mesh:
        with RouterClient(mesh.router.address) as client:
            out = client.generate([5, 6, 7], max_tokens=4, ignore_eos=True, request_id="stepped")
        assert len(out.token_ids) == 4
    head_spans = spans(tmp_path / "r0-stage-0.log")
    (submit,) = [s for s in head_spans if s["name"] == "stage.submit"]
    head_steps = [s for s in head_spans if s["name"] == "head.step"]
    later_steps = [s for s in spans(tmp_path / "r0-stage-1.log") if s["name"] == "stage.step"]
    seq_id = submit["attributes"]["seq_id"]
    ours = {s["attributes"]["step_id"] for s in head_steps if seq_id in s["attributes"]["seq_ids"]}
    assert len(ours) >= 4  # a prefill and a decode step per token after the first, at least one each
    assert ours <= {s["attributes"]["step_id"] for s in later_steps}  # stage 1 ran the same steps
    assert all(s["attributes"]["stage"] == 1 and s["attributes"]["replica"] == "r0" for s in later_steps)
