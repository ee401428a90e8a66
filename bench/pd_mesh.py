"""P/D disaggregation on one GPU, two replica processes sharing it: TTFT and decode interference.

    python bench/pd_mesh.py --preset llama-3-8b --out bench/results/h200/pd_mesh_8b_1xh200.json

Two meshes on the same GPU, one after the other, the same two processes' worth of resources:
- "pd": replica r0 role prefill, r1 role decode; every request is prefilled on r0 and its KV handed
  to r1 through r1's hand-off slab in GPU memory (router.max_local_prefill_tokens 0);
- "colocated": two replicas of role both behind the least-load router (aggregated serving).
In each, (1) TTFT of fresh random prompts of each --lengths, a warm median of --reps (the prompt
runs serially; max_tokens 2, so the hand-off really happens), with the second token's arrival;
(2) interference: --streams decode streams (short prompts, --decode-len tokens each) while prompts
of --long tokens arrive every --every seconds; the decode streams' inter-token gaps during the
arrivals, p50 / p90 / p99. The JSON has every figure; the plot is bench/report_pd.py's.
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import statistics
import threading
import time
from typing import Any

import grpc
from gpu_common import card, say, write_json

from trellis.core.engine_config import EngineConfig
from trellis.core.model_config import load_model_source
from trellis.deploy.local_spec import local_spec
from trellis.deploy.mesh import Mesh
from trellis.v1 import sampling_pb2, stage_pb2, stage_pb2_grpc
from trellis.wire.router_client import RouterClient


def stream_times(address: str, prompt: list[int], n: int) -> tuple[float, list[float], str]:
    """(start, the arrival time of each token, the replica) of one streamed request."""
    with RouterClient(address) as c:
        t0 = time.perf_counter()
        times: list[float] = []
        replica = ""
        for resp in c.stream(prompt, max_tokens=n, ignore_eos=True, timeout=600):
            replica = replica or resp.replica
            times.extend([time.perf_counter()] * len(resp.token_ids))
        return t0, times, replica


def head_ttft(address: str, prompt: list[int]) -> float:
    """TTFT of a plain request straight to a head (no router, no hand-off)."""
    with grpc.insecure_channel(address) as ch:
        stub = stage_pb2_grpc.StageWorkerStub(ch)
        req = stage_pb2.SubmitRequest(
            request_id="direct", prompt_ids=prompt, sampling=sampling_pb2.SamplingParams(max_tokens=1)
        )
        t0 = time.perf_counter()
        for _ in stub.Submit(req, timeout=120):
            return time.perf_counter() - t0
    return float("nan")


def ttft_rows(address: str, args: argparse.Namespace, rng: random.Random) -> list[dict[str, Any]]:
    rows = []
    for n in args.lengths:
        stream_times(address, [rng.randrange(args.vocab) for _ in range(n)], 2)  # warm this length
        firsts, seconds, replica = [], [], ""
        for _ in range(args.reps):
            t0, times, replica = stream_times(address, [rng.randrange(args.vocab) for _ in range(n)], 2)
            firsts.append(times[0] - t0)
            seconds.append(times[1] - times[0])
        direct = [
            head_ttft(args.head, [rng.randrange(args.vocab) for _ in range(n)]) for _ in range(args.reps)
        ]
        rows.append(
            {
                "prompt_tokens": n,
                "head_direct_ttft_s": statistics.median(direct),
                "ttft_s": statistics.median(firsts),
                "ttft_all_s": firsts,
                "second_token_s": statistics.median(seconds),
                "replica": replica,
            }
        )
        r = rows[-1]
        ms = r["ttft_s"] * 1e3, r["second_token_s"] * 1e3, r["head_direct_ttft_s"] * 1e3
        line = f"  prompt {n:5d}: TTFT {ms[0]:7.1f} ms, second token +{ms[1]:6.1f} ms ({replica})"
        say(f"{line}; r0 direct {ms[2]:.1f} ms")
    return rows


def interference(address: str, args: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    results: list[Any] = [None] * args.streams

    def decode_stream(i: int) -> None:
        results[i] = stream_times(address, [rng.randrange(args.vocab) for _ in range(64)], args.decode_len)

    threads = [threading.Thread(target=decode_stream, args=(i,)) for i in range(args.streams)]
    for t in threads:
        t.start()
    time.sleep(3.0)  # every stream is decoding
    window = [time.perf_counter(), 0.0]
    long_ttft: list[float] = []

    def long_prompt() -> None:
        t0, times, _ = stream_times(address, [rng.randrange(args.vocab) for _ in range(args.long)], 8)
        long_ttft.append(times[0] - t0)

    arrivals = []
    for _ in range(args.arrivals):
        arrivals.append(threading.Thread(target=long_prompt))
        arrivals[-1].start()
        time.sleep(args.every)
    for t in arrivals:
        t.join()
    window[1] = time.perf_counter()
    for t in threads:
        t.join()
    gaps = sorted(
        b - a
        for _, times, _ in results
        for a, b in itertools.pairwise(times)
        if window[0] <= a and b <= window[1]
    )

    def q(p: float) -> float:
        return gaps[min(len(gaps) - 1, int(p * len(gaps)))] if gaps else float("nan")

    out = {
        "streams": args.streams,
        "long_prompt_tokens": args.long,
        "arrivals": args.arrivals,
        "every_s": args.every,
        "gaps": len(gaps),
        "itl_p50_s": q(0.5),
        "itl_p90_s": q(0.9),
        "itl_p99_s": q(0.99),
        "itl_max_s": gaps[-1] if gaps else float("nan"),
        "long_ttft_median_s": statistics.median(long_ttft) if long_ttft else float("nan"),
    }
    say(
        f"  ITL during {args.arrivals} arrivals of {args.long} tokens: p50 {out['itl_p50_s'] * 1e3:.1f} "
        f"p90 {out['itl_p90_s'] * 1e3:.1f} p99 {out['itl_p99_s'] * 1e3:.1f} ms; "
        f"their TTFT {out['long_ttft_median_s'] * 1e3:.0f} ms"
    )
    return out


def run_mesh(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    roles = ("prefill", "decode") if kind == "pd" else ("both", "both")
    cuda = args.device == "cuda"
    spec = local_spec(
        args.model,
        preset=None if args.model else args.preset,
        device=args.device,
        dtype="bfloat16" if cuda else "float32",
        shapes=tuple((1, 1, role) for role in roles),
        gpus=(0, 0) if cuda else (),
        max_queue=1024,
        max_model_len=max(args.long, *args.lengths) + 256,
        engine=EngineConfig(num_blocks=args.num_blocks, max_num_seqs=64),
        router={"max_local_prefill_tokens": 0},
    )
    t0 = time.perf_counter()
    with Mesh(spec) as mesh:
        mesh.start()
        mesh.wait_ready(progress=say)
        say(f"{kind}: mesh up in {time.perf_counter() - t0:.1f}s")
        rng = random.Random(1)
        address = mesh.router.address
        head = mesh.spec.replicas[0].stages[0]
        args.head = f"{head.host}:{head.port}"
        ttft = ttft_rows(address, args, rng)
        return {"kind": kind, "ttft": ttft, "interference": interference(address, args, rng)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-3-8b")
    ap.add_argument("--model", help="a checkpoint directory instead of the preset (a CPU smoke run)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[2048, 4096, 8192])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--decode-len", type=int, default=1500)
    ap.add_argument("--long", type=int, default=8192)
    ap.add_argument("--arrivals", type=int, default=8)
    ap.add_argument("--every", type=float, default=0.5)
    ap.add_argument("--num-blocks", type=int, default=5000)
    ap.add_argument("--kinds", default="pd,colocated")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    os.environ.setdefault("TRELLIS_LOG_LEVEL", "WARNING")
    info = card() if args.device == "cuda" else {"name": "cpu"}
    args.vocab = min(32000, load_model_source(args.model, None if args.model else args.preset).vocab_size)
    runs = [run_mesh(kind, args) for kind in args.kinds.split(",")]
    by = {r["kind"]: r for r in runs}
    if "pd" in by and "colocated" in by:
        added = [
            p["ttft_s"] / c["ttft_s"] - 1
            for p, c in zip(by["pd"]["ttft"], by["colocated"]["ttft"], strict=True)
        ]
        say(
            "TTFT added by P/D: "
            + ", ".join(f"{n}: {a * 100:+.1f}%" for n, a in zip(args.lengths, added, strict=True))
        )
    write_json(args.out, {"format": "trellis-pd/1", "card": info, "args": vars(args), "runs": runs})


if __name__ == "__main__":
    main()
