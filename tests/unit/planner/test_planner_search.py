"""The search: the classic case, and behaviour that follows from the model rather than special cases."""

from __future__ import annotations

import pytest

from trellis.planner.calibration import default_calibration
from trellis.planner.explain import why_loses
from trellis.planner.hardware import cluster_from_args
from trellis.planner.model import load_model
from trellis.planner.search import Candidate, Plan, PlanOptions, make_plan
from trellis.planner.workload import Lengths, Workload

WORKLOAD = Workload(Lengths("fixed", 1024), Lengths("fixed", 256))


def plan(
    model: str,
    gpu: str,
    nodes: int = 1,
    per_node: int | None = None,
    workload: Workload = WORKLOAD,
    **options: object,
) -> Plan:
    return make_plan(
        load_model(model),
        cluster_from_args(gpu, nodes, per_node),
        workload,
        default_calibration(),
        PlanOptions(**options),
    )  # type: ignore[arg-type]


def only(p: Plan, tp: int, pp: int) -> Candidate:
    (c,) = [c for c in p.candidates if (c.layout.tp, c.layout.pp) == (tp, pp) and not c.layout.split]
    return c


def test_70b_fp16_on_one_h100_is_refused() -> None:
    p = plan("llama-3-70b", "h100-sxm", 1, 1, weight_dtype="fp16")
    assert p.best is None
    (c,) = p.candidates
    assert c.rejected == "does not fit: short by 69.9 GB per GPU"


def test_70b_on_one_node_of_8_h100_is_a_tp_plan() -> None:
    best = plan("llama-3-70b", "h100-sxm").best
    assert best is not None
    assert best.layout.tp >= 4 and best.layout.pp == 1 and best.layout.gpus == 8
    assert best.tpot_p99_s <= 0.05 + 1e-9 and best.ttft_p99_s <= 2.0


@pytest.mark.parametrize("nodes", [8, 128])
def test_64_and_1024_h100_keep_tp_inside_nodes_and_spread_across(nodes: int) -> None:
    best = plan("llama-3-70b", "h100-sxm", nodes).best
    assert best is not None and best.layout.tp <= 8 and best.layout.gpus == nodes * 8
    assert best.layout.dp * best.layout.size == nodes * 8
    big = plan("llama-3.1-405b", "h100-sxm", nodes).best
    assert big is not None and big.layout.tp == 8 and big.layout.pp >= 2
    assert big.layout.hop_crosses_nodes(0)  # the pipeline runs between nodes, TP inside them


def test_nvlink_tp_beats_pp_on_latency() -> None:
    p = plan("llama-3-70b", "h100-sxm", objective="latency")
    tp, pp = only(p, 8, 1), only(p, 1, 8)
    assert tp.tpot_s < pp.tpot_s / 3
    assert p.best is not None and p.best.layout.tp == 8


def test_pcie_pp_beats_tp_on_throughput() -> None:
    p = plan(
        "llama-3-8b", "l40s-pcie", 1, 4, workload=Workload(WORKLOAD.prompt, WORKLOAD.output, tpot_slo_s=0.1)
    )
    assert only(p, 1, 4).capacity > 2 * only(p, 4, 1).capacity
    # The same replica over NVLink: all-reduces are cheap, and TP is no longer far behind.
    q = plan(
        "llama-3-8b", "h100-sxm", 1, 4, workload=Workload(WORKLOAD.prompt, WORKLOAD.output, tpot_slo_s=0.1)
    )
    assert only(q, 4, 1).capacity > 0.8 * only(q, 1, 4).capacity


def test_across_nodes_pp_beats_tp() -> None:
    p = plan("llama-3-70b", "h100-sxm", 2, cross_node_tp=True)
    assert only(p, 8, 2).capacity > 2 * only(p, 16, 1).capacity
    assert p.best is not None and p.best.layout.tp <= 8


def test_more_memory_per_gpu_gives_more_kv_and_fewer_gpus_per_replica() -> None:
    h100, h200 = plan("llama-3-70b", "h100-sxm"), plan("llama-3-70b", "h200")
    assert only(h200, 4, 1).memory.kv_tokens > 2 * only(h100, 4, 1).memory.kv_tokens

    def smallest_replica(p: Plan) -> int:
        return min(c.layout.size for c in p.candidates if c.memory.fits)

    assert smallest_replica(plan("llama-3.1-405b", "h100-sxm", 4)) == 16
    assert smallest_replica(plan("llama-3.1-405b", "h200", 4)) == 8


def test_a_given_rate_rejects_layouts_that_cannot_serve_it() -> None:
    free = plan("llama-3-70b", "h100-sxm")
    assert free.best is not None
    rate = 0.9 * free.best.capacity
    p = plan("llama-3-70b", "h100-sxm", workload=Workload(WORKLOAD.prompt, WORKLOAD.output, rate=rate))
    assert p.best is not None and p.best.rate == pytest.approx(rate, rel=1e-3)
    slow = [c for c in p.candidates if c.memory.fits and 0 < c.capacity < rate]
    assert slow and all(c.rejected and f"cannot serve {rate:g} req/s" in c.rejected for c in slow)


def test_prefill_decode_split_serves_min_of_both_sides() -> None:
    p = plan("llama-3.1-405b", "h100-sxm", 4, pd_split=True)
    splits = [c for c in p.candidates if c.layout.split and c.usable]
    assert splits
    s = splits[0].split
    assert s is not None
    assert splits[0].capacity == pytest.approx(
        min(s.prefill.rate * s.prefill_replicas, s.decode.rate * s.decode_replicas)
    )


def test_runners_up_say_why_they_lose() -> None:
    p = plan("llama-3-70b", "h100-sxm")
    best = p.best
    assert best is not None
    reasons = [why_loses(c, best, p) for c in p.candidates]
    assert reasons[0] == "best"
    assert any("does not fit" in r for r in reasons)
    assert any("less throughput" in r and "GPU-ms/token" in r for r in reasons)
