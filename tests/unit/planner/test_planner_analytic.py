"""The closed forms the search ranks by agree with the simulator that replays the same plan."""

from __future__ import annotations

import pytest

from trellis.planner.analytic import Colocated
from trellis.planner.calibration import default_calibration
from trellis.planner.hardware import cluster_from_args
from trellis.planner.model import load_model
from trellis.planner.replay import replay
from trellis.planner.search import PlanOptions, make_plan, replica_demand
from trellis.planner.workload import Lengths, Workload


@pytest.mark.parametrize(("tp", "pp"), [(4, 1), (2, 4)])
@pytest.mark.parametrize("load", [0.5, 0.9])
def test_model_and_simulator_agree(tp: int, pp: int, load: float) -> None:
    model = load_model("llama-3-70b")
    w = Workload(Lengths("fixed", 1024), Lengths("fixed", 256))
    plan = make_plan(
        model, cluster_from_args("h100-sxm"), w, default_calibration(), PlanOptions(tp=tp, pp=pp)
    )
    (c,) = plan.candidates
    rate = load * c.capacity
    point = Colocated(c.cost, replica_demand(model, w, plan.options, c.memory)).at_rate(rate / c.layout.dp)
    assert point is not None
    sim = replay(plan, c, 3000, seed=0, rate=rate).summary()
    assert sim["tpot_s"]["mean"] == pytest.approx(point.tpot_s, rel=0.1)
    assert sim["ttft_s"]["mean"] == pytest.approx(point.ttft_mean_s, rel=0.3)
    assert sim["throughput_req_s"] == pytest.approx(rate, rel=0.1)


def test_best_point_sits_on_its_binding_limit() -> None:
    model = load_model("llama-3-70b")
    w = Workload(Lengths("fixed", 1024), Lengths("fixed", 256), tpot_slo_s=0.03)
    plan = make_plan(model, cluster_from_args("h100-sxm"), w, default_calibration(), PlanOptions(tp=8, pp=1))
    (c,) = plan.candidates
    assert c.limit == "TPOT SLO" and c.point is not None
    assert c.point.tpot_p99_s == pytest.approx(0.03, rel=1e-3)
    an = Colocated(c.cost, replica_demand(model, w, plan.options, c.memory))
    assert an.violation(an.point(c.point.concurrency * 1.01)) == "TPOT SLO"
