"""The calibration fits give back the constants that generated their data."""

from __future__ import annotations

from dataclasses import replace

import pytest

from trellis.planner import fit
from trellis.planner.calibration import Calibration, default_calibration
from trellis.planner.errors import PlanError
from trellis.planner.validate import BenchRun, predict, run_cost

TRUE = {
    "layer_graph_s": 30e-6,
    "step_overhead_s": 400e-6,
    "step_overhead_per_seq_s": 35e-6,
    "layer_eager_s": 600e-6,
}
TRUE_RATE = 350e12


def _truth() -> Calibration:
    return fit.with_prefill(
        replace(default_calibration(), **{k: v for k, v in TRUE.items() if k != "layer_eager_s"}),
        "h200",
        TRUE_RATE,
        TRUE["layer_eager_s"],
    )


def _run(batch: int, burst: int) -> BenchRun:
    config = {
        "model": "llama-3-8b",
        "gpu": "h200",
        "gpus_per_node": 1,
        "tp": 1,
        "pp": 1,
        "dp": 1,
        "batch": batch,
        "prompt_len": 512,
        "output_len": 32,
        "max_batched_tokens": 4096,
        "decode_burst": burst,
    }
    return BenchRun(f"b{batch}-burst{burst}", config, {})


def _measured(run: BenchRun, cal: Calibration) -> BenchRun:
    """What the GPU would report if the model were exact: the graph replay at the last step's
    context, the TPOT at the mean context (host time included), and the replayed TTFT."""
    (stage,) = run_cost(run, cal)[0].stages
    b, p, o = run.config["batch"], run.config["prompt_len"], run.config["output_len"]

    def step(ctx: float) -> float:
        return stage.time(b, b * ctx, b * ctx, b, graph=True)

    replay = step(p + o - 1) - stage.host(b, graph=True)
    return replace(
        run,
        measured={"graph_replay_s": replay, "tpot_s": step(p + o / 2), "ttft_s": predict(run, cal)["ttft_s"]},
    )


def test_fits_recover_the_constants_that_made_the_data() -> None:
    truth = _truth()
    runs = [_measured(_run(b, k), truth) for b in (1, 8, 32) for k in (1, 8)]
    start = default_calibration()  # every software constant 0, no prefill rate
    layer = fit.fit_layer_graph_s(runs, start)
    assert layer.value == pytest.approx(TRUE["layer_graph_s"], rel=1e-6) and layer.rms_error < 1e-6
    fixed, per_seq = fit.fit_host_overhead(runs, start)
    assert fixed.value == pytest.approx(TRUE["step_overhead_s"], rel=1e-6)
    assert per_seq.value == pytest.approx(TRUE["step_overhead_per_seq_s"], rel=1e-6)
    known = replace(
        start,
        layer_graph_s=layer.value,
        step_overhead_s=fixed.value,
        step_overhead_per_seq_s=per_seq.value,
    )
    rate, eager = fit.fit_prefill(runs, known, "h200")
    assert rate.value == pytest.approx(TRUE_RATE, rel=1e-6)
    assert eager.value == pytest.approx(TRUE["layer_eager_s"], rel=1e-6)
    assert rate.runs == 6 and rate.rms_error < 1e-6


def test_fits_refuse_data_that_cannot_carry_them() -> None:
    run = _run(8, 1)
    with pytest.raises(PlanError, match="graph_replay_s"):
        fit.fit_layer_graph_s([run], default_calibration())
    tp2 = replace(run, config={**run.config, "tp": 2, "gpus_per_node": 2}, measured={"graph_replay_s": 0.005})
    with pytest.raises(PlanError, match="TP 1 x PP 1"):
        fit.fit_layer_graph_s([tp2], default_calibration())
    with pytest.raises(PlanError, match="two runs"):
        fit.fit_prefill([replace(run, measured={"ttft_s": 0.2})], default_calibration(), "h200")
