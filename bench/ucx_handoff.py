"""The stage handoff over UCX (trellis.transport.ucx): latency and bandwidth, GPU to GPU.

    python bench/ucx_handoff.py --src-gpu 0 --dst-gpu 1 --out bench/results/ucx_handoff.json
    (--device cpu measures host buffers, as the CPU mesh uses)

The sender runs here, the receiver in a child process; frames are the mesh's own (16-byte
prefix, protobuf header, raw tensor). Round trip: a frame of S bytes out, the same size back.
One way: S bytes out and a 1-byte ack back, less half the small round trip.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time

import torch

from trellis.core.net import free_ports
from trellis.transport.ucx import Listener, connect

SMALL = [4 << 10, 16 << 10, 64 << 10]
LARGE = [1 << 20, 16 << 20, 64 << 20]


def dev(kind: str, gpu: int) -> torch.device:
    return torch.device("cuda", gpu) if kind == "cuda" else torch.device("cpu")


async def serve(port: int, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_device(device)
    listener = Listener(port, device)
    link = await listener.accept(timeout=60)
    ack = torch.zeros(1, dtype=torch.uint8, device=device)
    while True:
        header, payload = await link.recv()
        if header == b"stop":
            break
        await link.send(b"", payload if header == b"echo" else ack)
    await link.close()
    listener.close()


async def measure(port: int, device: torch.device, reps: int) -> dict:
    link = await connect("127.0.0.1", port, device, timeout=60)
    out = {"round_trip_us": {}, "one_way_us": {}, "one_way_gb_s": {}}
    for size in SMALL:
        t = torch.ones(size, dtype=torch.uint8, device=device)
        times = []
        for i in range(reps + 10):
            s = time.perf_counter()
            await link.send(b"echo", t)
            await link.recv()
            if i >= 10:
                times.append((time.perf_counter() - s) * 1e6)
        times.sort()
        out["round_trip_us"][size] = {
            "p50": statistics.median(times),
            "p99": times[int(0.99 * (len(times) - 1))],
        }
    half_rtt = out["round_trip_us"][SMALL[0]]["p50"] / 2
    for size in LARGE:
        t = torch.ones(size, dtype=torch.uint8, device=device)
        times = []
        for i in range(max(10, reps // 10) + 3):
            s = time.perf_counter()
            await link.send(b"ack", t)
            await link.recv()
            if i >= 3:
                times.append((time.perf_counter() - s) * 1e6 - half_rtt)
        med = statistics.median(times)
        out["one_way_us"][size] = med
        out["one_way_gb_s"][size] = size / med / 1e3
    await link.send(b"stop")
    await link.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--src-gpu", type=int, default=0)
    ap.add_argument("--dst-gpu", type=int, default=1)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve, dev(args.device, args.dst_gpu)))
        return
    port = free_ports(1)[0]
    child = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--serve",
            str(port),
            "--device",
            args.device,
            "--dst-gpu",
            str(args.dst_gpu),
        ]
    )
    device = dev(args.device, args.src_gpu)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    res = asyncio.run(measure(port, device, args.reps))
    child.wait(timeout=60)
    for size, r in res["round_trip_us"].items():
        print(f"round trip {size >> 10:6d} KB: p50 {r['p50']:8.1f} us  p99 {r['p99']:8.1f} us")
    for size, us in res["one_way_us"].items():
        print(f"one way {size >> 20:4d} MB: {us:9.1f} us  {res['one_way_gb_s'][size]:7.1f} GB/s")
    if args.out:
        sys.path.insert(0, __file__.rsplit("/", 1)[0])
        from gpu_common import write_json

        info = {"device": args.device, "src_gpu": args.src_gpu, "dst_gpu": args.dst_gpu}
        if args.device == "cuda":
            from gpu_common import card

            info["card"] = card()
        write_json(args.out, {**info, **res})


if __name__ == "__main__":
    main()
