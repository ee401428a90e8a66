"""The P/D hand-off's data path between two processes, with the code the stages run.

    python bench/pd_handoff.py --device cuda --out bench/results/h200/pd_handoff_8b_1xh200.json
    python bench/pd_handoff.py --device cpu --out bench/results/pd_handoff_cpu.json

A 4k-token prompt of the Llama-3-8B shape (256 blocks of 16 tokens, 32 layers x K|V x 8 KV heads x
128, bf16: 512 MiB): this process plays the prefill replica P, a child process the decode replica D.
D makes its hand-off slab as a decode head does (GPU memory shared by CUDA IPC on cuda; a shared-
memory file on cpu) and a KV cache of its own; P opens the slab by its name and copies its blocks in
(`kv_copy.save_blocks`, with the per-slot checksums); D loads them into its cache (`load_blocks`,
checksums too) and the two sides' checksums must agree. Timed: P's copy, D's load, each a median
of --reps after a warm-up; the hand-off rate is the prompt's bytes over both. Beside it, in the
same run: a plain copy of the same bytes in one memory (device copy / memcpy), counted once.
Nothing crosses between the processes but JSON lines on a pipe (the slab's name, the slots).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from trellis.core.kv_store_api import SlotLayout
from trellis.core.plan import KVCopy
from trellis.runtime.device_slab import DeviceSlab, DeviceSlabView
from trellis.runtime.kv_copy import RankSlice, SlabView, load_blocks, save_blocks

LAYERS, HEADS, DIM, BLOCK = 32, 8, 128, 16


def layout(dtype: str) -> SlotLayout:
    return SlotLayout(LAYERS, HEADS, DIM, BLOCK, dtype)


def cache(num_blocks: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(LAYERS, 2, num_blocks, BLOCK, HEADS, DIM, device=device).to(dtype)


def device_time(fn: Any, reps: int) -> float:
    """The median device time of ``fn``'s kernels (CUDA events around it, after a warm-up)."""
    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def timed(fn: Any, device: torch.device, reps: int) -> tuple[float, Any]:
    fn()  # warm-up (maps, kernels)
    times, out = [], None
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def kernel_parts(kv: torch.Tensor, slab: Any, blocks: list[int], reps: int) -> dict[str, float]:
    """Where a send's time goes: the gather kernel into this GPU's own memory, with and without the
    checksums, and into the other process's slots without them (the send is into them, with)."""
    from trellis.runtime.kernels.kv_blocks import gather_blocks

    device = kv.device
    ids = torch.tensor(blocks, dtype=torch.int64, device=device)
    local = torch.empty(len(blocks), *kv.shape[:2], *kv.shape[3:], dtype=kv.dtype, device=device)
    sums = torch.zeros(len(blocks), dtype=torch.int64, device=device)
    into = slab.slots[: len(blocks)]
    return {
        "gather_local": device_time(lambda: gather_blocks(kv, ids, out=local), reps),
        "gather_local_sums": device_time(lambda: gather_blocks(kv, ids, out=local, sums=sums), reps),
        "gather_into_peer": device_time(lambda: gather_blocks(kv, ids, out=into), reps),
        "gather_into_peer_sums": device_time(lambda: gather_blocks(kv, ids, out=into, sums=sums), reps),
    }


def scatter_time(kv: torch.Tensor, slab: Any, blocks: tuple[int, ...], reps: int) -> float:
    """D's load kernel alone: the scatter from its own slots, with the checksums."""
    from trellis.runtime.kernels.kv_blocks import scatter_blocks

    ids = torch.tensor(blocks, dtype=torch.int64, device=kv.device)
    sums = torch.zeros(len(blocks), dtype=torch.int64, device=kv.device)
    return device_time(lambda: scatter_blocks(kv, ids, slab.slots[: len(blocks)], sums=sums), reps)


