"""``trellis plan``: lay a model onto a cluster, show the arithmetic, replay a workload, emit a spec.

Exit status: 0 with a plan that meets the SLOs, 1 when no layout does (or none fits), 2 for bad
input (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from trellis.core.engine_config import EngineConfig
from trellis.core.presets import PRESETS
from trellis.core.spec import SpecError
from trellis.planner.calibration import default_calibration, load_calibration
from trellis.planner.emit import emit_spec
from trellis.planner.errors import PlanError
from trellis.planner.hardware import GPU_PRESETS, cluster_from_args, load_cluster
from trellis.planner.model import DTYPE_BYTES, WEIGHT_DTYPES, load_model
from trellis.planner.replay import predicted_at, replay, replay_rate
from trellis.planner.report import plan_json, render, table
from trellis.planner.search import OBJECTIVES, PlanOptions, make_plan
from trellis.planner.validate import load_results, validation_table
from trellis.planner.workload import Workload, parse_lengths


def add_parser(subparsers: Any) -> None:
    """Add the ``plan`` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser(
        "plan",
        help="lay a model onto a cluster and predict what it delivers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=run)  # trellis.cli.main dispatches through args.func


def add_arguments(p: argparse.ArgumentParser) -> None:
    engine = EngineConfig()
    m = p.add_argument_group("model")
    m.add_argument("--model", help=f"a preset ({', '.join(PRESETS)}) or a config.json / model directory")
    m.add_argument("--dtype", choices=WEIGHT_DTYPES, default="bf16", help="weight dtype (default bf16)")
    m.add_argument("--kv-dtype", choices=WEIGHT_DTYPES, default="bf16", help="KV cache dtype (default bf16)")
    c = p.add_argument_group("cluster")
    c.add_argument("--gpu", help=f"GPU preset: {', '.join(GPU_PRESETS)}")
    c.add_argument("--nodes", type=int, default=1)
    c.add_argument("--gpus-per-node", type=int, default=None, help="default: the preset's (8)")
    c.add_argument("--cluster", help="cluster YAML (see docs/planner.md) instead of --gpu/--nodes")
    c.add_argument("--calibration", help="calibration JSON written by the GPU benchmarks")
    w = p.add_argument_group("workload")
    w.add_argument("--prompt-len", default="1024", help="N, uniform:LOW:HIGH or lognormal:MEAN:SIGMA[:MAX]")
    w.add_argument("--output-len", default="256", help="as --prompt-len")
    w.add_argument("--rate", type=float, help="arrivals per second (Poisson)")
    w.add_argument("--concurrency", type=int, help="clients with one request each in flight (closed loop)")
    w.add_argument("--ttft-slo", type=float, default=2.0, help="p99 time to first token, seconds (default 2)")
    w.add_argument(
        "--tpot-slo", type=float, default=0.05, help="p99 time per output token, seconds (default 0.05)"
    )
    s = p.add_argument_group("search")
    s.add_argument("--objective", choices=OBJECTIVES, default="throughput")
    s.add_argument("--tp", type=int, help="only this TP")
    s.add_argument("--pp", type=int, help="only this PP")
    s.add_argument("--cross-node-tp", action="store_true", help="let a TP group span nodes")
    s.add_argument("--pd-split", action="store_true", help="also consider prefill/decode split replicas")
    s.add_argument("--max-seqs", type=int, default=1024, help="sequences per replica (engine max_num_seqs)")
    s.add_argument("--max-batched-tokens", type=int, default=engine.max_num_batched_tokens)
    s.add_argument("--gpu-memory-utilization", type=float, default=engine.gpu_memory_utilization)
    o = p.add_argument_group("output")
    o.add_argument("--top", type=int, default=10, help="layouts shown in the table")
    o.add_argument("--json", action="store_true", help="print JSON instead of the report")
    o.add_argument(
        "--simulate", type=int, default=0, metavar="N", help="replay N requests through the best plan"
    )
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--emit-spec", metavar="FILE", help="write the best plan as a deploy spec")
    o.add_argument("--base-port", type=int, default=50051)
    o.add_argument(
        "--validate", nargs="+", metavar="RESULTS", help="predicted vs measured for benchmark results"
    )


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (PlanError, SpecError, ValueError) as e:
        sys.stderr.write(f"trellis plan: error: {e}\n")
        return 2


def _run(args: argparse.Namespace) -> int:
    calibration = load_calibration(args.calibration) if args.calibration else default_calibration()
    if args.validate:
        sys.stdout.write(validation_table(load_results(args.validate), calibration))
        return 0
    if not args.model:
        raise PlanError("--model is required (a preset or a config.json path)")
    model = load_model(args.model)
    cluster = _cluster(args)
    workload = _workload(args, model.max_len)
    options = _options(args)
    plan = make_plan(model, cluster, workload, calibration, options)
    best = plan.best
    doc: dict[str, Any] = plan_json(plan) if args.json else {}
    text = [] if args.json else [render(plan, args.top)]
    if args.simulate and best is not None:
        sim = replay(plan, best, args.simulate, args.seed)
        if args.json:
            doc["simulation"] = sim.summary()
        else:
            text.append(_simulation_text(plan, best, sim.summary(), args.simulate))
    if args.emit_spec and best is not None:
        spec = emit_spec(plan, best, args.emit_spec, args.base_port)
        text.append(f"Wrote the deploy spec to {args.emit_spec} ({len(spec.replicas)} replicas).\n")
    sys.stdout.write(json.dumps(doc, indent=2) + "\n" if args.json else "\n".join(text))
    return 0 if best is not None else 1


def _cluster(args: argparse.Namespace) -> Any:
    if args.cluster and args.gpu:
        raise PlanError("give either --cluster FILE or --gpu TYPE, not both")
    if args.cluster:
        return load_cluster(args.cluster)
    if not args.gpu:
        raise PlanError(f"--gpu TYPE (one of {', '.join(GPU_PRESETS)}) or --cluster FILE is required")
    return cluster_from_args(args.gpu, args.nodes, args.gpus_per_node)


def _workload(args: argparse.Namespace, max_len: int) -> Workload:
    if args.rate is not None and args.concurrency is not None:
        raise PlanError("give either --rate or --concurrency, not both")
    if args.rate is not None and args.rate <= 0:
        raise PlanError(f"--rate must be > 0, got {args.rate:g}")
    if args.concurrency is not None and args.concurrency < 1:
        raise PlanError(f"--concurrency must be >= 1, got {args.concurrency}")
    if args.ttft_slo <= 0 or args.tpot_slo <= 0:
        raise PlanError("--ttft-slo and --tpot-slo must be > 0 seconds")
    return Workload(
        parse_lengths(args.prompt_len, "--prompt-len", max_len),
        parse_lengths(args.output_len, "--output-len", max_len),
        args.rate,
        args.concurrency,
        args.ttft_slo,
        args.tpot_slo,
    )


def _options(args: argparse.Namespace) -> PlanOptions:
    for name in ("max_seqs", "max_batched_tokens", "top", "base_port"):
        if getattr(args, name) < 1:
            raise PlanError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("tp", "pp"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise PlanError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not 0.05 <= args.gpu_memory_utilization <= 1:
        raise PlanError(f"--gpu-memory-utilization must be in [0.05, 1], got {args.gpu_memory_utilization:g}")
    return PlanOptions(
        weight_dtype=args.dtype,
        kv_bytes=DTYPE_BYTES[args.kv_dtype],
        utilization=args.gpu_memory_utilization,
        max_batched_tokens=args.max_batched_tokens,
        max_seqs=args.max_seqs,
        objective=args.objective,
        cross_node_tp=args.cross_node_tp,
        pd_split=args.pd_split,
        tp=args.tp,
        pp=args.pp,
    )


def _simulation_text(plan: Any, best: Any, s: dict[str, Any], n: int) -> str:
    rate = replay_rate(plan, best)
    load = f"{rate:,.2f} req/s (Poisson)" if rate else f"{plan.workload.concurrency} clients (closed loop)"
    model = predicted_at(plan, best, rate) or best

    def ms(x: float, digits: int = 1) -> str:
        return f"{x * 1e3:.{digits}f}"

    t, p = s["ttft_s"], s["tpot_s"]
    rows = [
        ["TTFT", ms(model.ttft_mean_s), ms(model.ttft_p99_s), ms(t["mean"]), ms(t["p50"]), ms(t["p99"])],
        [
            "TPOT",
            ms(model.tpot_s, 2),
            ms(model.tpot_p99_s, 2),
            ms(p["mean"], 2),
            ms(p["p50"], 2),
            ms(p["p99"], 2),
        ],
    ]
    head = (
        f"\nSimulated: {n:,} requests at {load} through {best.layout.label()}: "
        f"{s['throughput_req_s']:,.2f} req/s, {s['output_tok_s']:,.0f} output tok/s, stages busy "
        f"{s['busy_fraction']:.0%}, KV peak {s['kv_peak_fraction']:.0%} (simulated in {s['wall_s']:.1f} s)\n"
    )
    return head + table(["ms", "model mean", "model p99", "sim mean", "sim p50", "sim p99"], rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m trellis.planner.cli [plan] ...``: the subcommand exactly as ``trellis`` wires it."""
    parser = argparse.ArgumentParser(prog="trellis")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = list(sys.argv[1:] if argv is None else argv)
    return run(parser.parse_args(args if args[:1] == ["plan"] else ["plan", *args]))


if __name__ == "__main__":
    sys.exit(main())
