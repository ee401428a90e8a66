"""The simulator against closed forms and its own invariants."""

from __future__ import annotations

import numpy as np
import pytest

from trellis.planner.calibration import default_calibration
from trellis.planner.cost import ReplicaCost, replica_cost
from trellis.planner.errors import PlanError
from trellis.planner.hardware import cluster_from_args
from trellis.planner.layout import Layout, split_layers
from trellis.planner.machine import machine_for
from trellis.planner.model import load_model
from trellis.planner.simulator import SimConfig, simulate
from trellis.planner.workload import Lengths, Requests, Workload, sample_requests


def _cost(tp: int, pp: int, nodes: int = 1, model: str = "llama-3-8b") -> ReplicaCost:
    m = load_model(model)
    mach = machine_for(cluster_from_args("h100-sxm", nodes), default_calibration())
    return replica_cost(m, Layout(tp, pp, 1, 8, split_layers(m.layers, pp)), mach, "bf16", 2)


def _one(prompt: int, output: int) -> Requests:
    return Requests(np.array([0.5]), np.array([prompt]), np.array([output]))


def _trip(cost: ReplicaCost, tokens: int, reads: float, pairs: float, samples: int, graph: bool) -> float:
    return cost.cycle(tokens, reads, pairs, samples, graph)[0]


@pytest.mark.parametrize(("tp", "pp", "nodes"), [(1, 1, 1), (2, 1, 1), (2, 3, 1), (8, 2, 2)])
def test_one_request_alone_is_the_sum_of_its_step_times(tp: int, pp: int, nodes: int) -> None:
    cost = _cost(tp, pp, nodes)
    p, o = 700, 40
    res = simulate(cost, SimConfig(1, 100_000, 8, 2048), _one(p, o))
    prefill = _trip(cost, p, p, p * (p + 1) // 2, 1, graph=False)
    decode = sum(_trip(cost, 1, p + i, p + i, 1, graph=True) for i in range(1, o))
    assert res.ttft[0] == pytest.approx(prefill, rel=1e-12)
    assert res.finish[0] - res.first[0] == pytest.approx(decode, rel=1e-12)
    assert res.steps == o


def test_a_long_prompt_is_chunked_by_the_step_budget() -> None:
    cost = _cost(1, 1)
    p, budget = 5000, 2048
    res = simulate(cost, SimConfig(1, 100_000, 8, budget), _one(p, 1))
    expected, done = 0.0, 0
    while done < p:
        c = min(budget, p - done)
        expected += _trip(cost, c, done + c, c * done + c * (c + 1) // 2, 1 if done + c == p else 0, False)
        done += c
    assert res.ttft[0] == pytest.approx(expected, rel=1e-12)
    assert res.steps == 3


def test_kv_room_and_sequence_limits_hold() -> None:
    cost = _cost(1, 1)
    w = Workload(Lengths("uniform", 100, 400), Lengths("uniform", 10, 60), rate=200.0)
    reqs = sample_requests(w, 3000, seed=3)
    room = 3000
    res = simulate(cost, SimConfig(2, room, 6, 512), reqs)
    assert res.kv_peak_fraction <= 1.0
    assert np.all(res.finish >= res.first) and np.all(res.first > res.arrival)
    assert len(res.finish) == 3000 and np.all(res.finish > 0)


def test_closed_loop_keeps_the_clients_in_flight() -> None:
    cost = _cost(2, 2)
    w = Workload(Lengths("fixed", 300), Lengths("fixed", 30))
    reqs = sample_requests(w, 500, seed=0)
    res = simulate(cost, SimConfig(2, 50_000, 64, 2048), reqs, clients=16)
    starts, ends = np.sort(res.arrival), np.sort(res.finish)
    # Requests in flight just after each start (one that ends at that instant is already out).
    in_flight = np.searchsorted(starts, starts, side="right") - np.searchsorted(ends, starts, side="right")
    assert in_flight.max() == 16
    assert np.all(res.arrival[16:] > 0)  # later requests start when earlier ones finish


def test_more_replicas_at_the_same_rate_means_less_waiting() -> None:
    cost = _cost(1, 1)
    w = Workload(Lengths("fixed", 1000), Lengths("fixed", 100), rate=60.0)
    reqs = sample_requests(w, 4000, seed=1)
    few = simulate(cost, SimConfig(2, 200_000, 256, 2048), reqs)
    many = simulate(cost, SimConfig(8, 200_000, 256, 2048), reqs)
    assert many.ttft.mean() < few.ttft.mean()
    assert many.tpot.mean() < few.tpot.mean()


def test_prefill_decode_split_hands_requests_over() -> None:
    cost = _cost(8, 1)
    w = Workload(Lengths("fixed", 2000), Lengths("fixed", 50), rate=20.0)
    reqs = sample_requests(w, 600, seed=2)
    move_latency, per_token = 1e-3, 1e-6
    cfg = SimConfig(
        3,
        500_000,
        256,
        2048,
        prefill_replicas=1,
        kv_move_latency_s=move_latency,
        kv_move_s_per_token=per_token,
    )
    res = simulate(cost, cfg, reqs)
    assert np.all(res.finish > res.first)
    # The second token comes after the KV move and one decode step at least.
    assert np.all(res.finish - res.first >= move_latency + 2000 * per_token)


def test_a_request_larger_than_the_kv_room_is_refused() -> None:
    with pytest.raises(PlanError, match="exceeds a replica's KV room"):
        simulate(_cost(1, 1), SimConfig(1, 100, 8, 2048), _one(90, 20))


def test_many_replicas_and_requests_run_fast() -> None:
    cost = _cost(4, 1, model="llama-3-70b")
    w = Workload(Lengths("lognormal", 800, 0.6, 8000), Lengths("lognormal", 200, 0.6, 2000), rate=1500.0)
    res = simulate(cost, SimConfig(128, 400_000, 1024, 2048), sample_requests(w, 20_000, seed=0))
    assert res.wall_s < 20
    summary = res.summary()
    assert summary["requests"] == 20_000 and 0 < summary["busy_fraction"] <= 1
    assert summary["ttft_s"]["p99"] >= summary["ttft_s"]["p50"] > 0
