"""The plan as text (with its arithmetic) and as JSON."""

from __future__ import annotations

import math
from typing import Any

from trellis.planner.explain import decode_breakdown, why_loses
from trellis.planner.memory import StageMemory
from trellis.planner.model import DTYPE_BYTES
from trellis.planner.search import Candidate, Plan


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def _ms(s: float) -> str:
    return f"{s * 1e3:.2f} ms"


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return "\n".join(lines)


def render(plan: Plan, top: int = 10) -> str:
    m, o = plan.model, plan.options
    out = [
        f"Model    {m.name}: {m.layers} layers, hidden {m.hidden}, {m.heads} heads / {m.kv_heads} KV heads x "
        f"{m.head_dim}, vocab {m.vocab}",
        f"         {m.total_params() / 1e9:.2f} B parameters in {o.weight_dtype} = "
        f"{_gb(m.weight_bytes(o.weight_dtype))} of weights",
        f"         KV cache: 2 x {m.layers} layers x {m.kv_heads} KV heads x {m.head_dim} x "
        f"{o.kv_bytes} bytes = {m.kv_bytes_per_token(o.kv_bytes):,} bytes per token",
        f"Cluster  {plan.cluster.describe()}",
        f"Workload {plan.workload.describe()}",
        "Figures  " + "\n         ".join(plan.machine.notes),
        "",
    ]
    best = plan.best
    if best is None:
        out += _refusal(plan)
    else:
        out += _best(plan, best)
    out += ["", f"Layouts considered ({o.objective} objective; best first):", _alternatives(plan, top)]
    return "\n".join(out) + "\n"


def _stage_memory_lines(plan: Plan, c: Candidate, s: StageMemory) -> list[str]:
    m, o, b = plan.model, plan.options, plan.budget
    j = c.memory.stages.index(s)
    n = s.layers[1] - s.layers[0]
    layer = m.layer_linear_params()
    extras = ["embedding" if j == 0 else "", "LM head" if j == c.layout.pp - 1 else ""]
    extra = " + ".join(e for e in extras if e)
    return [
        f"Memory per GPU on stage {j} (layers {s.layers[0]}-{s.layers[1] - 1}, TP {c.layout.tp}):",
        f"  weights    {n} layers x {layer / 1e6:.1f} M / TP {c.layout.tp} x {DTYPE_BYTES[o.weight_dtype]} B"
        f"{' + ' + extra if extra else ''} = {_gb(s.weight_bytes)}",
        f"  workspace  activations of a {b.max_batched_tokens}-token step"
        f"{' + logits' if j == c.layout.pp - 1 else ''} = {_gb(s.workspace_bytes)}",
        f"  budget     {b.utilization:g} x {_gb(b.gpu_memory_bytes)} = {_gb(s.usable_bytes)}",
        f"  KV room    budget - weights - workspace = {_gb(s.kv_room_bytes)}",
        f"  KV/token   2 x {n} layers x {m.kv_heads_per_rank(c.layout.tp)} KV heads x {m.head_dim} x "
        f"{o.kv_bytes} B = {s.kv_bytes_per_token:,} bytes",
    ]


def _refusal(plan: Plan) -> list[str]:
    fits = [c for c in plan.candidates if c.memory.fits]
    if not plan.candidates:
        return [
            f"No layout: TP must divide the model ({plan.model.heads} heads, {plan.model.kv_heads} KV heads) "
            f"and fit the nodes ({plan.cluster.gpus_per_node} GPUs each)."
        ]
    if fits:
        return ["No layout meets the SLOs; each one's reason is in the table below."]
    c = min(plan.candidates, key=lambda c: c.memory.shortfall_bytes())
    s = c.memory.worst
    need = s.weight_bytes + s.workspace_bytes + c.memory.longest_request * s.kv_bytes_per_token
    return [
        f"REFUSED: {plan.model.name} in {plan.options.weight_dtype} fits no layout of "
        f"{plan.cluster.total_gpus} x {plan.cluster.gpu.name}. The roomiest, {c.layout.label()}:",
        *_stage_memory_lines(plan, c, s),
        f"  needed     weights + workspace + KV of the longest request ({c.memory.longest_request} tokens) = "
        f"{_gb(need)} > {_gb(s.usable_bytes)}: short by {_gb(c.memory.shortfall_bytes())} per GPU",
    ]


