"""The mesh against the offline engine on CPU: the same workload, the same replica shape, in one run.

    .venv/bin/python bench/mesh_cpu.py [--requests 32] [--prompt-lens 16:128] [--output-len 32]
                                       [--single 8] [--repeats 3] [--replicas 1,2] [--ucx-reps 400]

Makes a small random Llama (hidden 256, 4 layers) in a temporary directory, then runs one workload
(random prompts of mixed lengths, greedy, every request to --output-len tokens) through
- the mesh: router + stage workers (gRPC, UCX between stages), 1 replica of 2 stages x TP 2, and 2
  such replicas if asked; requests stream through the router's gRPC API (one asyncio client);
- the offline engine: `Engine(EngineArgs(tp=2, pp=2))`, requests submitted to its head directly.
Each in two scenarios: "burst" (every request at once: throughput) and "single" (one at a time:
latency without queueing). TTFT and inter-token latency (ITL) come from each stream's arrival times.
Then the per-hop UCX latency: round trips of 1 KB (one token's hidden row), 16 KB and 1 MB frames over
`trellis.transport.ucx` links between two processes, in both ucxx wait modes.

Writes bench/results/mesh_cpu.json (machine, command, load average: other work skews the numbers) and
bench/results/mesh_cpu.png, and prints progress lines and a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = {
    "vocab_size": 4096,
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "max_position_embeddings": 1024,
}
STAGES, TP = 2, 2
# The mesh's processes get these from trellis.deploy.mesh.Mesh; the offline engine's are set here to match.
RANK_ENV = {
    "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // (STAGES * TP))),
    "UCXPY_ENABLE_PYTHON_FUTURE": "1",
    "TRELLIS_LOG_LEVEL": "WARNING",
}
UCX_SIZES = (1024, 16 * 1024, 1024 * 1024)


def say(message: str) -> None:
    print(f"[mesh_cpu {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---- workload and timings ------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    output_len: int
    single: int  # how many of the prompts the one-at-a-time scenario sends
    repeats: int


@dataclass
class Timing:
    """One request: when it was sent, when each of its tokens arrived, which tokens."""

    sent: float
    arrivals: list[float] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)


def make_workload(args: argparse.Namespace) -> Workload:
    lo, hi = (int(x) for x in args.prompt_lens.split(":"))
    rng = random.Random(args.seed)
    prompts = [
        [rng.randrange(MODEL["vocab_size"]) for _ in range(rng.randint(lo, hi))] for _ in range(args.requests)
    ]
    return Workload(prompts, args.output_len, min(args.single, args.requests), args.repeats)


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50_ms": float("nan"), "p99_ms": float("nan")}
    arr = np.array(values) * 1000
    return {"p50_ms": float(np.percentile(arr, 50)), "p99_ms": float(np.percentile(arr, 99))}


def summarize(timings: list[Timing], wall_s: float, output_len: int) -> dict[str, Any]:
    if any(len(t.token_ids) != output_len for t in timings):
        raise RuntimeError("a request ended before output_len tokens")
    tokens = sum(len(t.token_ids) for t in timings)
    return {
        "requests": len(timings),
        "output_tokens": tokens,
        "wall_s": wall_s,
        "output_tok_s": tokens / wall_s,
        "ttft": percentiles([t.arrivals[0] - t.sent for t in timings]),
        "itl": percentiles(
            [b - a for t in timings for a, b in zip(t.arrivals, t.arrivals[1:], strict=False)]
        ),
    }


Sender = Callable[[list[list[int]], int, bool], list[Timing]]  # (prompts, output_len, at_once) -> timings


def run_scenarios(send: Sender, work: Workload) -> dict[str, dict[str, Any]]:
    """A warm-up, then "burst" (every prompt at once) and "single" (one at a time), each repeated: the
    fastest repeat counts (other work on the machine only ever slows a run down)."""
    send(work.prompts[:2], 4, True)
    out = {}
    for name, prompts, at_once in (
        ("burst", work.prompts, True),
        ("single", work.prompts[: work.single], False),
    ):
        runs = []
        for _ in range(work.repeats):
            start = time.perf_counter()
            timings = send(prompts, work.output_len, at_once)
            wall = time.perf_counter() - start
            runs.append(
                {**summarize(timings, wall, work.output_len), "token_ids": [t.token_ids for t in timings]}
            )
        out[name] = min(runs, key=lambda r: r["wall_s"])
        out[name]["wall_s_repeats"] = [round(r["wall_s"], 4) for r in runs]
        say(f"  {name}: {out[name]['output_tok_s']:.1f} tok/s, TTFT p50 {out[name]['ttft']['p50_ms']:.0f} ms")
    return out


# ---- the mesh ------------------------------------------------------------------------------------


async def mesh_requests(
    address: str, prompts: list[list[int]], output_len: int, at_once: bool
) -> list[Timing]:
    """Stream through the router from one asyncio client on one channel (a light client, as the engine's
    in-process one is: Python threads per stream would take the cores the mesh needs)."""
    import grpc

    from trellis.v1 import router_pb2, router_pb2_grpc, sampling_pb2

    async with grpc.aio.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)

        async def one(prompt: list[int]) -> Timing:
            sampling = sampling_pb2.SamplingParams(max_tokens=output_len, ignore_eos=True)
            request = router_pb2.GenerateRequest(token_ids=router_pb2.TokenIds(ids=prompt), sampling=sampling)
            timing = Timing(time.perf_counter())
            async for resp in stub.Generate(request, timeout=600):
                now = time.perf_counter()
                timing.arrivals += [now] * len(resp.token_ids)
                timing.token_ids += resp.token_ids
            return timing

        if at_once:
            return list(await asyncio.gather(*(one(p) for p in prompts)))
        return [await one(p) for p in prompts]


def mesh_sender(address: str) -> Sender:
    return lambda prompts, output_len, at_once: asyncio.run(
        mesh_requests(address, prompts, output_len, at_once)
    )


def run_mesh(model: Path, replicas: int, work: Workload) -> dict[str, dict[str, Any]]:
    from trellis.deploy.local_spec import local_spec
    from trellis.deploy.mesh import Mesh

    spec = local_spec(str(model), replicas=replicas, stages=STAGES, tp=TP)
    say(f"mesh {replicas} x {STAGES} stages x TP {TP}: starting {replicas * STAGES * TP} ranks, the router")
    t0 = time.perf_counter()
    with Mesh(spec, env={"TRELLIS_LOG_LEVEL": "WARNING"}) as mesh:
        mesh.start()
        mesh.wait_ready(progress=lambda m: say(f"  {m} (+{time.perf_counter() - t0:.1f}s)"))
        out = run_scenarios(mesh_sender(mesh.router.address), work)
        say("  stopping the mesh")
    return out


# ---- the offline engine --------------------------------------------------------------------------


async def engine_requests(
    engine: Any, prompts: list[list[int]], output_len: int, at_once: bool
) -> list[Timing]:
    from trellis.core.sampling import SamplingParams

    params = SamplingParams(max_tokens=output_len, ignore_eos=True)

    async def one(prompt: list[int]) -> Timing:
        timing = Timing(time.perf_counter())
        async for delta in engine.head.submit(prompt, params):
            now = time.perf_counter()
            timing.arrivals += [now] * len(delta.token_ids)
            timing.token_ids += delta.token_ids
        return timing

    if at_once:
        return list(await asyncio.gather(*(one(p) for p in prompts)))
    return [await one(p) for p in prompts]


def run_engine(model: Path, work: Workload) -> dict[str, dict[str, Any]]:
    from trellis.engine import Engine, EngineArgs

    say(f"offline engine TP {TP} x PP {STAGES}: starting")
    os.environ.update(RANK_ENV)  # its stage processes inherit these; this process is the head's rank 0
    torch.set_num_threads(int(RANK_ENV["OMP_NUM_THREADS"]))
    with Engine(EngineArgs(model=str(model), tp=TP, pp=STAGES)) as engine:

        def send(prompts: list[list[int]], output_len: int, at_once: bool) -> list[Timing]:
            # The engine has no streaming API yet: stream from its head, on the engine's own event loop.
            coro = engine_requests(engine, prompts, output_len, at_once)
            return asyncio.run_coroutine_threadsafe(coro, engine._loop).result()

        out = run_scenarios(send, work)
        say("  stopping the engine (its stage process waits up to 30 s for ucxx's notifier thread)")
    return out


# ---- UCX ping-pong -------------------------------------------------------------------------------


async def echo(port: int) -> None:
    """The far end: send every frame straight back until an empty header comes."""
    from trellis.transport.ucx import Listener

    listener = Listener(port, torch.device("cpu"))
    link = await listener.accept(timeout=60)
    while (frame := await link.recv())[0]:
        await link.send(*frame)
    await link.close()
    listener.close()


async def ping(port: int, reps: int, warmup: int) -> dict[str, Any]:
    """Round trips of each frame size over one link; one hop is half a round trip."""
    from trellis.transport.ucx import connect

    link = await connect("127.0.0.1", port, torch.device("cpu"), timeout=60)
    out = {}
    for size in UCX_SIZES:
        payload = torch.ones(size, dtype=torch.uint8)
        n = reps if size < 1 << 20 else max(10, reps // 4)
        rtts = []
        for i in range(warmup + n):
            t = time.perf_counter()
            await link.send(b"ping", payload)
            header, back = await link.recv()
            if i >= warmup:
                rtts.append(time.perf_counter() - t)
            assert header == b"ping" and back is not None and back.numel() == size
        rtt = percentiles(rtts)
        out[str(size)] = {
            "bytes": size,
            "round_trips": n,
            "rtt": rtt,
            "hop": {k: v / 2 for k, v in rtt.items()},
            "mb_s": 2 * size / (float(np.median(rtts)) * 1e6),
        }
    await link.send(b"")
    await link.close()
    return out


def ucx_child(args: argparse.Namespace) -> None:
    """--ucx-echo PORT or --ucx-ping PORT: one end of the ping-pong, in a process of its own."""
    try:
        if args.ucx_echo:
            asyncio.run(echo(args.ucx_echo))
        else:
            print(json.dumps(asyncio.run(ping(args.ucx_ping, args.ucx_reps, warmup=20))), flush=True)
    finally:
        if (ucxx := sys.modules.get("ucxx")) is not None:
            ucxx.stop_notifier_thread()  # not a daemon thread: the process would not exit


def run_ucx(reps: int) -> dict[str, Any]:
    from trellis.core.net import free_ports

    out = {}
    for mode, python_future in (("python-future", "1"), ("yield-loop (ucxx default)", "0")):
        env = {**os.environ, "UCXPY_ENABLE_PYTHON_FUTURE": python_future, "OMP_NUM_THREADS": "1"}
        port = free_ports(1)[0]
        me = [sys.executable, str(Path(__file__).resolve())]
        server = subprocess.Popen([*me, "--ucx-echo", str(port)], env=env)
        try:
            done = subprocess.run(
                [*me, "--ucx-ping", str(port), "--ucx-reps", str(reps)],
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
                check=True,
            )
            server.wait(timeout=30)
        finally:
            if server.poll() is None:
                server.kill()
        out[mode] = json.loads(done.stdout.strip().splitlines()[-1])
        say(
            "  UCX "
            + mode
            + ": "
            + ", ".join(
                f"{int(s) // 1024} KB hop p50 {r['hop']['p50_ms']:.3f} ms" for s, r in out[mode].items()
            )
        )
    return out


# ---- output --------------------------------------------------------------------------------------


def make_model(path: Path, seed: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM  # a dev dependency, only needed here

    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**MODEL, tie_word_embeddings=False)).float().save_pretrained(path)
    return path


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = list(result["systems"])
    colors = ["#4c72b0", "#dd8452", "#55a868", "#c44e52"][: len(systems)]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    bars = axes[0].bar(
        systems, [result["systems"][s]["burst"]["output_tok_s"] for s in systems], color=colors
    )
    axes[0].bar_label(bars, fmt="%.0f")
    axes[0].set_title(f"throughput, {result['workload']['requests']} requests at once")
    axes[0].set_ylabel("output tokens/s")
    for ax, metric in zip(axes[1:3], ("ttft", "itl"), strict=True):
        x = np.arange(len(systems))
        for k, (scenario, hatch) in enumerate((("single", ""), ("burst", "//"))):
            for q, alpha in (("p99_ms", 0.45), ("p50_ms", 1.0)):
                vals = [result["systems"][s][scenario][metric][q] for s in systems]
                ax.bar(
                    x + (k - 0.5) * 0.4, vals, 0.4, color=colors, alpha=alpha, hatch=hatch, edgecolor="white"
                )
        ax.set_xticks(x, systems)
        ax.set_yscale("log")
        ax.set_ylabel("ms")
        ax.set_title(f"{metric.upper()} p50 (solid) / p99 (light); left single, right burst")
    ucx = result["ucx"]
    for mode, marker, color in zip(ucx, "os", ("#4c72b0", "#c44e52"), strict=False):
        sizes = [v["bytes"] / 1024 for v in ucx[mode].values()]
        for q, ls in (("p50_ms", "-"), ("p99_ms", "--")):
            axes[3].plot(
                sizes,
                [v["hop"][q] for v in ucx[mode].values()],
                marker=marker,
                ls=ls,
                color=color,
                label=f"{mode} {q[:3]}",
            )
    axes[3].set_xscale("log")
    axes[3].set_yscale("log")
    axes[3].set_xlabel("frame KB")
    axes[3].set_ylabel("one hop, ms (half a round trip)")
    axes[3].set_title("UCX per hop (2 processes, tcp/shm)")
    axes[3].legend(fontsize=7)
    fig.suptitle(
        f"Trellis mesh vs offline engine on CPU ({os.cpu_count()} cores, float32, hidden 256, 4 layers, "
        f"{STAGES} stages x TP {TP})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(result: dict[str, Any]) -> None:
    print(
        f"{'system':<22}{'scenario':<9}{'tok/s':>9}{'TTFT p50':>10}{'p99':>9}{'ITL p50':>9}{'p99':>9}  (ms)"
    )
    for name, sys_result in result["systems"].items():
        for scenario in ("burst", "single"):
            r = sys_result[scenario]
            print(
                f"{name:<22}{scenario:<9}{r['output_tok_s']:>9.1f}{r['ttft']['p50_ms']:>10.1f}"
                f"{r['ttft']['p99_ms']:>9.1f}{r['itl']['p50_ms']:>9.1f}{r['itl']['p99_ms']:>9.1f}"
            )
    for name, ratio in result["throughput_ratio_vs_engine"].items():
        print(f"throughput {name} / engine: {ratio:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt-lens", default="16:128", help="LO:HI, uniform")
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--single", type=int, default=8, help="requests of the one-at-a-time scenario")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each scenario; the fastest counts")
    ap.add_argument("--replicas", default="1,2", help="mesh replica counts to run, comma-separated")
    ap.add_argument("--ucx-reps", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    ap.add_argument("--ucx-echo", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--ucx-ping", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.ucx_echo or args.ucx_ping:
        return ucx_child(args)
    from trellis.core import log

    os.environ.setdefault("TRELLIS_LOG_LEVEL", "WARNING")
    log.configure("bench")
    load_before = os.getloadavg()
    say(f"{os.cpu_count()} CPUs, torch {torch.__version__}; load average {load_before[0]:.2f}")
    started = time.perf_counter()
    work = make_workload(args)
    systems: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="trellis-bench-") as tmp:
        say("writing a random checkpoint: " + ", ".join(f"{k} {v}" for k, v in MODEL.items()))
        model = make_model(Path(tmp) / "model", seed=args.seed)
        for replicas in (int(r) for r in args.replicas.split(",")):
            systems[f"mesh {replicas}x{STAGES}x{TP}"] = run_mesh(model, replicas, work)
        systems[f"engine TP{TP} PP{STAGES}"] = run_engine(model, work)
    say("UCX ping-pong between two processes")
    ucx = run_ucx(args.ucx_reps)
    engine = systems[f"engine TP{TP} PP{STAGES}"]
    want = engine["burst"]["token_ids"]
    for s in systems.values():  # greedy on the same weights: the tokens should agree
        got = s["burst"].pop("token_ids")
        s["burst"]["same_tokens_as_engine"] = sum(a == b for a, b in zip(got, want, strict=True))
        s["single"].pop("token_ids")
    result = {
        "bench": "mesh_cpu",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "elapsed_s": time.perf_counter() - started,
        "model": {**MODEL, "dtype": "float32", "weights": f"random (transformers init, seed {args.seed})"},
        "workload": {
            "requests": args.requests,
            "prompt_lens": args.prompt_lens,
            "output_len": args.output_len,
            "single_requests": work.single,
            "repeats": work.repeats,
            "sampling": "greedy, ignore_eos",
        },
        "rank_env": RANK_ENV,
        "metrics": {
            "burst": "every request at once; output_tok_s = tokens / wall of the burst; fastest repeat",
            "single": "one request at a time",
            "ttft": "first token's arrival - send, per request",
            "itl": "gap between consecutive tokens' arrivals, over every request",
            "ucx": "hop = half the round trip of one frame over trellis.transport.ucx Link",
        },
        "systems": systems,
        "throughput_ratio_vs_engine": {
            name: s["burst"]["output_tok_s"] / engine["burst"]["output_tok_s"]
            for name, s in systems.items()
            if name.startswith("mesh")
        },
        "ucx": ucx,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = args.out_dir / "mesh_cpu.json", args.out_dir / "mesh_cpu.png"
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, png_path)
    say(f"wrote {json_path} and {png_path}")
    print_table(result)
    if (ucxx := sys.modules.get("ucxx")) is not None:
        ucxx.stop_notifier_thread()  # the engine's head ran UCX in this process


if __name__ == "__main__":
    main()
