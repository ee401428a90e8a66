"""Replay a workload through a planned layout with the simulator."""

from __future__ import annotations

from dataclasses import replace

from trellis.planner.search import Candidate, Plan, evaluate_layout
from trellis.planner.simulator import SimConfig, SimResult, simulate
from trellis.planner.workload import sample_requests


def sim_config(plan: Plan, c: Candidate) -> SimConfig:
    lay, mach = c.layout, plan.machine
    move_latency = move_per_token = 0.0
    if lay.split:
        link = mach.inter if lay.size >= lay.gpus_per_node else mach.intra
        per_gpu = max(s.kv_bytes_per_token for s in c.memory.stages)
        move_latency, move_per_token = link.p2p_latency_s, per_gpu / link.p2p_bytes_per_s
    return SimConfig(
        replicas=lay.dp,
        kv_tokens=c.memory.kv_tokens,
        max_seqs=plan.options.max_seqs,
        max_batched_tokens=plan.options.max_batched_tokens,
        prefill_replicas=lay.prefill_replicas,
        kv_move_latency_s=move_latency,
        kv_move_s_per_token=move_per_token,
    )


def replay_rate(plan: Plan, c: Candidate) -> float | None:
    """The open-loop rate to replay: the workload's, else 90% of the plan's capacity (None: closed loop)."""
    if plan.workload.concurrency:
        return None
    return plan.workload.rate or 0.9 * c.capacity


def replay(plan: Plan, c: Candidate, requests: int, seed: int = 0, rate: float | None = None) -> SimResult:
    assert c.cost is not None
    r = rate if rate is not None else replay_rate(plan, c)
    reqs = sample_requests(plan.workload, requests, seed, rate=r, max_len=plan.budget.longest_request)
    return simulate(c.cost, sim_config(plan, c), reqs, clients=None if r else plan.workload.concurrency)


def predicted_at(plan: Plan, c: Candidate, rate: float | None) -> Candidate | None:
    """The same layout re-evaluated by the closed forms at the load the simulator replays."""
    workload = replace(plan.workload, rate=rate, concurrency=None) if rate else plan.workload
    options = replace(plan.options, pd_split=c.layout.split, objective="throughput")
    again = evaluate_layout(
        plan.model, replace(c.layout, prefill_replicas=0), plan.machine, workload, options, plan.budget
    )
    same = [x for x in again if x.layout.split == c.layout.split and x.usable]
    return same[0] if same else None
