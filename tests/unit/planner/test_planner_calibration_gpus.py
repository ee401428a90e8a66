"""A calibration that measured several GPUs: a plan reads the section of the GPU it is for."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from trellis.planner.calibration import (
    SOFTWARE_CONSTANTS,
    Calibration,
    default_calibration,
    load_calibration,
    parse_calibration,
)
from trellis.planner.cost import StageCost, replica_cost
from trellis.planner.errors import PlanError
from trellis.planner.hardware import cluster_from_args
from trellis.planner.layout import Layout
from trellis.planner.machine import machine_for
from trellis.planner.model import load_model

TOP = {
    "layer_graph_s": 30e-6,
    "layer_eager_s": 600e-6,
    "step_overhead_s": 500e-6,
    "step_overhead_per_seq_s": 40e-6,
}
H100 = {
    "layer_graph_s": 20e-6,
    "layer_eager_s": 800e-6,
    "step_overhead_s": 450e-6,
    "step_overhead_per_seq_s": 50e-6,
}
REPO_CALIBRATION = Path(__file__).resolve().parents[3] / "bench" / "calibration.json"


def _h100_link() -> dict[str, Any]:
    link = default_calibration().to_dict()["links"]["nvlink"]
    # Ten times the top-level table's all-reduce times, so a plan that read the wrong one shows it.
    points = [{k: v * 10 if k.endswith("_s") else v for k, v in p.items()} for p in link["allreduce"]]
    return {**link, "gpu": "h100-sxm", "allreduce": points}


def _raw(h100_section: dict[str, Any]) -> dict[str, Any]:
    return {
        **default_calibration().to_dict(),
        "gpus": {
            "h200": {"hbm_copy_bytes_per_s": 4.2e12, "prefill_flops_per_s": 380e12},
            "h100-sxm": {"hbm_copy_bytes_per_s": 3.0e12, "prefill_flops_per_s": 360e12, **h100_section},
        },
        **TOP,
    }


def _cal() -> Calibration:
    return parse_calibration(
        _raw({**H100, "links": {"nvlink": _h100_link()}, "fitted_on": {"runs": {"x.json": 5}}})
    )


def _stage(cal: Calibration, gpu: str, tp: int = 1) -> StageCost:
    layout = Layout(tp, 1, 1, tp, ((0, 32),))
    mach = machine_for(cluster_from_args(gpu, 1, tp), cal)
    return replica_cost(load_model("llama-3-8b"), layout, mach, "bf16", 2).stages[0]


@pytest.mark.parametrize(("gpu", "constants"), [("h100-sxm", H100), ("h200", TOP)])
def test_a_plan_reads_the_software_constants_of_its_gpu(gpu: str, constants: dict[str, float]) -> None:
    mach = machine_for(cluster_from_args(gpu, 1, 1), _cal())
    assert {k: getattr(mach, k) for k in SOFTWARE_CONSTANTS} == constants
    st = _stage(_cal(), gpu)
    assert st.host(64, graph=True) == pytest.approx(
        constants["step_overhead_s"] + 64 * constants["step_overhead_per_seq_s"]
    )
    assert st.parts(1, 600, 600, 1, graph=True)["layers"] == pytest.approx(32 * constants["layer_graph_s"])


def test_a_plan_reads_the_all_reduce_table_of_its_gpu() -> None:
    cal = _cal()
    h100 = machine_for(cluster_from_args("h100-sxm", 1, 2), cal).intra
    h200 = machine_for(cluster_from_args("h200", 1, 2), cal).intra
    assert h100.measured.gpu == "h100-sxm" and h200.measured.gpu == "h200"
    assert h100.allreduce_s(16384, 2, graph=True) == pytest.approx(
        10 * h200.allreduce_s(16384, 2, graph=True)
    )
    # The H100 and H200 share the NVLink datasheet, so neither table is rescaled.
    assert h100.wire_latency_s == h200.wire_latency_s == 0.0


def test_a_gpu_without_a_section_of_its_own_reads_the_top_level_figures() -> None:
    mach = machine_for(cluster_from_args("a100-80g", 1, 2), _cal())
    assert {k: getattr(mach, k) for k in SOFTWARE_CONSTANTS} == TOP
    assert mach.intra.measured.gpu == "h200"


def test_a_partial_section_keeps_the_rest_from_the_top_level() -> None:
    cal = parse_calibration(_raw({"layer_graph_s": 20e-6}))
    mach = machine_for(cluster_from_args("h100-sxm", 1, 2), cal)
    assert mach.layer_graph_s == 20e-6 and mach.step_overhead_s == TOP["step_overhead_s"]
    assert mach.intra.measured.gpu == "h200"


def test_for_gpu_is_idempotent_and_leaves_other_gpus_alone() -> None:
    cal = _cal()
    once = cal.for_gpu("h100-sxm")
    assert once.for_gpu("h100-sxm") == once and once.layer_graph_s == H100["layer_graph_s"]
    assert cal.for_gpu("h200") is cal
    # The hardware figures stay in the section; its own constants and links are now the top level.
    assert once.gpus["h100-sxm"].hbm_copy_bytes_per_s == 3.0e12 and not once.gpus["h100-sxm"].constants


def test_sections_round_trip(tmp_path: Path) -> None:
    cal = _cal()
    path = tmp_path / "cal.json"
    cal.dump(path)
    again = load_calibration(path)
    assert again == cal
    assert json.loads(path.read_text())["gpus"]["h100-sxm"]["fitted_on"] == {"runs": {"x.json": 5}}


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"layer_graph_s": -1.0}, "gpus.h100-sxm.layer_graph_s"),
        ({"step_overhead_s": "fast"}, "gpus.h100-sxm.step_overhead_s"),
        ({"links": {"nvlink": {"allreduce": []}}}, "gpus.h100-sxm.links.nvlink.allreduce"),
    ],
)
def test_bad_sections_are_refused_with_their_path(section: dict[str, Any], message: str) -> None:
    with pytest.raises(PlanError, match=message.replace(".", r"\.")):
        parse_calibration(_raw(section))


@pytest.mark.skipif(not REPO_CALIBRATION.exists(), reason="bench/calibration.json not generated")
def test_the_measured_file_gives_each_card_its_own_figures() -> None:
    raw = json.loads(REPO_CALIBRATION.read_text())
    cal = load_calibration(REPO_CALIBRATION)
    for gpu in ("h200", "h100-sxm"):
        own = raw["gpus"][gpu]
        expected = {k: own.get(k, raw[k]) for k in SOFTWARE_CONSTANTS}
        mach = machine_for(cluster_from_args(gpu, 1, 1), cal)
        assert {k: getattr(mach, k) for k in SOFTWARE_CONSTANTS} == expected
        assert mach.hbm_bytes_per_s == own["hbm_copy_bytes_per_s"]
        assert mach.prefill_bf16_flops == own["prefill_flops_per_s"]
    h100 = raw["gpus"]["h100-sxm"]
    assert any(h100[k] != raw[k] for k in SOFTWARE_CONSTANTS)  # fitted on the H100's own runs
