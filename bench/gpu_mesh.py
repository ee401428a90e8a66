"""Batch sweep through the whole mesh on GPUs: router + stage workers, concurrent gRPC streams.

    python bench/gpu_mesh.py --preset llama-3-8b --tp 1 --pp 1 --batches 1,8,32,64,128 --out FILE

Per batch: b clients each stream one request (random prompt of prompt-len ids, output-len tokens,
greedy); TTFT and time per output token from the stream's arrival times at the client.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import threading
import time

from gpu_common import bench_record, card, say, steady_tpot, write_json

from trellis.core.engine_config import EngineConfig
from trellis.deploy.local_spec import local_spec
from trellis.deploy.mesh import Mesh
from trellis.wire.router_client import RouterClient


def one_stream(address: str, prompt: list[int], n: int, out: list, i: int) -> None:
    with RouterClient(address) as c:
        t0 = time.perf_counter()
        times = []
        for resp in c.stream(prompt, max_tokens=n, ignore_eos=True):
            times.extend([time.perf_counter()] * len(resp.token_ids))
        out[i] = (t0, times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-3-8b")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--batches", default="1,8,32,64,128")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--decode-burst", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    os.environ.setdefault("TRELLIS_LOG_LEVEL", "WARNING")
    spec = local_spec(
        preset=args.preset,
        stages=args.pp,
        tp=args.tp,
        device="cuda",
        dtype="bfloat16",
        max_queue=1024,
        max_model_len=args.prompt_len + args.output_len + 16,
        engine=EngineConfig(
            max_num_seqs=max(batches), max_num_batched_tokens=8192, decode_burst=args.decode_burst
        ),
    )
    info = card()
    t0 = time.perf_counter()
    with Mesh(spec) as mesh:
        mesh.start()
        mesh.wait_ready(progress=say)
        say(f"mesh up in {time.perf_counter() - t0:.1f}s")
        rng = random.Random(0)
        one_stream(mesh.router.address, [1, 2, 3], 4, [None], 0)  # warm-up
        runs = []
        for b in batches:
            results: list = [None] * b
            threads = [
                threading.Thread(
                    target=one_stream,
                    args=(
                        mesh.router.address,
                        [rng.randrange(32000) for _ in range(args.prompt_len)],
                        args.output_len,
                        results,
                        i,
                    ),
                )
                for i in range(b)
            ]
            start = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            end = max(r[1][-1] for r in results)
            ttft = statistics.mean(r[1][0] - r[0] for r in results)
            tpot = steady_tpot([r[1] for r in results])
            runs.append(
                bench_record(
                    f"mesh-{args.preset}-tp{args.tp}-pp{args.pp}-b{b}-burst{args.decode_burst}",
                    args,
                    info,
                    b,
                    ttft=ttft,
                    tpot=tpot,
                    throughput=b * args.output_len / (end - start),
                    decode_burst=args.decode_burst,
                )
            )
            say(
                f"mesh batch {b:4d}: TTFT {ttft * 1e3:8.1f} ms  TPOT {tpot * 1e3:7.2f} ms  "
                f"throughput {runs[-1]['measured']['throughput_tok_s']:9.1f} tok/s"
            )
    write_json(args.out, {"format": "trellis-bench/1", "card": info, "runs": runs})


if __name__ == "__main__":
    main()
