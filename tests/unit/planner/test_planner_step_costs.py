"""The software terms of a step: per-layer kernel time, host time per plan, the prefill rate."""

from __future__ import annotations

import pytest

from trellis.planner.calibration import Calibration, default_calibration, parse_calibration
from trellis.planner.cost import StageCost, replica_cost
from trellis.planner.hardware import cluster_from_args
from trellis.planner.layout import Layout
from trellis.planner.machine import machine_for
from trellis.planner.model import load_model

SOFTWARE = {
    "layer_graph_s": 30e-6,
    "layer_eager_s": 500e-6,
    "step_overhead_s": 400e-6,
    "step_overhead_per_seq_s": 30e-6,
}


def measured_calibration() -> Calibration:
    default = default_calibration().to_dict()
    return parse_calibration(
        {
            **default,
            "gpus": {"h200": {"hbm_copy_bytes_per_s": 4.2e12, "prefill_flops_per_s": 400e12}},
            **SOFTWARE,
        }
    )


def _stage(cal: Calibration, burst: int = 1) -> StageCost:
    m = load_model("llama-3-8b")
    mach = machine_for(cluster_from_args("h200", 1, 1), cal)
    return replica_cost(m, Layout(1, 1, 1, 1, ((0, 32),)), mach, "bf16", 2, decode_burst=burst).stages[0]


def test_each_layer_adds_its_fixed_time_graph_or_eager() -> None:
    with_layers, without = _stage(measured_calibration()), _stage(default_calibration())
    b, ctx = 8, 600
    gpu = with_layers.time(b, b * ctx, b * ctx, b, True) - with_layers.host(b, True)
    assert gpu - without.time(b, b * ctx, b * ctx, b, True) == pytest.approx(32 * 30e-6, rel=1e-6)
    parts = with_layers.parts(512, 512, 512 * 513 / 2, 1, graph=False)
    assert parts["layers"] == pytest.approx(32 * 500e-6)


def test_host_time_is_per_plan_and_a_burst_spreads_it_over_its_steps() -> None:
    one, eight = _stage(measured_calibration()), _stage(measured_calibration(), burst=8)
    assert one.host(64, graph=True) == pytest.approx(400e-6 + 64 * 30e-6)
    assert eight.host(64, graph=True) == pytest.approx((400e-6 + 64 * 30e-6) / 8)
    # A step that carries a prompt is a plan of its own, burst or not.
    assert eight.host(4, graph=False) == pytest.approx(400e-6 + 4 * 30e-6)
    b, ctx = 64, 600
    saved = one.time(b, b * ctx, b * ctx, b, True) - eight.time(b, b * ctx, b * ctx, b, True)
    assert saved == pytest.approx(7 / 8 * (400e-6 + 64 * 30e-6))


def test_prompt_steps_run_at_the_prefill_rate_decode_steps_at_the_gemm_rate() -> None:
    st = _stage(measured_calibration())
    m = load_model("llama-3-8b")
    tokens, pairs = 2048, 2048 * 2049 / 2
    flops = 2 * 32 * m.layer_linear_params() * tokens + 4 * 32 * 32 * 128 * pairs + 2 * 128256 * 4096
    assert st.compute(tokens, pairs, 1, graph=False) == pytest.approx(flops / 400e12)
    # No GEMM figure for the H200: the H100's 80% of peak carries over.
    assert st.compute(tokens, pairs, 1, graph=True) == pytest.approx(flops / (989.4e12 * 790 / 989.4))
    # Without a measured prefill rate prompts run at the GEMM rate.
    plain = _stage(default_calibration())
    assert plain.compute(tokens, pairs, 1, graph=False) == pytest.approx(
        plain.compute(tokens, pairs, 1, True)
    )


def test_calibration_round_trips_the_new_constants() -> None:
    cal = measured_calibration()
    again = parse_calibration(cal.to_dict())
    assert again.gpus["h200"].prefill_flops_per_s == 400e12
    assert {k: getattr(again, k) for k in SOFTWARE} == SOFTWARE
    mach = machine_for(cluster_from_args("h100-sxm"), cal)
    assert mach.prefill_bf16_flops == pytest.approx(989.4e12 * 400 / 989.4)  # H200's fraction of peak
    assert any("per layer" in n for n in mach.notes) and any("host" in n for n in mach.notes)


@pytest.mark.parametrize("pp", [1, 2])
@pytest.mark.parametrize("graph", [True, False])
def test_step_time_is_the_sum_of_its_reported_parts(graph: bool, pp: int) -> None:
    m = load_model("llama-3-70b")
    mach = machine_for(cluster_from_args("h200"), measured_calibration())
    layers = ((0, 80),) if pp == 1 else ((0, 40), (40, 80))
    st = replica_cost(m, Layout(4, pp, 1, 8, layers), mach, "bf16", 2, decode_burst=8).stages[-1]
    args = (64, 64 * 700, 64 * 700, 64, graph) if graph else (2048, 2048, 2048 * 1024, 4, graph)
    p = st.parts(*args)
    assert p["allreduce"] > 0 and p["layers"] > 0 and p["overhead"] > 0
    assert (p["gather"] > 0) == (pp > 1)  # the last of 2 stages all-gathers what it receives
    extras = p["layers"] + p["allreduce"] + p["gather"] + p["overhead"]
    assert st.time(*args) == pytest.approx(max(p["weights"] + p["kv"], p["compute"]) + extras, rel=1e-12)
