"""Where the time goes in a plan, and why a runner-up loses to the best plan."""

from __future__ import annotations

from types import MappingProxyType

from trellis.planner.analytic import Point
from trellis.planner.cost import ReplicaCost
from trellis.planner.search import Candidate, Plan

PARTS = (
    "weights",
    "kv",
    "compute",
    "layers",
    "allreduce",
    "gather",
    "hops",
    "overhead",
    "pipeline",
    "prefill",
)
PART_NAMES = MappingProxyType(
    {
        "weights": "reading weights",
        "kv": "reading the KV cache",
        "compute": "matmul compute",
        "layers": "per-layer small kernels",
        "allreduce": "TP all-reduces",
        "gather": "PP hand-off all-gathers",
        "hops": "PP hops",
        "overhead": "host overhead",
        "pipeline": "waiting on the slowest stage",
        "prefill": "prompt chunks (or KV moves)",
    }
)


def decode_breakdown(
    cost: ReplicaCost, point: Point, prompt_mean: float, output_mean: float
) -> dict[str, float]:
    """TPOT split into parts: a decode-only round trip (each stage's max(memory, compute) shown as
    whichever wins, plus its per-layer time, all-reduces, the all-gather of the hidden states it
    receives as TP slices and its host time), the hops (transfers only), the wait for
    the slowest stage, and the stretch that prompts riding in some steps add."""
    b = point.concurrency / point.micro_batches
    ctx = prompt_mean + output_mean / 2
    out = dict.fromkeys(PARTS, 0.0)
    for stage in cost.stages:
        parts = stage.parts(b, b * ctx, b * ctx, b, True)
        if parts["weights"] + parts["kv"] >= parts["compute"]:
            parts["compute"] = 0.0
        else:
            parts["weights"] = parts["kv"] = 0.0
        for k, v in parts.items():
            out[k] += v
    for hop in cost.hops:
        out["hops"] += hop.time(b, b)
    out["pipeline"] = max(0.0, point.cycle_s - point.trip_s)
    out["prefill"] = max(0.0, point.tpot_s - point.cycle_s)
    return out


def per_token_gpu_ms(c: Candidate, plan: Plan) -> dict[str, float]:
    """GPU-milliseconds each output token costs at the layout's capacity (all its GPUs, prefill
    replicas included), split in the proportions of the decode TPOT's parts."""
    p = c.decode_point
    if p is None or c.cost is None or c.capacity <= 0:
        return {}
    parts = decode_breakdown(c.cost, p, plan.workload.prompt.mean(), plan.workload.output.mean())
    total = sum(parts.values())
    gpu_ms = c.layout.gpus / (c.capacity * plan.workload.output.mean()) * 1e3
    return {k: v / total * gpu_ms for k, v in parts.items()}


def why_loses(c: Candidate, best: Candidate, plan: Plan) -> str:
    if c is best:
        return "best"
    if c.rejected:
        return c.rejected
    latency = plan.options.objective == "latency"
    if latency:
        mine, theirs = _latency_parts(c, plan), _latency_parts(best, plan)
        head = f"TPOT {c.tpot_s * 1e3:.1f} ms vs {best.tpot_s * 1e3:.1f}"
        unit = "ms"
    else:
        mine, theirs = per_token_gpu_ms(c, plan), per_token_gpu_ms(best, plan)
        lost = 1 - c.capacity / best.capacity if best.capacity else 0.0
        if lost < 0.02:
            return "ties with the best (within 2%); ranked by TPOT, then fewer GPUs per replica"
        head = f"{lost:.0%} less throughput"
        unit = "GPU-ms/token"
        p = c.decode_point
        if c.split:
            head += f" (the {c.limit} binds)"
        elif p is not None:
            head += f" ({c.limit} caps a replica at {p.concurrency:.0f} seqs)"
    idle = plan.cluster.total_gpus - c.layout.gpus
    tail = f"; {idle} GPUs idle" if idle else ""
    if not mine or not theirs:
        return head + tail
    worst = max(PARTS, key=lambda k: mine.get(k, 0.0) - theirs.get(k, 0.0))
    if mine[worst] - theirs[worst] <= 0:
        return head + tail
    return f"{head}: {PART_NAMES[worst]} {mine[worst]:.2f} vs {theirs[worst]:.2f} {unit}{tail}"


def _latency_parts(c: Candidate, plan: Plan) -> dict[str, float]:
    p = c.decode_point
    if p is None or c.cost is None:
        return {}
    parts = decode_breakdown(c.cost, p, plan.workload.prompt.mean(), plan.workload.output.mean())
    return {k: v * 1e3 for k, v in parts.items()}
