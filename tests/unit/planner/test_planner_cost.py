"""The cost model and the calibration it rests on, against hand-computed figures."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from trellis.planner.calibration import default_calibration, load_calibration, parse_calibration
from trellis.planner.cost import replica_cost
from trellis.planner.errors import PlanError
from trellis.planner.hardware import cluster_from_args
from trellis.planner.layout import Layout, split_layers
from trellis.planner.machine import machine_for
from trellis.planner.memory import stage_weight_bytes
from trellis.planner.model import load_model


def test_default_calibration_fits_the_measured_figures() -> None:
    nvlink = default_calibration().links["nvlink"]
    assert nvlink.allreduce_bus_bytes_per_s() == pytest.approx(300e9)  # 256 MB over 2 GPUs
    link = machine_for(cluster_from_args("h200"), default_calibration()).intra
    # The measured points come back exactly: 16 KB 34 us eager, 20 us in a graph; 256 MB at 300 GB/s.
    assert link.allreduce_s(16384, 2, False) == pytest.approx(34e-6)
    assert link.allreduce_s(16384, 2, True) == pytest.approx(20e-6)
    assert link.allreduce_s(256 << 20, 2, False) == pytest.approx((256 << 20) / 300e9)
    latency, bandwidth = nvlink.ucx_fit()
    assert latency == pytest.approx(75e-6)  # half the 16 KB round trip
    assert 64 * 2**20 / bandwidth + latency == pytest.approx(0.45e-3)


def test_machine_uses_measured_figures_and_scales_the_rest() -> None:
    cal = default_calibration()
    h100 = machine_for(cluster_from_args("h100-sxm"), cal)
    assert h100.hbm_bytes_per_s == 3.02e12 and h100.bf16_flops == 790e12
    h200 = machine_for(cluster_from_args("h200"), cal)
    assert h200.hbm_bytes_per_s == 4.2e12  # copy figure counted read + write = bytes read per second
    a100 = machine_for(cluster_from_args("a100-80g"), cal)
    fraction = (3.02 / 3.35 + 4.2 / 4.8) / 2
    assert a100.hbm_bytes_per_s == pytest.approx(2.039e12 * fraction)
    assert a100.bf16_flops == pytest.approx(312e12 * 790 / 989.4)
    # A100 NVLink is 300 GB/s a direction against H200's 450: two thirds of the measured bus bandwidth.
    assert a100.intra.allreduce_bus_bytes_per_s == pytest.approx(300e9 * 300 / 450)
    ib = machine_for(cluster_from_args("h100-sxm", 2), cal).inter
    assert ib.p2p_bytes_per_s == pytest.approx(50e9 * 332 / 450)  # NCCL send's share of the link
    # InfiniBand keeps NVLink's measured time, plus its extra wire latency (a reduce and a broadcast)
    # and the extra time its 50 GB/s (at NVLink's 300/450 efficiency) takes for the bus bytes.
    slower = 1 / (300e9 * 50 / 450) - 1 / 300e9
    assert ib.allreduce_s(16384, 2, True) == pytest.approx(20e-6 + 2 * (5e-6 - 1e-6) + 16384 * slower)
    big = 1 << 30
    assert ib.allreduce_s(big, 2, False) == pytest.approx(
        (256 << 20) / 300e9 + (big - (256 << 20)) / 300e9 + 2 * 4e-6 + big * slower
    )


def test_decode_step_is_max_of_memory_and_compute_plus_allreduces() -> None:
    m = load_model("llama-3-70b")
    mach = machine_for(cluster_from_args("h100-sxm"), default_calibration())
    cost = replica_cost(m, Layout(8, 1, 1, 8, ((0, 80),)), mach, "bf16", 2)
    st = cost.stages[0]
    b, ctx = 64, 1000
    weights = stage_weight_bytes(m, "bf16", (0, 80), 8, 1, True, True) - 128256 // 8 * 8192 * 2
    memory = (weights + b * ctx * 40_960) / 3.02e12
    flops = 2 * 80 * 855_638_016 / 8 * b + 4 * 80 * 8 * 128 * b * ctx + 2 * 128256 // 8 * 8192 * b
    allreduce = 160 * (20e-6 - 16384 / 300e9 + 2 * 7 / 8 * b * 8192 * 2 / 300e9)
    expected = max(memory, flops / 790e12) + allreduce
    assert st.allreduces == 160
    assert st.time(b, b * ctx, b * ctx, b, graph=True) == pytest.approx(expected, rel=1e-9)
    trip, slowest = cost.cycle(b, b * ctx, b * ctx, b, graph=True)
    assert trip == slowest == pytest.approx(expected)  # one stage: no hop at all


def test_prefill_is_compute_bound_and_eager() -> None:
    m = load_model("llama-3-8b")
    mach = machine_for(cluster_from_args("h100-sxm"), default_calibration())
    st = replica_cost(m, Layout(2, 1, 1, 8, ((0, 32),)), mach, "bf16", 2).stages[0]
    t = 2048
    parts = st.parts(t, t, t * t / 2, 1, graph=False)
    assert parts["compute"] > parts["weights"] + parts["kv"]
    # 2048 rows x 8 KB = 16 MB, between the measured 16 KB (34 us) and 256 MB points: interpolated.
    bus, big = 2 * 1 / 2 * t * 4096 * 2, 256 << 20
    one = 34e-6 + (bus - 16384) * (big / 300e9 - 34e-6) / (big - 16384)
    assert parts["allreduce"] == pytest.approx(64 * one)


def test_pipeline_hops_cross_nodes_only_between_nodes() -> None:
    m = load_model("llama-3.1-405b")
    mach = machine_for(cluster_from_args("h100-sxm", 2), default_calibration())
    layout = Layout(8, 2, 1, 8, split_layers(126, 2))
    cost = replica_cost(m, layout, mach, "bf16", 2)
    out, back = cost.hops
    assert out.crosses_nodes and back.crosses_nodes and back.to_head
    tokens = 32
    # Each of 8 ranks sends its 1/8 slice of the hidden states over its own InfiniBand link, in parallel.
    slice_s = tokens * 16384 * 2 / 8 / mach.inter.p2p_bytes_per_s
    assert out.time(tokens, tokens) == pytest.approx(mach.inter.p2p_latency_s + slice_s)
    assert back.time(tokens, tokens) == pytest.approx(
        mach.inter.p2p_latency_s + tokens * 4 / mach.inter.p2p_bytes_per_s
    )
    # The second stage all-gathers the slices over its TP group (inside the node: NVLink), eagerly.
    first, second = cost.stages
    args = (tokens, tokens * 100, tokens * 100, tokens, True)
    gather = mach.intra.allgather_s(tokens * 16384 * 2, 8, False)
    assert second.time(*args) - replace(second, gather=None).time(*args) == pytest.approx(gather)
    assert first.gather is None
    trip, _ = cost.cycle(*args)
    stage_sum = sum(s.time(*args) for s in cost.stages)
    assert trip == pytest.approx(stage_sum + out.time(tokens, tokens) + back.time(tokens, tokens))


def test_calibration_file_round_trips_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "cal.json"
    default_calibration().dump(path)
    again = load_calibration(path)
    assert again.gpus == default_calibration().gpus and again.links == default_calibration().links
    # A file that measured only the H100's copy keeps every other default.
    (tmp_path / "h100.json").write_text(
        json.dumps(
            {
                "format": "trellis-calibration/1",
                "source": "test",
                "gpus": {"h100-sxm": {"hbm_copy_bytes_per_s": 2.0e12}},
                "step_overhead_s": 0.001,
            }
        )
    )
    cal = load_calibration(tmp_path / "h100.json")
    mach = machine_for(cluster_from_args("h100-sxm"), cal)
    assert mach.hbm_bytes_per_s == 2.0e12 and mach.step_overhead_s == 0.001
    assert mach.bf16_flops == 790e12 and "nvlink" in cal.links


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"format": "nope"}, "format"),
        ({"format": "trellis-calibration/1", "gpus": {"h100-sxm": {"hbm_copy_bytes_per_s": -1}}}, "hbm_copy"),
        ({"format": "trellis-calibration/1", "links": {"nvlink": {"allreduce": []}}}, "allreduce"),
        ({"format": "trellis-calibration/1", "step_overhead_s": "x"}, "step_overhead_s"),
    ],
)
def test_bad_calibration_is_one_clear_error(raw: dict, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        parse_calibration(raw)
