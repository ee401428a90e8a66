"""The router's OpenAI-compatible HTTP API against its gRPC API, on one mesh, under streamed concurrent load.

    .venv/bin/python bench/http_vs_grpc.py [--concurrency 1,16,64] [--output-len 32] [--per-stream 2]
                                           [--min-requests 8] [--repeats 3] [--phase-max-s 30]
                                           [--grpc-client router-client|aio]

One mesh on this host (CPU, the demo model, 1 replica of 1 stage x TP 1: the layout that leaves the most
of 2 cores to the router and the clients, so that what the HTTP layer costs shows), with the router's
HTTP API on. At each concurrency C, C streams are kept in flight (a closed loop: each stream sends its
next request when the last one ends) until max(--min-requests, C x --per-stream) requests are done
(or --phase-max-s passes: no new request starts after it), through
- gRPC: trellis.wire.router_client.RouterClient streams (one channel, one thread per stream; or with
  --grpc-client aio one grpc.aio client on this loop);
- HTTP: the official `openai` AsyncOpenAI client, streaming /v1/completions (stream_options.include_usage
  counts the tokens);
the same text prompts, temperature 0, every request to exactly --output-len tokens (ignore_eos).
Phases run interleaved, gRPC, HTTP, gRPC, HTTP (--repeats pairs), so drift of the shared machine hits
both; a pass of every prompt (max_tokens 1) first warms the prefix cache for both alike.

Per concurrency and API: output tokens/s (tokens over the summed walls of its phases), TTFT median / p90
over the requests, inter-token latency median (gaps between consecutive content messages), and the
HTTP/gRPC throughput ratio (the median of the paired phases' ratios, robust to one phase that other work
stalled; the goal: the HTTP layer costs <= 5% at 64 streams). Also the CPU milliseconds per output token
of the client (this process), the router and the stage, from /proc: where the time of each API goes.

Every size also comes from the environment: HTTP_VS_GRPC_CONCURRENCY, _OUTPUT_LEN, _PER_STREAM,
_MIN_REQUESTS, _REPEATS, _PHASE_MAX_S. Writes bench/results/http_vs_grpc_cpu.json (card, cores, command,
git commit, load average per phase: other work skews the numbers) and bench/results/http_vs_grpc_cpu.png,
and prints progress lines and a table.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import random
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "trellis" / "deploy" / "demo_corpus.txt"
APIS = ("grpc", "http")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def say(message: str) -> None:
    print(f"[http_vs_grpc {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def env_default(name: str, default: str) -> str:
    return os.environ.get(f"HTTP_VS_GRPC_{name}", default)


# ---- one request's timings ---------------------------------------------------------------------------


@dataclass
class Timing:
    """One request: when it was sent, when each message with content arrived, how many tokens it got."""

    sent: float
    arrivals: list[float] = field(default_factory=list)
    tokens: int = 0


def quantiles_ms(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50_ms": float("nan"), "p90_ms": float("nan")}
    arr = np.array(values) * 1000
    return {"p50_ms": float(np.percentile(arr, 50)), "p90_ms": float(np.percentile(arr, 90))}


def make_prompts(count: int, seed: int) -> list[str]:
    """Slices of the demo model's own text, 8 to 40 words long, from random places."""
    words = CORPUS.read_text().split()
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        n = rng.randint(8, 40)
        start = rng.randrange(len(words) - n)
        out.append(" ".join(words[start : start + n]))
    return out


# ---- CPU time of the processes -----------------------------------------------------------------------


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_snapshot(pids: dict[str, int]) -> dict[str, float]:
    return {"client": time.process_time(), **{name: proc_cpu_s(pid) for name, pid in pids.items()}}


# ---- the two clients ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    prompts: list[str]
    requests: int
    concurrency: int
    output_len: int
    max_s: float  # no request starts after this many seconds of the phase