def _best(plan: Plan, c: Candidate) -> list[str]:
    lay, w = c.layout, plan.workload
    p = c.decode_point
    assert p is not None and c.cost is not None
    out = [
        f"Best plan: {lay.label()} = {lay.gpus} GPUs"
        + (f" ({plan.cluster.total_gpus - lay.gpus} idle)" if lay.gpus < plan.cluster.total_gpus else ""),
        "",
    ]
    out += _stage_memory_lines(plan, c, c.memory.worst)
    reqs = c.memory.kv_tokens / (w.prompt.mean() + w.output.mean())
    out += [
        f"  => {c.memory.kv_tokens:,} tokens of KV per replica (~{reqs:,.0f} requests of "
        f"{w.prompt.mean() + w.output.mean():.0f} tokens)",
        "",
    ]
    out += _decode_lines(plan, c)
    out += ["", *_throughput_lines(plan, c)]
    return out


def _decode_lines(plan: Plan, c: Candidate) -> list[str]:
    p, cost, mach, lay = c.decode_point, c.cost, plan.machine, c.layout
    assert p is not None and cost is not None
    w = plan.workload
    b = p.concurrency / p.micro_batches
    ctx = w.prompt.mean() + w.output.mean() / 2
    slow = max(cost.stages, key=lambda s: s.time(b, b * ctx, b * ctx, b, True))
    parts = slow.parts(b, b * ctx, b * ctx, b, True)
    mem = parts["weights"] + parts["kv"]
    hbm, fl = mach.hbm_bytes_per_s / 1e12, mach.flops(plan.options.weight_dtype) / 1e12
    n = slow.layers
    kv_per_token = slow.kv_read_s_per_token * mach.hbm_bytes_per_s
    hidden = "hidden under" if mem >= parts["compute"] else "longer than"
    bd = decode_breakdown(cost, p, w.prompt.mean(), w.output.mean())
    lines = [
        f"Decode step of one micro-batch ({b:.1f} seqs, mean context {ctx:.0f} tokens) on the slowest stage "
        f"({n} layers):",
        f"  weights read  {_gb(slow.weight_read_s * mach.hbm_bytes_per_s)} / {hbm:.2f} TB/s = "
        f"{_ms(parts['weights'])}",
        f"  KV read       {b:.1f} x {ctx:.0f} tokens x {kv_per_token:,.0f} B / {hbm:.2f} TB/s = "
        f"{_ms(parts['kv'])}",
        f"  compute       {b:.1f} tokens x (2 x params + attention) / {fl:.0f} TFLOP/s = "
        f"{_ms(parts['compute'])} ({hidden} the memory time)",
    ]
    if parts["layers"]:
        lines.append(
            f"  per layer     {n} layers x {parts['layers'] / n * 1e6:.1f} us of small kernels = "
            f"{_ms(parts['layers'])}"
        )
    if slow.allreduce is not None:
        size = b * slow.hidden_bytes
        lines.append(
            f"  all-reduce    {slow.allreduces} x {parts['allreduce'] / slow.allreduces * 1e6:.1f} us "
            f"(one call of {b:.1f} rows x {slow.hidden_bytes:,} B = {size / 1024:,.0f} KB, measured table)"
            f" = {_ms(parts['allreduce'])}"
        )
    if parts["gather"]:
        lines.append(
            f"  PP gather     all-gather of the {lay.tp} TP slices from the previous stage ({b:.1f} rows x "
            f"{slow.hidden_bytes:,} B, eager) = {_ms(parts['gather'])}"
        )
    if parts["overhead"]:
        lines.append(
            f"  host          {_ms(slow.overhead_s)} + {b:.1f} seqs x {slow.overhead_s_per_seq * 1e6:.0f} us"
            f" per plan{f' / {slow.decode_burst} steps' if slow.decode_burst > 1 else ''} = "
            f"{_ms(parts['overhead'])}"
        )
    step = max(mem, parts["compute"]) + sum(parts[k] for k in ("layers", "allreduce", "gather", "overhead"))
    extras = [
        name
        for name, key in (
            ("per layer", "layers"),
            ("all-reduce", "allreduce"),
            ("PP gather", "gather"),
            ("host", "overhead"),
        )
        if parts[key]
    ]
    lines.append(f"  stage step    max(memory, compute){''.join(' + ' + e for e in extras)} = {_ms(step)}")
    if lay.pp > 1:
        lines.append(
            f"  round trip    {lay.pp} stages + {lay.pp} hops ({_ms(bd['hops'])} of hops) = {_ms(p.trip_s)};"
            f" {p.micro_batches} micro-batches in flight: cycle {_ms(p.cycle_s)}, bubble {p.bubble:.0%}"
        )
    extra = "the KV move, spread over the output," if c.split else "prompt chunks"
    lines.append(
        f"  TPOT          cycle {_ms(p.cycle_s)}"
        + (f" + {extra} {_ms(bd['prefill'])}" if bd["prefill"] > 1e-7 else "")
        + f" = {_ms(p.tpot_s)} mean, {_ms(p.tpot_p99_s)} p99 (over requests)"
    )
    return lines


