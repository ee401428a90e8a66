"""The simulator as a single-server queue: Poisson arrivals, deterministic service (M/D/1)."""

from __future__ import annotations

import numpy as np
import pytest

from trellis.planner.calibration import default_calibration
from trellis.planner.cost import replica_cost
from trellis.planner.hardware import cluster_from_args
from trellis.planner.layout import Layout
from trellis.planner.machine import machine_for
from trellis.planner.model import load_model
from trellis.planner.simulator import SimConfig, simulate
from trellis.planner.workload import Lengths, Workload, sample_requests


@pytest.mark.parametrize("rho", [0.5, 0.8])
def test_mean_wait_matches_pollaczek_khinchine(rho: float) -> None:
    m = load_model("llama-3-8b")
    mach = machine_for(cluster_from_args("h100-sxm"), default_calibration())
    cost = replica_cost(m, Layout(1, 1, 1, 8, ((0, 32),)), mach, "bf16", 2)
    prompt = 512
    # One sequence at a time, one output token: every request is one prefill step of the same length.
    service = cost.cycle(prompt, prompt, prompt * (prompt + 1) // 2, 1, graph=False)[0]
    w = Workload(Lengths("fixed", prompt), Lengths("fixed", 1))
    reqs = sample_requests(w, 100_000, seed=7, rate=rho / service)
    res = simulate(cost, SimConfig(1, 10_000, 1, 2048), reqs)
    wait = res.ttft - service
    assert wait.min() >= -1e-12
    formula = rho * service / (2 * (1 - rho))
    assert np.mean(wait) == pytest.approx(formula, rel=0.05)
