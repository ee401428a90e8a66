"""--validate: predictions next to benchmark measurements."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from trellis.planner import cli
from trellis.planner.calibration import default_calibration
from trellis.planner.cost import replica_cost
from trellis.planner.errors import PlanError
from trellis.planner.hardware import cluster_from_args
from trellis.planner.layout import Layout
from trellis.planner.machine import machine_for
from trellis.planner.model import load_model
from trellis.planner.validate import BenchRun, load_results, parse_results, predict, validation_table

RUN = {
    "format": "trellis-bench/1",
    "name": "8b-tp2-b1",
    "config": {
        "model": "llama-3-8b",
        "dtype": "bf16",
        "gpu": "h100-sxm",
        "nodes": 1,
        "gpus_per_node": 8,
        "tp": 2,
        "pp": 1,
        "dp": 3,
        "batch": 1,
        "prompt_len": 128,
        "output_len": 9,
    },
    "measured": {"decode_tok_s": 400.0, "ttft_s": 0.02, "tpot_s": 0.0075},
}


def test_one_sequence_prediction_is_its_step_times(tmp_path: Path) -> None:
    f = tmp_path / "r.json"
    f.write_text(json.dumps(RUN))
    (run,) = load_results([str(f)])
    pred = predict(run, default_calibration())
    m = load_model("llama-3-8b")
    cost = replica_cost(
        m,
        Layout(2, 1, 1, 8, ((0, 32),)),
        machine_for(cluster_from_args("h100-sxm"), default_calibration()),
        "bf16",
        2,
    )
    ttft = cost.cycle(128, 128, 128 * 129 // 2, 1, False)[0]
    tpot = np.mean([cost.cycle(1, 128 + i, 128 + i, 1, True)[0] for i in range(1, 9)])
    assert pred["ttft_s"] == pytest.approx(ttft)
    assert pred["tpot_s"] == pytest.approx(tpot)
    assert pred["decode_tok_s"] == pytest.approx(3 / tpot)


def test_table_lists_every_metric(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    second = {
        **RUN,
        "name": "70b-tp8-b16",
        "config": {**RUN["config"], "model": "llama-3-70b", "tp": 8, "dp": 1, "batch": 16},
    }
    f = tmp_path / "runs.json"
    f.write_text(json.dumps({"format": "trellis-bench/1", "runs": [RUN, second]}))
    assert cli.main(["--validate", str(f)]) == 0
    out = capsys.readouterr().out
    assert out.count("decode_tok_s") == 2 and "70b-tp8-b16" in out and "%" in out


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": "other"}, "format"),
        ({"config": {"model": "llama-3-8b"}}, "config.gpu: required"),
        ({"config": {**RUN["config"], "tp": 0}}, "config.tp"),
        ({"config": {**RUN["config"], "max_in_flight": 0}}, "config.max_in_flight"),
        ({"measured": {"tpot_s": "fast"}}, "measured"),
    ],
)
def test_bad_results_are_one_clear_error(tmp_path: Path, change: dict, message: str) -> None:
    f = tmp_path / "bad.json"
    f.write_text(json.dumps({**RUN, **change}))
    with pytest.raises(PlanError, match=message):
        load_results([str(f)])


def test_the_runs_engine_settings_reach_the_cost() -> None:
    cal = replace(default_calibration(), step_overhead_s=1e-3, step_overhead_per_seq_s=0.0)
    config = {**RUN["config"], "max_batched_tokens": None}  # left unset, as the mesh records do
    plain = predict(BenchRun("plain", config, {}), cal)
    burst = predict(BenchRun("burst", {**config, "decode_burst": 8}, {}), cal)
    # One request: every decode step pays 1 ms of host time per plan, or 1/8 of it in bursts of 8.
    assert plain["tpot_s"] - burst["tpot_s"] == pytest.approx(7 / 8 * 1e-3)
    assert plain["ttft_s"] == pytest.approx(burst["ttft_s"])  # the prompt step is a plan of its own
    one_shot = predict(BenchRun("one-shot", {**config, "one_shot_max_bytes": 1 << 20}, {}), cal)
    assert one_shot == plain  # the default calibration measured no one-shot kernel: NCCL stands


def test_micro_batches_in_flight_reach_the_replay() -> None:
    config = {**RUN["config"], "tp": 2, "pp": 2, "dp": 1, "batch": 16, "output_len": 33}
    one = predict(BenchRun("one", {**config, "max_in_flight": 1}, {}), default_calibration())
    two = predict(BenchRun("two", {**config, "max_in_flight": 2}, {}), default_calibration())
    assert two == predict(BenchRun("default", config, {}), default_calibration())  # one per stage
    # One micro-batch of 16 goes around both stages and back before the next step: each stage idles
    # while the other works (and during the hops); two micro-batches of 8 keep both stages busy.
    assert one["bubble"] > 0.5 > two["bubble"]
    assert one["tpot_s"] != pytest.approx(two["tpot_s"])
    raw = {**RUN, "config": {**config, "max_in_flight": 1}, "measured": {"tpot_s": 0.01, "bubble": 0.5}}
    rows = [line.split() for line in validation_table(parse_results(raw), default_calibration()).splitlines()]
    (bubble,) = [r for r in rows if "bubble" in r]
    assert bubble[-3:] == [f"{one['bubble']:.4g}", "0.5", f"{(one['bubble'] - 0.5) / 0.5:+.0%}"]
    flat = {**RUN, "measured": {"bubble": 0.5}}  # PP 1: no pipeline, no bubble row
    assert "bubble" not in validation_table(parse_results(flat), default_calibration())