def _throughput_lines(plan: Plan, c: Candidate) -> list[str]:
    w, lay = plan.workload, c.layout
    out_tok = c.rate * w.output.mean()
    lines = []
    if c.split is not None:
        s = c.split
        lines.append(
            f"Prefill replicas: {s.prefill_replicas} x {s.prefill.rate:.2f} req/s, TTFT mean "
            f"{_ms(s.prefill.ttft_mean_s)}, p99 {_ms(s.prefill.ttft_p99_s)} "
            f"(prefill capacity {s.prefill.prefill_load:.0%} used)"
        )
        lines.append(
            f"Decode replicas:  {s.decode_replicas} x {s.decode.rate:.2f} req/s at "
            f"{s.decode.concurrency:.0f} seqs, TPOT {_ms(s.decode.tpot_s)} (KV move included)"
        )
    else:
        p = c.point
        assert p is not None
        chunks = math.ceil(
            w.prompt.mean() / max(1.0, plan.options.max_batched_tokens - p.concurrency / p.micro_batches)
        )
        lines.append(
            f"Prefill: a {w.prompt.mean():.0f}-token prompt in {chunks} chunk(s); TTFT mean "
            f"{_ms(p.ttft_mean_s)}, p99 {_ms(p.ttft_p99_s)} with queueing "
            f"(prefill capacity {p.prefill_load:.0%} used)"
        )
        if p.concurrency < 0.01:
            lines.append("Load:    one request alone (the latency objective; --rate gives a loaded point)")
        else:
            lines.append(
                f"Load:    {p.concurrency:.0f} seqs decoding per replica; {p.rate:.2f} req/s per replica "
                f"x {lay.dp}"
            )
    top = c.capacity * w.output.mean()
    lines.append(
        f"Capacity within the SLOs: {c.capacity:,.2f} req/s = {top:,.0f} output tok/s "
        f"({top / lay.gpus:,.0f} per GPU); what stops more: {c.limit}"
    )
    if c.rate > 0.01:
        lines.append(f"At {c.rate:,.2f} req/s ({out_tok:,.0f} output tok/s): ")
    else:
        lines.append("Alone: ")
    lines[-1] += f"TPOT {_ms(c.tpot_s)} mean, {_ms(c.tpot_p99_s)} p99; TTFT {_ms(c.ttft_mean_s)} mean, "
    lines[-1] += f"{_ms(c.ttft_p99_s)} p99"
    return lines


