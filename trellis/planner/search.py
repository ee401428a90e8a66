"""The search: every layout that splits the model, evaluated, ranked, the best first.

Throughput objective: the most requests per second the cluster serves within the SLOs (with a
``rate``, only layouts that serve it count). Latency objective: the lowest TPOT at the given load
(one request alone when none is given), then the lowest TTFT.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from trellis.planner.analytic import Colocated, Demand, Point
from trellis.planner.calibration import Calibration
from trellis.planner.cost import ReplicaCost, replica_cost
from trellis.planner.disagg import Disaggregated, SplitPoint
from trellis.planner.errors import PlanError
from trellis.planner.hardware import Cluster
from trellis.planner.layout import Layout, candidate_layouts
from trellis.planner.machine import Machine, machine_for
from trellis.planner.memory import Budget, ReplicaMemory, replica_memory
from trellis.planner.model import ModelShape
from trellis.planner.workload import Z90, Workload

OBJECTIVES = ("throughput", "latency")


@dataclass(frozen=True)
class PlanOptions:
    weight_dtype: str = "bf16"
    kv_bytes: int = 2
    utilization: float = 0.85
    max_batched_tokens: int = 2048
    max_seqs: int = 1024
    objective: str = "throughput"
    cross_node_tp: bool = False
    pd_split: bool = False
    tp: int | None = None  # only layouts with this TP (and/or PP)
    pp: int | None = None


@dataclass(frozen=True)
class Candidate:
    layout: Layout
    memory: ReplicaMemory
    cost: ReplicaCost | None = None
    point: Point | None = None  # per replica at the operating load (co-located replicas)
    split: SplitPoint | None = None  # at the operating load (prefill/decode split)
    capacity: float = 0.0  # requests/s the whole layout serves within the SLOs
    limit: str = ""  # what stops the capacity going higher
    rejected: str | None = None  # why this layout cannot be used, one line

    @property
    def usable(self) -> bool:
        return self.rejected is None

    @property
    def rate(self) -> float:
        """Requests per second at the operating load (the whole layout)."""
        if self.split is not None:
            return self.split.rate
        return self.point.rate * self.layout.dp if self.point else 0.0

    @property
    def tpot_s(self) -> float:
        return self.split.decode.tpot_s if self.split else self.point.tpot_s if self.point else float("inf")

    @property
    def tpot_p99_s(self) -> float:
        p = self.decode_point
        return p.tpot_p99_s if p else float("inf")

    @property
    def ttft_p99_s(self) -> float:
        return (
            self.split.prefill.ttft_p99_s
            if self.split
            else self.point.ttft_p99_s
            if self.point
            else float("inf")
        )

    @property
    def ttft_mean_s(self) -> float:
        return (
            self.split.prefill.ttft_mean_s
            if self.split
            else self.point.ttft_mean_s
            if self.point
            else float("inf")
        )

    @property
    def decode_point(self) -> Point | None:
        return self.split.decode if self.split else self.point


@dataclass(frozen=True)
class Plan:
    model: ModelShape
    cluster: Cluster
    machine: Machine
    workload: Workload
    options: PlanOptions
    budget: Budget
    candidates: tuple[Candidate, ...]  # ranked: usable ones first, best first

    @property
    def best(self) -> Candidate | None:
        return self.candidates[0] if self.candidates and self.candidates[0].usable else None


def make_plan(
    model: ModelShape, cluster: Cluster, workload: Workload, calibration: Calibration, options: PlanOptions
) -> Plan:
    _check_options(model, cluster, options)
    machine = machine_for(cluster, calibration)
    budget = Budget(
        cluster.gpu.memory_bytes,
        options.utilization,
        options.weight_dtype,
        options.kv_bytes,
        options.max_batched_tokens,
        options.max_seqs,
        min(workload.longest_request(), model.max_len),
    )
    layouts = candidate_layouts(
        model, cluster, cross_node_tp=options.cross_node_tp, tp=options.tp, pp=options.pp
    )
    found: list[Candidate] = []
    for layout in layouts:
        found.extend(evaluate_layout(model, layout, machine, workload, options, budget))
    return Plan(model, cluster, machine, workload, options, budget, tuple(_rank(found, options.objective)))


def _check_options(model: ModelShape, cluster: Cluster, o: PlanOptions) -> None:
    if o.objective not in OBJECTIVES:
        raise PlanError(f"objective must be one of {', '.join(OBJECTIVES)}, got {o.objective!r}")
    if o.tp is not None:
        problem = model.tp_problem(o.tp)
        if problem:
            raise PlanError(f"--tp {o.tp}: {problem}")
        if o.tp > cluster.gpus_per_node and not o.cross_node_tp:
            raise PlanError(f"--tp {o.tp} spans nodes of {cluster.gpus_per_node} GPUs; add --cross-node-tp")
        if o.tp > cluster.total_gpus:
            raise PlanError(f"--tp {o.tp}: the cluster has only {cluster.total_gpus} GPUs")
    if o.pp is not None and o.pp > model.layers:
        raise PlanError(f"--pp {o.pp}: the model has only {model.layers} layers")


def replica_demand(model: ModelShape, workload: Workload, options: PlanOptions, mem: ReplicaMemory) -> Demand:
    return Demand(
        workload.prompt.mean(),
        workload.prompt.p99(),
        workload.output.mean(),
        max(2.0, workload.output.quantile(-Z90, 0.10)),
        mem.kv_tokens,
        options.max_seqs,
        options.max_batched_tokens,
        workload.ttft_slo_s,
        workload.tpot_slo_s,
    )


def evaluate_layout(
    model: ModelShape,
    layout: Layout,
    machine: Machine,
    workload: Workload,
    options: PlanOptions,
    budget: Budget,
) -> list[Candidate]:
    mem = replica_memory(model, layout, budget)
    if not mem.fits:
        short = mem.shortfall_bytes()
        return [Candidate(layout, mem, rejected=f"does not fit: short by {short / 1e9:.1f} GB per GPU")]
    cost = replica_cost(model, layout, machine, options.weight_dtype, options.kv_bytes)
    demand = replica_demand(model, workload, options, mem)
    out = [_colocated(layout, mem, cost, demand, workload, options)]
    if options.pd_split and layout.dp >= 2 and not workload.concurrency:
        out.append(_split(model, layout, mem, cost, demand, machine, workload, options))
    return out


def _colocated(
    layout: Layout,
    mem: ReplicaMemory,
    cost: ReplicaCost,
    demand: Demand,
    workload: Workload,
    options: PlanOptions,
) -> Candidate:
    an = Colocated(cost, demand)
    best, limit = an.best()
    base = Candidate(layout, mem, cost, capacity=best.rate * layout.dp if best else 0.0, limit=limit)
    if best is None:
        alone = an.point(1e-3)
        return replace(base, point=alone, rejected=_unloaded_miss(limit, alone, demand))
    if workload.rate:
        point = an.at_rate(workload.rate / layout.dp)
        if point is None or an.violation(point):
            return replace(
                base,
                point=point,
                rejected=f"cannot serve {workload.rate:g} req/s within the SLOs "
                f"(at most {base.capacity:.3g}; {limit})",
            )
        return replace(base, point=point)
    if workload.concurrency:
        point = an.at_concurrency(workload.concurrency / layout.dp)
        why = an.violation(point)
        if why:
            return replace(base, point=point, rejected=f"{workload.concurrency} clients break the {why}")
        return replace(base, point=point)
    if options.objective == "latency":
        return replace(base, point=an.point(1e-3))
    return replace(base, point=best)


def _split(
    model: ModelShape,
    layout: Layout,
    mem: ReplicaMemory,
    cost: ReplicaCost,
    demand: Demand,
    machine: Machine,
    workload: Workload,
    options: PlanOptions,
) -> Candidate:
    # Every GPU sends its own slice of the prompt's KV; across nodes unless two replicas share one.
    link = machine.inter if layout.size >= layout.gpus_per_node else machine.intra
    per_gpu = max(s.kv_bytes_per_token for s in mem.stages) * demand.prompt_mean
    an = Disaggregated(cost, demand, link.send_s(per_gpu))
    best, limit = an.best(layout.dp)
    k = best.prefill_replicas if best else 1
    lay = replace(layout, prefill_replicas=k)
    base = Candidate(lay, mem, cost, capacity=best.rate if best else 0.0, limit=limit)
    if best is None:
        return replace(base, rejected=f"prefill/decode split: {limit} missed even unloaded")
    if workload.rate:
        at = an.at_rate(layout.dp, workload.rate)
        if at is None or an.prefill_violation(at.prefill) or an.decode_violation(at.decode):
            return replace(
                base,
                rejected=f"cannot serve {workload.rate:g} req/s within the SLOs "
                f"(at most {base.capacity:.3g}; {limit})",
            )
        return replace(base, layout=replace(layout, prefill_replicas=at.prefill_replicas), split=at)
    if options.objective == "latency":
        low = SplitPoint(
            an.prefill_point(1e-6) or best.prefill, an.decode_point(1e-3) or best.decode, k, layout.dp - k
        )
        return replace(base, split=low)
    return replace(base, split=best)


def _unloaded_miss(limit: str, alone: Point | None, d: Demand) -> str:
    if limit == "TPOT SLO" and alone is not None:
        return f"misses the TPOT SLO even alone ({alone.tpot_s * 1e3:.1f} ms > {d.tpot_slo_s * 1e3:g} ms)"
    if limit == "TTFT SLO" and alone is not None:
        return f"misses the TTFT SLO even alone ({alone.ttft_p99_s * 1e3:.0f} ms > {d.ttft_slo_s * 1e3:g} ms)"
    return f"cannot run even one request ({limit})"


def _rank(found: list[Candidate], objective: str) -> list[Candidate]:
    usable = [c for c in found if c.usable]
    rejected = [c for c in found if not c.usable]
    if objective == "latency":
        usable.sort(key=lambda c: (c.tpot_s, c.ttft_p99_s, c.layout.size))
    else:
        usable.sort(key=lambda c: (-c.capacity, c.tpot_s, c.layout.size))
    rejected.sort(key=lambda c: (c.memory.fits, c.capacity), reverse=True)
    return usable + rejected
