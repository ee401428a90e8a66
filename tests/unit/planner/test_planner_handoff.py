"""The PP hand-off with TP > 1, as the engine runs it: each TP rank sends its 1/TP column slice of
the hidden states to the same rank of the next stage over UCX (the links in parallel: that is the
hop), and the receiving stage all-gathers the slices over its TP group eagerly, on its compute
thread, before its layers: part of that stage's step and of the busy time the engine measures."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from trellis.planner.analytic import Point
from trellis.planner.calibration import default_calibration
from trellis.planner.cost import ReplicaCost, replica_cost
from trellis.planner.explain import decode_breakdown
from trellis.planner.hardware import cluster_from_args
from trellis.planner.layout import Layout, split_layers
from trellis.planner.machine import Machine, machine_for
from trellis.planner.model import load_model
from trellis.planner.simulator import SimConfig, simulate
from trellis.planner.workload import Requests

ROW = 8192 * 2  # one row of Llama-3-70B's hidden states in bf16
# The default table (2 GPUs): 16 KB all-reduce 34 us eager / 20 us in a CUDA graph; 256 MB eager.
SMALL_BUS, SMALL_EAGER, SMALL_GRAPH = 16384, 34e-6, 20e-6
BIG_BUS, BIG_EAGER = 256 << 20, (256 << 20) / 300e9


def _machine(gpus: int = 4) -> Machine:
    return machine_for(cluster_from_args("h100-sxm", 1, gpus), default_calibration())


def _cost(model: str, tp: int, pp: int) -> ReplicaCost:
    m = load_model(model)
    layout = Layout(tp, pp, 1, tp * pp, split_layers(m.layers, pp))
    return replica_cost(m, layout, _machine(tp * pp), "bf16", 2)


def _eager_gather_2(rows: float, row: int = ROW) -> float:
    """All-gather of ``rows`` x ``row`` bytes over 2 GPUs: each receives half of it (its bus
    bytes), read off the eager column, flat below the smallest point, linear up to 256 MB."""
    bus = rows * row / 2
    if bus <= SMALL_BUS:
        return SMALL_EAGER
    return SMALL_EAGER + (bus - SMALL_BUS) * (BIG_EAGER - SMALL_EAGER) / (BIG_BUS - SMALL_BUS)


@pytest.mark.parametrize("rows", [1, 64])
@pytest.mark.parametrize("graph", [True, False])
def test_the_gather_is_in_the_receiving_stage_on_the_eager_curve(rows: int, graph: bool) -> None:
    first, second = _cost("llama-3-70b", 2, 2).stages
    assert first.gather is None and second.gather is not None  # the head receives sampled ids only
    args = (rows, rows * 600, rows * 600, rows, graph)
    gather = second.time(*args) - replace(second, gather=None).time(*args)
    # Eager even in a decode step (the stage's CUDA graph starts after it): one row is 34 us, not 20.
    assert gather == pytest.approx(_eager_gather_2(rows), rel=1e-9)
    assert second.parts(*args)["gather"] == pytest.approx(gather, rel=1e-12)
    assert first.parts(*args)["gather"] == 0.0
    if rows == 1:
        assert gather == pytest.approx(SMALL_EAGER) and gather != pytest.approx(SMALL_GRAPH)


def test_the_hop_carries_one_slice_per_link_and_no_gather() -> None:
    cost = _cost("llama-3-70b", 2, 2)
    link = _machine().intra
    out, back = cost.hops
    tokens, samples = 64, 48
    # Each of the 2 ranks sends 64 rows x 8 KB on its own link, at the same time.
    assert out.time(tokens, samples) == pytest.approx(
        link.p2p_latency_s + tokens * ROW / 2 / link.p2p_bytes_per_s
    )
    assert back.time(tokens, samples) == pytest.approx(
        link.p2p_latency_s + samples * 4 / link.p2p_bytes_per_s
    )
    trip, slowest = cost.cycle(tokens, tokens * 600, tokens * 600, samples, True)
    s0, s1 = (s.time(tokens, tokens * 600, tokens * 600, samples, True) for s in cost.stages)
    assert trip == pytest.approx(s0 + s1 + out.time(tokens, samples) + back.time(tokens, samples))
    assert slowest == max(s0, s1)


def test_tp1_has_no_gather_and_the_hop_carries_the_whole_row() -> None:
    cost = _cost("llama-3-8b", 1, 2)
    link = _machine(2).intra
    assert all(s.gather is None for s in cost.stages)
    assert all(s.parts(8, 800, 800, 8, True)["gather"] == 0.0 for s in cost.stages)
    out = cost.hops[0]
    assert out.time(8, 8) == pytest.approx(link.p2p_latency_s + 8 * 4096 * 2 / link.p2p_bytes_per_s)


def test_the_breakdown_puts_the_gather_with_the_stage_not_the_hops() -> None:
    cost = _cost("llama-3-70b", 2, 2)
    b, prompt, output = 16.0, 512.0, 128.0
    trip, slowest = cost.cycle(b, b * 576, b * 576, b, True)
    cycle = max(trip, 2 * slowest)
    point = Point(2 * b, 1.0, cycle, 0.0, 0.0, 0.0, 2 * b, 0.0, cycle, trip, slowest, 2)
    bd = decode_breakdown(cost, point, prompt, output)
    assert bd["gather"] == pytest.approx(cost.stages[1].handoff_gather(b)) and bd["gather"] > 0
    assert bd["hops"] == pytest.approx(sum(h.time(b, b) for h in cost.hops))
    assert bd["pipeline"] == pytest.approx(cycle - trip)


def test_simulated_stage_busy_includes_the_gather_and_gives_the_engines_bubble() -> None:
    cost = _cost("llama-3-8b", 2, 2)
    p, o = 300, 20
    res = simulate(cost, SimConfig(1, 10_000, 8, 2048), Requests(np.zeros(1), np.array([p]), np.array([o])))
    steps = [(p, p, p * (p + 1) / 2, 1, False)] + [(1, p + i, p + i, 1, True) for i in range(1, o)]
    busy = [sum(s.time(*a) for a in steps) for s in cost.stages]
    assert res.stage_busy_s == pytest.approx(busy, rel=1e-12)
    # The receiving stage's busy time: its own work plus one eager all-gather of each step's rows.
    no_gather = replace(cost.stages[1], gather=None)
    gathers = sum(_eager_gather_2(a[0], 4096 * 2) for a in steps)
    assert gathers > 0
    assert busy[1] == pytest.approx(sum(no_gather.time(*a) for a in steps) + gathers, rel=1e-12)
    # One request: the stages take turns, so the pipeline idles over half its stage-time.
    assert res.bubble == pytest.approx(1 - sum(busy) / (2 * res.makespan_s), rel=1e-12)
    assert res.bubble > 0.5


def test_one_micro_batch_in_flight_runs_the_batch_in_turn() -> None:
    cost = _cost("llama-3-8b", 1, 2)
    prompt, budget, n = 512, 2048, 8
    reqs = Requests(np.zeros(n), np.full(n, prompt), np.ones(n))
    s0, s1 = (s.time(budget, budget, 4 * prompt * (prompt + 1) / 2, 4, False) for s in cost.stages)
    trip = s0 + s1 + cost.hops[0].time(budget, 4) + cost.hops[1].time(budget, 4)
    one = simulate(cost, SimConfig(1, 10**6, n, budget, max_in_flight=1), reqs)
    # One micro-batch: prompts 4-7 leave the head only when prompts 0-3 are back.
    assert one.ttft == pytest.approx([trip] * 4 + [2 * trip] * 4, rel=1e-12)
    two = simulate(cost, SimConfig(1, 10**6, n, budget), reqs)  # the default: one per stage
    assert two.ttft[4:].max() < 2 * trip and two.bubble < one.bubble
    with pytest.raises(ValueError, match="max_in_flight"):
        simulate(cost, SimConfig(1, 10**6, n, budget, max_in_flight=-1), reqs)