def _alternatives(plan: Plan, top: int) -> str:
    best = plan.best
    rows = []
    for i, c in enumerate(plan.candidates[:top]):
        use = c.usable
        rows.append(
            [
                str(i + 1) if use else "-",
                c.layout.label(),
                str(c.layout.size),
                f"{c.memory.kv_tokens:,}" if c.memory.fits else "-",
                f"{c.capacity:,.1f}" if use else "-",
                f"{c.capacity * plan.workload.output.mean():,.0f}" if use else "-",
                f"{c.tpot_p99_s * 1e3:.1f}" if use else "-",
                f"{c.ttft_p99_s * 1e3:.0f}" if use else "-",
                why_loses(c, best, plan) if best is not None else (c.rejected or ""),
            ]
        )
    more = len(plan.candidates) - top
    text = table(
        [
            "#",
            "layout",
            "GPUs/replica",
            "KV tokens",
            "req/s max",
            "out tok/s",
            "TPOT p99 ms",
            "TTFT p99 ms",
            "why it loses",
        ],
        rows,
    )
    return text + (f"\n({more} more; --top N shows them)" if more > 0 else "")


# ---- JSON ----------------------------------------------------------------------------------------


def candidate_json(c: Candidate, plan: Plan) -> dict[str, Any]:
    lay = c.layout
    out: dict[str, Any] = {
        "tp": lay.tp,
        "pp": lay.pp,
        "dp": lay.dp,
        "prefill_replicas": lay.prefill_replicas,
        "gpus": lay.gpus,
        "stage_layers": [list(r) for r in lay.stage_layers],
        "fits": c.memory.fits,
        "kv_tokens_per_replica": c.memory.kv_tokens,
        "memory_per_gpu": [
            {
                "layers": list(s.layers),
                "weights_bytes": s.weight_bytes,
                "workspace_bytes": s.workspace_bytes,
                "kv_room_bytes": s.kv_room_bytes,
                "kv_bytes_per_token": s.kv_bytes_per_token,
            }
            for s in c.memory.stages
        ],
        "rejected": c.rejected,
        "limit": c.limit,
        "capacity_req_s": c.capacity,
    }
    if c.usable:
        out.update(
            {
                "rate_req_s": c.rate,
                "output_tok_s": c.rate * plan.workload.output.mean(),
                "tpot_s": c.tpot_s,
                "tpot_p99_s": c.tpot_p99_s,
                "ttft_mean_s": c.ttft_mean_s,
                "ttft_p99_s": c.ttft_p99_s,
            }
        )
        p = c.decode_point
        if p is not None and c.cost is not None:
            out["concurrency_per_replica"] = p.concurrency
            out["tpot_breakdown_s"] = decode_breakdown(
                c.cost, p, plan.workload.prompt.mean(), plan.workload.output.mean()
            )
    best = plan.best
    out["why"] = why_loses(c, best, plan) if best is not None else c.rejected
    return out


def plan_json(plan: Plan) -> dict[str, Any]:
    m, cl, w = plan.model, plan.cluster, plan.workload
    return {
        "model": {
            "name": m.name,
            "params": m.total_params(),
            "weight_dtype": plan.options.weight_dtype,
            "weight_bytes": m.weight_bytes(plan.options.weight_dtype),
            "kv_bytes_per_token": m.kv_bytes_per_token(plan.options.kv_bytes),
        },
        "cluster": {
            "gpu": cl.gpu.name,
            "nodes": cl.nodes,
            "gpus_per_node": cl.gpus_per_node,
            "intra": cl.intra.kind,
            "inter": cl.inter.kind,
        },
        "workload": {
            "prompt_mean": w.prompt.mean(),
            "output_mean": w.output.mean(),
            "rate": w.rate,
            "concurrency": w.concurrency,
            "ttft_slo_s": w.ttft_slo_s,
            "tpot_slo_s": w.tpot_slo_s,
        },
        "objective": plan.options.objective,
        "figures": list(plan.machine.notes),
        "best": candidate_json(plan.best, plan) if plan.best else None,
        "candidates": [candidate_json(c, plan) for c in plan.candidates],
    }
