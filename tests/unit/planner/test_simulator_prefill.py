"""A closed batch in the simulator: queued prompts wait for every chunk before theirs, and the
steady TPOT (what the GPU benchmarks report) leaves those chunk steps out."""

from __future__ import annotations

import numpy as np
import pytest

from trellis.planner.calibration import default_calibration, parse_calibration
from trellis.planner.cost import ReplicaCost, replica_cost
from trellis.planner.hardware import cluster_from_args
from trellis.planner.layout import Layout
from trellis.planner.machine import machine_for
from trellis.planner.model import load_model
from trellis.planner.simulator import SimConfig, simulate
from trellis.planner.workload import Requests

RATE = 400e12  # prefill FLOP/s
LAYER_EAGER = 500e-6


def _cost() -> ReplicaCost:
    raw = {
        **default_calibration().to_dict(),
        "gpus": {"h200": {"hbm_copy_bytes_per_s": 4.2e12, "prefill_flops_per_s": RATE}},
        "layer_graph_s": 30e-6,
        "layer_eager_s": LAYER_EAGER,
        "step_overhead_s": 400e-6,
        "step_overhead_per_seq_s": 30e-6,
    }
    mach = machine_for(cluster_from_args("h200", 1, 1), parse_calibration(raw))
    return replica_cost(load_model("llama-3-8b"), Layout(1, 1, 1, 1, ((0, 32),)), mach, "bf16", 2)


def _batch(n: int, prompt: int, output: int) -> Requests:
    return Requests(np.zeros(n), np.full(n, prompt), np.full(n, output))


def test_ttft_of_the_nth_queued_prompt_grows_with_n() -> None:
    cost, prompt, budget = _cost(), 512, 2048
    (stage,) = cost.stages
    # One-token outputs: no decode rides along, so every step is one full chunk of 4 prompts.
    chunk = stage.time(budget, budget, 4 * prompt * (prompt + 1) / 2, 4, graph=False)
    # A chunk is compute-bound: 2 x params x tokens at the prefill rate, plus the per-layer time
    # (attention FLOPs and host time are the last 2%).
    linear = 2 * 32 * load_model("llama-3-8b").layer_linear_params()
    assert chunk == pytest.approx(linear * budget / RATE + 32 * LAYER_EAGER, rel=0.02)
    for n in (4, 8, 16, 32):
        res = simulate(cost, SimConfig(1, 10**7, n, budget), _batch(n, prompt, 1))
        # The i-th queued prompt waits for every chunk before its own: (i // 4 + 1) chunks.
        assert res.ttft == pytest.approx((np.arange(n) // 4 + 1) * chunk, rel=1e-9)
        assert res.ttft.mean() == pytest.approx((n / 4 + 1) / 2 * chunk, rel=1e-9)


def test_steady_tpot_counts_only_the_gaps_after_every_first_token() -> None:
    cost, p, o = _cost(), 512, 10
    (stage,) = cost.stages
    # Budget p + 1: step 1 prefills prompt A and 1 token of B; step 2 decodes A and finishes B;
    # from step 3 both decode, until A ends at step o and B at step o + 1.
    res = simulate(cost, SimConfig(1, 10**6, 2, p + 1), _batch(2, p, o), gaps=True)

    def step(k: int) -> float:
        ctx = (p + k - 1) + (p + k - 2)  # A and B's contexts at step k
        return stage.time(2, ctx, ctx, 2, graph=True)

    last = stage.time(1, p + o - 1, p + o - 1, 1, graph=True)  # B alone
    expected = (sum(2 * step(k) for k in range(3, o + 1)) + last) / (2 * (o - 2) + 1)
    assert res.steady_tpot == pytest.approx(expected, rel=1e-12)
    # Each request's own (finish - first) / (n - 1) still holds A's step 2, which carries B's prompt.
    assert res.tpot[0] > res.steady_tpot
    with pytest.raises(ValueError, match="gaps=True"):
        _ = simulate(cost, SimConfig(1, 10**6, 2, p + 1), _batch(2, p, o)).steady_tpot


def test_a_batch_fills_every_micro_batch_of_a_pipeline_at_once() -> None:
    raw = {**default_calibration().to_dict(), "layer_eager_s": LAYER_EAGER}
    mach = machine_for(cluster_from_args("h200", 1, 2), parse_calibration(raw))
    cost = replica_cost(load_model("llama-3-8b"), Layout(1, 2, 1, 2, ((0, 16), (16, 32))), mach, "bf16", 2)
    prompt, budget = 512, 2048
    res = simulate(cost, SimConfig(1, 10**7, 8, budget), _batch(8, prompt, 1))
    pairs = 4 * prompt * (prompt + 1) / 2
    s0, s1 = (s.time(budget, budget, pairs, 4, graph=False) for s in cost.stages)
    out, back = cost.hops[0].time(budget, 4), cost.hops[1].time(budget, 4)
    # Micro-batch A (prompts 0-3) and B (4-7) both leave the head at t = 0; B waits for stage 0.
    first = s0 + out + s1 + back
    second = max(2 * s0 + out, s0 + out + s1) + s1 + back
    assert res.ttft == pytest.approx([first] * 4 + [second] * 4, rel=1e-12)
