"""All-reduce times from the measured table: one call per all-reduce whatever the batch's rows."""

from __future__ import annotations

from typing import Any

import pytest

from trellis.planner.allreduce import Curve
from trellis.planner.calibration import Calibration, parse_calibration
from trellis.planner.cost import replica_cost
from trellis.planner.hardware import cluster_from_args
from trellis.planner.layout import Layout
from trellis.planner.machine import machine_for
from trellis.planner.model import load_model

BIG = 256 << 20


def _cal(points: list[dict[str, Any]]) -> Calibration:
    return parse_calibration(
        {
            "format": "trellis-calibration/1",
            "links": {
                "nvlink": {
                    "gpu": "h200",
                    "allreduce": points,
                    "nccl_send": {"bytes": 1 << 26, "seconds": 2e-4},
                    "ucx": {
                        "small_bytes": 16384,
                        "small_round_trip_s": 1.5e-4,
                        "large_bytes": 1 << 26,
                        "large_one_way_s": 4.5e-4,
                    },
                }
            },
        }
    )


def _point(nbytes: int, gpus: int, eager: float, graph: float | None = None, **one_shot: float) -> dict:
    p = {"bytes": nbytes, "gpus": gpus, "eager_s": eager, **one_shot}
    return p if graph is None else {**p, "graph_s": graph}


# The shape of the H200 measurements: NCCL in a graph on 4 GPUs, 15.6 us at 16 KB, 21.6 us at 1 MB,
# and 300 GB/s of bus bandwidth at 256 MB.
MEASURED_4 = [
    _point(16384, 4, 70.8e-6, 15.6e-6),
    _point(1 << 20, 4, 42.5e-6, 21.6e-6),
    _point(BIG, 2, BIG / 300e9),
]


def test_curve_interpolates_in_bus_bytes_and_extrapolates_at_the_bandwidth() -> None:
    c = Curve.through([(3000.0, 3e-5), (1000.0, 1e-5), (1000.0, 2e-5)], 1e9)
    assert c.bus == (1000.0, 3000.0) and c.seconds[0] == pytest.approx(1.5e-5)  # repeats averaged
    assert c(10.0) == pytest.approx(1.5e-5)  # below the table: all latency, no faster
    assert c(2000.0) == pytest.approx((1.5e-5 + 3e-5) / 2)
    assert c(5000.0) == pytest.approx(3e-5 + 2000 / 1e9)


def test_a_batch_all_reduce_is_one_call_not_one_per_row() -> None:
    m = load_model("llama-3-70b")
    flat = _cal(
        [_point(16384, 4, 70e-6, 10e-6), _point(1 << 20, 4, 70e-6, 10e-6), _point(BIG, 2, BIG / 300e9)]
    )
    st = replica_cost(
        m, Layout(4, 1, 1, 4, ((0, 80),)), machine_for(cluster_from_args("h200"), flat), "bf16", 2
    )
    st = st.stages[0]
    # 2 all-reduces per layer per step, each 10 us whether it carries 1 row (16 KB) or 64 (1 MB).
    assert st.comm(1, graph=True) == pytest.approx(160 * 10e-6)
    assert st.comm(64, graph=True) == pytest.approx(160 * 10e-6)


def test_batch_rows_cost_what_the_table_says_for_their_bytes() -> None:
    m = load_model("llama-3-70b")
    mach = machine_for(cluster_from_args("h200"), _cal(MEASURED_4))
    st = replica_cost(m, Layout(4, 1, 1, 4, ((0, 80),)), mach, "bf16", 2).stages[0]
    # 64 rows x 8192 x 2 bytes = 1 MB: 21.6 us a call, 1.4x a 1-row call, not 64x.
    assert st.comm(64, graph=True) == pytest.approx(160 * 21.6e-6)
    assert st.comm(64, graph=True) / st.comm(1, graph=True) == pytest.approx(21.6 / 15.6)
    # A 2048-token prefill chunk (32 MB) is past the table: 1 MB's time plus the rest at the bus rate.
    extra_bus = 2 * 3 / 4 * (2048 - 64) * 16384
    assert st.comm(2048, graph=True) == pytest.approx(160 * (21.6e-6 + extra_bus / 300e9))


def test_one_shot_kernel_takes_the_sizes_up_to_its_threshold() -> None:
    cal = _cal([
        _point(16384, 2, 81e-6, 11.5e-6, one_shot_eager_s=40e-6, one_shot_graph_s=7.8e-6),
        _point(1 << 20, 2, 39e-6, 18.3e-6, one_shot_eager_s=45e-6, one_shot_graph_s=14.5e-6),
        _point(BIG, 2, BIG / 300e9),
    ])  # fmt: skip
    link = machine_for(cluster_from_args("h200"), cal).intra
    ar = link.allreduce(2, one_shot_max_bytes=65536)
    assert ar.seconds(16384, graph=True) == pytest.approx(7.8e-6)
    assert ar.seconds(16384, graph=False) == pytest.approx(40e-6)
    assert ar.seconds(1 << 20, graph=True) == pytest.approx(18.3e-6)  # past the threshold: NCCL
    assert link.allreduce(2).seconds(16384, graph=True) == pytest.approx(11.5e-6)  # off by default


def test_an_unmeasured_gpu_count_uses_the_nearest_table_in_bus_bytes() -> None:
    cal = _cal([_point(16384, 2, 80e-6, 12e-6), *MEASURED_4])
    link = machine_for(cluster_from_args("h200"), cal).intra
    # TP 8 reads the 4-GPU table at its own bus bytes: 2(8-1)/8 x S = 2(4-1)/4 x 16 KB at S = 14,043.
    assert link.allreduce_s(16384 * 1.5 / 1.75, 8, True) == pytest.approx(15.6e-6)
    assert link.allreduce_s(16384, 3, True) == pytest.approx(12e-6 + 16384 * (4 / 3 - 1) / 300e9)
    assert link.allreduce_s(16384, 2, True) == pytest.approx(12e-6)
    # Without graph points the eager curve stands in.
    assert _cal([_point(16384, 2, 80e-6)]).links["nvlink"].allreduce_points(2)[0].graph_s is None
    eager_only = machine_for(cluster_from_args("h200"), _cal([_point(16384, 2, 80e-6)])).intra
    assert eager_only.allreduce_s(16384, 2, True) == pytest.approx(80e-6)


def test_pipeline_gather_reads_the_same_table_at_its_bus_bytes() -> None:
    link = machine_for(cluster_from_args("h200"), _cal(MEASURED_4)).intra
    ar = link.allreduce(4)
    # An all-gather of S bytes moves (n-1)/n x S per GPU: half an all-reduce's bus bytes.
    assert ar.gather_seconds(2 << 20, graph=True) == pytest.approx(ar.seconds(1 << 20, graph=True))