def grpc_phase_threads(address: str, load: Load) -> list[Timing]:
    """C threads, each streaming its requests through one shared RouterClient (gRPC channel)."""
    from trellis.wire.router_client import RouterClient

    lock = threading.Lock()
    next_index = [0]
    start = time.perf_counter()

    def take() -> int | None:
        with lock:
            i = next_index[0]
            if i >= load.requests or time.perf_counter() - start > load.max_s:
                return None
            next_index[0] += 1
            return i

    with RouterClient(address) as client:

        def worker() -> list[Timing]:
            out = []
            while (i := take()) is not None:
                timing = Timing(time.perf_counter())
                stream = client.stream(
                    load.prompts[i % len(load.prompts)],
                    max_tokens=load.output_len,
                    temperature=0.0,
                    ignore_eos=True,
                )
                for resp in stream:
                    if resp.token_ids:
                        timing.arrivals.append(time.perf_counter())
                        timing.tokens += len(resp.token_ids)
                out.append(timing)
            return out

        with ThreadPoolExecutor(load.concurrency) as pool:
            futures = [pool.submit(worker) for _ in range(load.concurrency)]
            return [t for f in futures for t in f.result()]


async def closed_loop(load: Load, one: Callable[[str], Awaitable[Timing]]) -> list[Timing]:
    """C tasks on this loop, each sending its next request when its last one ends."""
    next_index = 0
    start = time.perf_counter()

    async def worker() -> list[Timing]:
        nonlocal next_index
        out = []
        while next_index < load.requests and time.perf_counter() - start <= load.max_s:
            i, next_index = next_index, next_index + 1
            out.append(await one(load.prompts[i % len(load.prompts)]))
        return out

    done = await asyncio.gather(*(worker() for _ in range(load.concurrency)))
    return [t for ts in done for t in ts]


async def grpc_phase_aio(address: str, load: Load) -> list[Timing]:
    """The same requests as RouterClient.stream builds, from one grpc.aio client on this loop."""
    import grpc

    from trellis.v1 import router_pb2, router_pb2_grpc, sampling_pb2

    async with grpc.aio.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)

        async def one(prompt: str) -> Timing:
            sp = sampling_pb2.SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=load.output_len)
            request = router_pb2.GenerateRequest(text=prompt, sampling=sp)
            timing = Timing(time.perf_counter())
            async for resp in stub.Generate(request, timeout=600):
                if resp.token_ids:
                    timing.arrivals.append(time.perf_counter())
                    timing.tokens += len(resp.token_ids)
            return timing

        return await closed_loop(load, one)


async def http_phase(base_url: str, model: str, load: Load) -> list[Timing]:
    """The official openai client, streaming completions; the usage chunk gives the token count."""
    import httpx
    from openai import AsyncOpenAI

    limits = httpx.Limits(max_connections=load.concurrency + 8, max_keepalive_connections=load.concurrency)
    async with AsyncOpenAI(
        base_url=base_url,
        api_key="none",
        max_retries=0,
        timeout=600,
        http_client=httpx.AsyncClient(limits=limits, timeout=600),
    ) as client:

        async def one(prompt: str) -> Timing:
            timing = Timing(time.perf_counter())
            stream = await client.completions.create(
                model=model,
                prompt=prompt,
                max_tokens=load.output_len,
                temperature=0.0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].text:
                    timing.arrivals.append(time.perf_counter())
                if chunk.usage is not None:
                    timing.tokens = chunk.usage.completion_tokens
            return timing

        return await closed_loop(load, one)


async def http_phase_raw(base_url: str, model: str, load: Load) -> list[Timing]:
    """The way `vllm bench serve` drives an OpenAI server: a plain async HTTP client streaming
    /v1/completions and reading each SSE event with json.loads, no typed client on top (whose
    per-chunk parsing, on a 2-core host, takes CPU from the mesh under test)."""
    import httpx

    limits = httpx.Limits(max_connections=load.concurrency + 8, max_keepalive_connections=load.concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=600) as client:

        async def one(prompt: str) -> Timing:
            body = {
                "model": model,
                "prompt": prompt,
                "max_tokens": load.output_len,
                "temperature": 0.0,
                "stream": True,
                "stream_options": {"include_usage": True},
                "ignore_eos": True,
            }
            timing = Timing(time.perf_counter())
            async with client.stream("POST", f"{base_url}/completions", json=body) as resp:
                resp.raise_for_status()
                async for line in resp.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("choices") and chunk["choices"][0].get("text"):
                        timing.arrivals.append(time.perf_counter())
                    if chunk.get("usage"):
                        timing.tokens = chunk["usage"]["completion_tokens"]
            return timing

        return await closed_loop(load, one)


