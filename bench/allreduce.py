"""All-reduce from 8 KB to 1 MB (bf16): NCCL eager, NCCL inside a CUDA graph, and a one-shot
all-reduce over peer memory (torch symmetric memory, no multicast), eager and in a graph.

    torchrun --nproc-per-node 2 bench/allreduce.py --out bench/results/allreduce_2gpu.json

Each figure is the median over many calls; graph figures are a graph of 32 calls / 32.
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
import torch.distributed as dist

SIZES = [8 << 10, 16 << 10, 32 << 10, 64 << 10, 128 << 10, 256 << 10, 512 << 10, 1 << 20]


def timed(fn, reps: int = 50, inner: int = 1) -> float:
    times = []
    for _ in range(reps):
        dist.barrier()
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1e3 / inner)  # microseconds
    return statistics.median(times)


def graph_of(fn, n: int = 32) -> torch.cuda.CUDAGraph:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n):
            fn()
    return g


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    args = ap.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", rank))
    from trellis.runtime.model.custom_allreduce import OneShotAllReduce

    custom = OneShotAllReduce.create(
        dist.group.WORLD, max_bytes=max(SIZES), device=torch.device("cuda", rank)
    )
    rows = []
    for size in SIZES:
        t = torch.ones(size // 2, dtype=torch.bfloat16, device="cuda")
        row = {"bytes": size, "gpus": world}
        row["nccl_eager_us"] = timed(lambda t=t: dist.all_reduce(t))
        g = graph_of(lambda t=t: dist.all_reduce(t))
        row["nccl_graph_us"] = timed(g.replay, inner=32)
        if custom is not None:
            x = torch.full((size // 2,), float(rank + 1), dtype=torch.bfloat16, device="cuda")
            out = custom(x)
            expect = world * (world + 1) / 2
            row["custom_correct"] = bool(torch.all(out == expect).item())
            row["custom_eager_us"] = timed(lambda x=x: custom(x))
            try:
                g2 = graph_of(lambda x=x: custom(x))
                row["custom_graph_us"] = timed(g2.replay, inner=32)
            except Exception as e:  # record why, keep the other figures
                row["custom_graph_error"] = str(e)[:200]
        rows.append(row)
        if rank == 0:
            print(
                " ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                flush=True,
            )
    if rank == 0 and args.out:
        import sys

        sys.path.insert(0, os.path.dirname(__file__))
        from gpu_common import card, write_json

        write_json(args.out, {"card": card(), "world": world, "custom": custom is not None, "rows": rows})
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