def decode_side(args: argparse.Namespace) -> None:
    """The child: D's slab and cache; loads what P copied when told to, answers with time + sums."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    lay = layout(args.dtype)
    if device.type == "cuda":
        owned = DeviceSlab(args.blocks, lay, device)
        slab: Any = DeviceSlabView(owned.name, lay, owned.slots)
        name = owned.name
    else:
        from trellis.kv_store.slab import Slab

        file = Slab.create(args.shm_dir, "pd-bench", "d", args.blocks, lay.slot_bytes)
        slab, name = SlabView(str(file.path), lay, device), str(file.path)
    kv = cache(args.blocks + 8, device, dtype)
    print(json.dumps({"slab": name}), flush=True)
    part = RankSlice((0, LAYERS), (0, HEADS), lay)
    for line in sys.stdin:
        msg = json.loads(line)
        copy = KVCopy(tuple(msg["blocks"]), tuple(msg["slots"]), name)

        def load(copy: KVCopy = copy) -> list[int]:
            sums: list[torch.Tensor] = []
            load_blocks(kv, slab, part, [copy], kv.shape[2], sums)
            return torch.cat(sums).tolist()

        seconds, sums = timed(load, device, args.reps)
        kernel = scatter_time(kv, slab, copy.block_ids, args.reps) if device.type == "cuda" else float("nan")
        print(json.dumps({"load_s": seconds, "load_kernel_s": kernel, "sums": sums}), flush=True)
        return


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--blocks", type=int, default=256)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--shm-dir", default="/dev/shm")
    ap.add_argument("--decode-side", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.decode_side:
        decode_side(args)
        return
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    lay = layout(args.dtype)
    with tempfile.TemporaryDirectory(dir=args.shm_dir) as shm:
        child = subprocess.Popen(
            [sys.executable, __file__, "--decode-side", *sys.argv[1:], "--shm-dir", shm],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdin is not None and child.stdout is not None
        name = json.loads(child.stdout.readline())["slab"]
        slab: Any = DeviceSlabView(name, lay) if device.type == "cuda" else SlabView(name, lay, device)
        kv = cache(args.blocks + 8, device, dtype)
        blocks = list(range(3, 3 + args.blocks))  # P's blocks (an offset: not the identity)
        slots = list(range(args.blocks))
        copy = KVCopy(tuple(blocks), tuple(slots), name)
        part = RankSlice((0, LAYERS), (0, HEADS), lay)

        def send() -> list[int]:
            sums: list[torch.Tensor] = []
            save_blocks(kv, slab, part, [copy], kv.shape[2], sums)
            return torch.cat(sums).tolist()

        send_s, p_sums = timed(send, device, args.reps)
        parts = {} if device.type != "cuda" else kernel_parts(kv, slab, blocks, args.reps)
        child.stdin.write(json.dumps({"blocks": list(range(args.blocks)), "slots": slots}) + "\n")
        child.stdin.flush()
        d = json.loads(child.stdout.readline())
        child.wait(timeout=60)
        nbytes = args.blocks * lay.slot_bytes
        flat = kv[:, :, : args.blocks].contiguous()
        dst = torch.empty_like(flat)  # allocated (and touched) once: a copy, not page faults
        base_s, _ = timed(lambda: dst.copy_(flat), device, args.reps)  # one plain copy of the bytes
    handoff = nbytes / (send_s + d["load_s"])
    kernels = parts.get("gather_into_peer_sums", float("nan")) + d["load_kernel_s"]
    out = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "command": "python " + " ".join(sys.argv),
        "bytes": nbytes,
        "blocks": args.blocks,
        "send_s": send_s,
        "load_s": d["load_s"],
        "checksums_agree": p_sums == d["sums"],
        "send_parts_s": parts,
        "handoff_bytes_per_s": handoff,  # wall: host planning + kernels + the checksums' read-back
        "load_kernel_s": d["load_kernel_s"],
        "handoff_kernel_bytes_per_s": nbytes / kernels,  # the two kernels alone (what a step waits for)
        "kernel_ratio_to_plain_copy": nbytes / kernels / (nbytes / base_s),
        "plain_copy_bytes_per_s": nbytes / base_s,
        "ratio_to_plain_copy": handoff / (nbytes / base_s),
    }
    print(json.dumps(out, indent=2))
    if not out["checksums_agree"]:
        raise SystemExit("the two sides' checksums differ")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