# ---- a phase and its summary -------------------------------------------------------------------------


def summarize(timings: list[Timing], wall_s: float, cpu_s: dict[str, float]) -> dict[str, Any]:
    tokens = sum(t.tokens for t in timings)
    return {
        "requests": len(timings),
        "output_tokens": tokens,
        "wall_s": wall_s,
        "output_tok_s": tokens / wall_s,
        "ttft": quantiles_ms([t.arrivals[0] - t.sent for t in timings if t.arrivals]),
        "itl": quantiles_ms(
            [b - a for t in timings for a, b in zip(t.arrivals, t.arrivals[1:], strict=False)]
        ),
        "content_messages": sum(len(t.arrivals) for t in timings),
        "cpu_s": cpu_s,
        "load_average_after": os.getloadavg()[0],
        # Kept for the pooled summary, dropped before writing.
        "_ttft_s": [t.arrivals[0] - t.sent for t in timings if t.arrivals],
        "_itl_s": [b - a for t in timings for a, b in zip(t.arrivals, t.arrivals[1:], strict=False)],
    }


def pooled(phases: list[dict[str, Any]]) -> dict[str, Any]:
    """One API at one concurrency over its repeats: tokens over summed walls, quantiles over all requests."""
    tokens = sum(p["output_tokens"] for p in phases)
    wall = sum(p["wall_s"] for p in phases)
    cpu = {k: sum(p["cpu_s"][k] for p in phases) for k in phases[0]["cpu_s"]}
    return {
        "requests": sum(p["requests"] for p in phases),
        "output_tokens": tokens,
        "wall_s": wall,
        "output_tok_s": tokens / wall,
        "output_tok_s_repeats": [round(p["output_tok_s"], 1) for p in phases],
        "ttft": quantiles_ms([x for p in phases for x in p["_ttft_s"]]),
        "itl": quantiles_ms([x for p in phases for x in p["_itl_s"]]),
        "cpu_ms_per_token": {k: 1000 * v / tokens for k, v in cpu.items()},
    }


# ---- output ------------------------------------------------------------------------------------------


def card() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def git_commit() -> dict[str, Any]:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per = result["per_concurrency"]
    conc = list(per)
    x = np.arange(len(conc))
    colors = {"grpc": "#4c72b0", "http": "#dd8452"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for k, api in enumerate(APIS):
        bars = axes[0].bar(
            x + (k - 0.5) * 0.4,
            [per[c][api]["output_tok_s"] for c in conc],
            0.4,
            color=colors[api],
            label=api,
        )
        axes[0].bar_label(bars, fmt="%.0f", fontsize=8)
        for q, alpha in (("p90_ms", 0.4), ("p50_ms", 1.0)):
            axes[1].bar(
                x + (k - 0.5) * 0.4,
                [per[c][api]["ttft"][q] for c in conc],
                0.4,
                color=colors[api],
                alpha=alpha,
            )
        axes[2].bar(x + (k - 0.5) * 0.4, [per[c][api]["itl"]["p50_ms"] for c in conc], 0.4, color=colors[api])
    for i, c in enumerate(conc):
        axes[0].annotate(
            f"HTTP/gRPC {per[c]['http_over_grpc_throughput']:.3f}",
            (i, 0),
            xytext=(0, -28),
            textcoords="offset points",
            ha="center",
            fontsize=8,
        )
    titles = ("output tokens/s", "TTFT ms, median (solid) / p90 (light)", "inter-token latency ms, median")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xticks(x, [f"{c} streams" for c in conc])
        ax.set_title(title)
    axes[0].legend()
    axes[1].set_yscale("log")
    w = result["workload"]
    fig.suptitle(
        f"Trellis router: HTTP (openai client, SSE) vs gRPC (RouterClient), one mesh 1x1 stage x TP 1, demo "
        f"model, {result['machine']['cpu_count']} cores, {w['output_len']} tokens per request"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(result: dict[str, Any]) -> None:
    print(
        f"{'streams':>7} {'api':<5}{'tok/s':>9}{'TTFT p50':>10}{'p90':>9}{'ITL p50':>9}"
        f"{'cpu ms/tok client':>19}{'router':>8}{'stage':>8}   HTTP/gRPC"
    )
    for c, r in result["per_concurrency"].items():
        for api in APIS:
            a = r[api]
            cpu = a["cpu_ms_per_token"]
            ratio = f"   {r['http_over_grpc_throughput']:.3f}" if api == "http" else ""
            print(
                f"{c:>7} {api:<5}{a['output_tok_s']:>9.1f}{a['ttft']['p50_ms']:>10.1f}"
                f"{a['ttft']['p90_ms']:>9.1f}{a['itl']['p50_ms']:>9.2f}"
                f"{cpu['client']:>19.2f}{cpu['router']:>8.2f}{cpu['stage']:>8.2f}{ratio}"
            )


# ---- main --------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--concurrency", default=env_default("CONCURRENCY", "1,16,64"), help="comma-separated")
    ap.add_argument("--output-len", type=int, default=int(env_default("OUTPUT_LEN", "32")))
    ap.add_argument(
        "--per-stream", type=int, default=int(env_default("PER_STREAM", "2")), help="requests per stream"
    )
    ap.add_argument("--min-requests", type=int, default=int(env_default("MIN_REQUESTS", "8")))
    ap.add_argument(
        "--repeats", type=int, default=int(env_default("REPEATS", "3")), help="(gRPC, HTTP) pairs"
    )
    ap.add_argument(
        "--phase-max-s",
        type=float,
        default=float(env_default("PHASE_MAX_S", "30")),
        help="no request of a phase starts after this",
    )
    ap.add_argument("--grpc-client", choices=("router-client", "aio"), default="router-client")
    ap.add_argument(
        "--http-client",
        choices=("openai", "raw"),
        default="openai",
        help="openai: the official client; raw: httpx + json.loads per SSE event, as vllm bench serve",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    args = ap.parse_args()

    from trellis.core import log
    from trellis.deploy.demo_model import demo_model
    from trellis.deploy.local_spec import local_spec
    from trellis.deploy.mesh import Mesh
    from trellis.wire.router_client import RouterClient

    os.environ.setdefault("TRELLIS_LOG_LEVEL", "WARNING")
    log.configure("bench")
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    sizes = {c: max(args.min_requests, c * args.per_stream) for c in concurrencies}
    load_before = os.getloadavg()
    say(f"{os.cpu_count()} CPUs ({card()}); load average {load_before[0]:.2f}; requests per phase {sizes}")
    started = time.perf_counter()
    model = demo_model()
    prompts = make_prompts(max(sizes.values()), args.seed)
    spec = local_spec(str(model), replicas=1, stages=1, tp=1, http=True)
    spec = dataclasses.replace(
        spec, router=dataclasses.replace(spec.router, max_queue=max(256, 4 * max(sizes)))
    )
    phases: list[dict[str, Any]] = []
    with Mesh(spec, env={"TRELLIS_LOG_LEVEL": "WARNING"}) as mesh:
        mesh.start()
        mesh.wait_ready(progress=lambda m: say(f"  {m} (+{time.perf_counter() - started:.1f}s)"))
        address = mesh.router.address
        base_url = f"http://127.0.0.1:{spec.router.http_port}/v1"
        assert mesh.router.proc is not None and mesh.stages[0].proc is not None
        pids = {"router": mesh.router.proc.pid, "stage": mesh.stages[0].proc.pid}
        say(f"mesh up: gRPC {address}, HTTP {base_url}; warming the prefix cache with every prompt")

        def run(api: str, load: Load) -> list[Timing]:
            if api == "http":
                phase = http_phase_raw if args.http_client == "raw" else http_phase
                return asyncio.run(phase(base_url, spec.model.name, load))
            if args.grpc_client == "aio":
                return asyncio.run(grpc_phase_aio(address, load))
            return grpc_phase_threads(address, load)

        for api in APIS:  # warm-up: every prompt once, both clients' imports and connections
            run(api, Load(prompts, len(prompts), min(16, len(prompts)), 1, 120.0))
        with RouterClient(address) as client:
            check = client.generate(prompts[0], max_tokens=args.output_len, ignore_eos=True)
        if len(check.token_ids) != args.output_len:
            raise RuntimeError(f"ignore_eos did not hold: {len(check.token_ids)} of {args.output_len} tokens")
        for c in concurrencies:
            load = Load(prompts, sizes[c], c, args.output_len, args.phase_max_s)
            for rep in range(args.repeats):
                for api in APIS:
                    before = cpu_snapshot(pids)
                    t0 = time.perf_counter()
                    timings = run(api, load)
                    wall = time.perf_counter() - t0
                    after = cpu_snapshot(pids)
                    summary = summarize(timings, wall, {k: after[k] - before[k] for k in before})
                    short = [t.tokens for t in timings if t.tokens != args.output_len]
                    if short:
                        raise RuntimeError(
                            f"{api}: {len(short)} requests ended short of --output-len: {short[:5]}"
                        )
                    phases.append({"concurrency": c, "api": api, "repeat": rep, **summary})
                    say(
                        f"  {c:>3} streams {api:<4} #{rep}: {summary['requests']} requests, "
                        f"{summary['output_tok_s']:.1f} tok/s, TTFT p50 {summary['ttft']['p50_ms']:.0f} ms, "
                        f"ITL p50 {summary['itl']['p50_ms']:.1f} ms "
                        f"(load {summary['load_average_after']:.2f})"
                    )
        say("stopping the mesh")
    per: dict[str, dict[str, Any]] = {}
    for c in concurrencies:
        row = {api: pooled([p for p in phases if p["concurrency"] == c and p["api"] == api]) for api in APIS}
        pairs = [
            h / g
            for g, h in zip(
                row["grpc"]["output_tok_s_repeats"], row["http"]["output_tok_s_repeats"], strict=True
            )
        ]
        ratio = float(np.median(pairs))
        per[str(c)] = {
            **row,
            "http_over_grpc_throughput": ratio,
            "http_cost_pct": 100 * (1 - ratio),
            "ratio_per_pair": pairs,
            "ratio_pooled": row["http"]["output_tok_s"] / row["grpc"]["output_tok_s"],
            "ratio_best": max(row["http"]["output_tok_s_repeats"]) / max(row["grpc"]["output_tok_s_repeats"]),
        }
    for p in phases:
        p.pop("_ttft_s")
        p.pop("_itl_s")
    result = {
        "bench": "http_vs_grpc",
        "command": " ".join([".venv/bin/python", *sys.argv]),
        "git": git_commit(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "card": card(),
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "elapsed_s": time.perf_counter() - started,
        "mesh": "1 replica x 1 stage x TP 1, CPU, float32; router with its HTTP API in the same process",
        "model": {"name": spec.model.name, "path": str(model)},
        "workload": {
            "concurrency": concurrencies,
            "requests_per_phase": sizes,
            "output_len": args.output_len,
            "repeats": args.repeats,
            "phase_max_s": args.phase_max_s,
            "prompts": "slices of trellis/deploy/demo_corpus.txt, 8-40 words, the same for both APIs",
            "sampling": "temperature 0, ignore_eos, max_tokens = output_len",
            "grpc_client": args.grpc_client,
            "http_client": (
                "httpx stream + json.loads per SSE event (as vllm bench serve)"
                if args.http_client == "raw"
                else "openai.AsyncOpenAI, completions.create(stream=True, include_usage)"
            ),
            "order": "per concurrency: gRPC, HTTP, gRPC, HTTP, ... (closed loop of C streams)",
        },
        "metrics": {
            "output_tok_s": "output tokens over the summed walls of the API's phases at that concurrency",
            "ttft": "first content message's arrival - send, per request, over all repeats",
            "itl": "gap between consecutive content messages (one token each: decode_burst 1)",
            "cpu_ms_per_token": "CPU time (user+sys, /proc) per output token: client = this process",
            "http_over_grpc_throughput": "median over the (gRPC, HTTP) pairs of HTTP tok/s / gRPC tok/s; "
            "ratio_pooled: of the pooled tok/s; ratio_best: fastest HTTP repeat / fastest gRPC repeat",
            "http_cost_pct": "100 x (1 - http_over_grpc_throughput)",
        },
        "per_concurrency": per,
        "phases": phases,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = "http_vs_grpc_cpu" + ("_raw" if args.http_client == "raw" else "")
    json_path, png_path = args.out_dir / f"{stem}.json", args.out_dir / f"{stem}.png"
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, png_path)
    say(f"wrote {json_path} and {png_path} ({result['elapsed_s']:.0f} s in all)")
    print_table(result)


if __name__ == "__main__":
    main()
