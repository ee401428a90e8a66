"""The KV plane's data path and what it buys: copy rates, and TTFT cold vs local hit vs store hit.

    python bench/kv_store_bench.py --preset llama-3-8b --device cuda --lengths 2048,4096,8192 \
        --out bench/results/h200/kv_store_8b_1xh200.json --plot bench/results/h200/kv_store_8b_1xh200.png
    python bench/kv_store_bench.py --copies-only --device cpu --out bench/results/kv_store_copies_cpu.json

Copies (the model's block shape, in one process): a 4k prompt's blocks (256) gathered and
scattered inside a block-major cache (one indexing op each; `payload` counts the bytes of the
blocks once, `rw` counts read + write), and the store path: 256 blocks saved from the cache into a
shared-memory slab and loaded back (on CUDA the slab is registered as pinned memory), beside a
plain contiguous copy of the same bytes between the same two memories (memcpy / pinned H2D).

TTFT (one engine with a real kv_store service, write-through, dummy weights): for each prompt length,
warm medians of --reps: cold (a fresh random prompt), local hit (the same prompt again: all but the
last token cached on the replica), store host hit (the replica's prefix cache reset, the store's
host tier holds it) and store disk hit (fillers pushed it out of the host tier; the disk files may
still sit in the OS page cache: this is the disk tier's code path, not a cold disk).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from trellis.core.engine_config import EngineConfig
from trellis.core.kv_names import fingerprint_of
from trellis.core.kv_store_api import SlotLayout
from trellis.core.model_config import load_model_source
from trellis.core.net import free_ports
from trellis.core.plan import KVCopy
from trellis.core.sampling import SamplingParams
from trellis.engine import Engine, EngineArgs
from trellis.runtime.kv_copy import RankSlice, SlabView, load_blocks, save_blocks
from trellis.runtime.kv_setup import StoreUse
from trellis.wire.kv_store_client import KVStoreClient

ONE_TOKEN = SamplingParams(max_tokens=1, ignore_eos=True)
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def timed(fn: Any, device: torch.device, reps: int = 10) -> float:
    """Median seconds of fn() (after one warm-up), synced on CUDA."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def copies(preset: str, device: torch.device, dtype: str, blocks: int, tmp: Path) -> dict[str, Any]:
    cfg = load_model_source(None, preset)
    layout = SlotLayout(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, 16, dtype)
    num_blocks = 4 * blocks
    cache = torch.zeros(
        cfg.num_hidden_layers, 2, num_blocks, 16, cfg.num_key_value_heads, cfg.head_dim,
        dtype=DTYPES[dtype], device=device,
    )  # fmt: skip
    cache.normal_()
    ids = torch.randperm(num_blocks, device=device)[:blocks]
    payload = blocks * layout.slot_bytes
    out: dict[str, Any] = {"blocks": blocks, "payload_bytes": payload}
    staged = cache.permute(2, 0, 1, 3, 4, 5)[ids]

    def scatter_indexing() -> None:
        cache.permute(2, 0, 1, 3, 4, 5)[ids] = staged

    out["torch_indexing_gather_rw_gb_s"] = (
        2 * payload / timed(lambda: cache.permute(2, 0, 1, 3, 4, 5)[ids], device) / 1e9
    )
    out["torch_indexing_scatter_rw_gb_s"] = 2 * payload / timed(scatter_indexing, device) / 1e9
    if device.type == "cuda":  # what kv_copy runs: the one Triton kernel
        from trellis.runtime.kernels import gather_blocks, scatter_blocks

        gather = timed(lambda: gather_blocks(cache, ids), device)
        scat = timed(lambda: scatter_blocks(cache, ids, staged), device)
    else:
        gather = timed(lambda: cache.permute(2, 0, 1, 3, 4, 5)[ids], device)
        scat = timed(scatter_indexing, device)
    out["gather_payload_gb_s"] = payload / gather / 1e9
    out["scatter_payload_gb_s"] = payload / scat / 1e9
    out["gather_rw_gb_s"] = 2 * payload / gather / 1e9
    out["scatter_rw_gb_s"] = 2 * payload / scat / 1e9
    path = tmp / "bench-slab"
    path.write_bytes(b"")
    with path.open("r+b") as f:
        f.truncate(blocks * layout.slot_bytes)
    slab = SlabView(str(path), layout, device)
    out["slab_pinned"] = slab.pinned
    part = RankSlice((0, cfg.num_hidden_layers), (0, cfg.num_key_value_heads), layout)
    block_list = ids.tolist()
    copy = [KVCopy(tuple(block_list), tuple(range(blocks)))]
    save = timed(lambda: save_blocks(cache, slab, part, copy, num_blocks), device, reps=5)
    load = timed(lambda: load_blocks(cache, slab, part, copy, num_blocks), device, reps=5)
    flat = slab.slots.view(-1)
    dev_flat = cache.view(-1)[: flat.numel()]
    base_load = timed(lambda: dev_flat.copy_(flat, non_blocking=slab.pinned), device, reps=5)
    base_save = timed(lambda: flat.copy_(dev_flat, non_blocking=slab.pinned), device, reps=5)
    out["store_save_gb_s"] = payload / save / 1e9
    out["store_load_gb_s"] = payload / load / 1e9
    out["plain_copy_to_cache_gb_s"] = payload / base_load / 1e9
    out["plain_copy_to_slab_gb_s"] = payload / base_save / 1e9
    out["load_vs_plain"] = base_load / load
    out["save_vs_plain"] = base_save / save
    slab.close()
    path.unlink()
    return out


class StoreProcess:
    """A real kv_store service for the engine, with host and disk tiers under ``root``."""

    def __init__(self, preset: str, dtype: str, root: Path, host_bytes: int, disk_bytes: int) -> None:
        self.port, stage_port = free_ports(2)
        cfg = load_model_source(None, preset)
        spec = {
            "model": {"preset": preset, "load_format": "dummy", "dtype": dtype},
            "replicas": [
                {"name": "bench", "stages": [{"layers": [0, cfg.num_hidden_layers], "port": stage_port}]}
            ],
            "kv_store": {
                "port": self.port,
                "capacity_bytes": host_bytes,
                "shm_dir": "/dev/shm",
                "disk_path": str(root / "disk"),
                "disk_capacity_bytes": disk_bytes,
            },
        }
        (root / "spec.yaml").write_text(yaml.safe_dump(spec))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.kv_store", "--spec", str(root / "spec.yaml")]
        )
        self.address = f"127.0.0.1:{self.port}"

    async def wait_up(self) -> None:
        client = KVStoreClient(self.address, 1.0)
        try:
            for _ in range(300):
                try:
                    await client.info()
                    return
                except Exception:  # not listening yet
                    if self.proc.poll() is not None:
                        raise RuntimeError("the kv_store service exited") from None
                    await asyncio.sleep(0.2)
        finally:
            await client.close()

    async def run(self, hashes: list[int]) -> tuple[int, int]:
        client = KVStoreClient(self.address, 2.0)
        try:
            r = await client.lookup(hashes)
            return r.host, r.total
        finally:
            await client.close()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def ttft(engine: Engine, prompt: list[int]) -> float:
    (c,) = engine.generate([prompt], ONE_TOKEN)
    return c.token_times[0] - c.submitted_at


def wait_for(store: StoreProcess, hashes: list[int], tier: str, timeout_s: float = 60.0) -> tuple[int, int]:
    end = time.monotonic() + timeout_s
    while True:
        host, total = asyncio.run(store.run(hashes))
        done = host >= len(hashes) if tier == "host" else (total >= len(hashes) and host < len(hashes))
        if done or time.monotonic() > end:
            return host, total
        time.sleep(0.05)


def ttft_cases(args: argparse.Namespace, lengths: list[int], tmp: Path) -> list[dict[str, Any]]:
    cfg = load_model_source(None, args.preset)
    fp = fingerprint_of(cfg, args.preset, args.dtype, 16)
    block_bytes = SlotLayout(
        cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, 16, args.dtype
    ).slot_bytes
    longest = max(lengths)
    host_bytes = 3 * (longest // 16) * block_bytes  # a prompt and two fillers of the longest length
    store = StoreProcess(args.preset, args.dtype, tmp, host_bytes, 8 * host_bytes)
    asyncio.run(store.wait_up())
    rng = random.Random(0)
    rows = []
    try:
        engine_cfg = EngineConfig(max_num_batched_tokens=longest, gpu_memory_utilization=0.80)
        with Engine(
            EngineArgs(
                preset=args.preset,
                device=args.device,
                dtype=args.dtype,
                max_model_len=longest + 16,
                engine=engine_cfg,
                kv_store=StoreUse(store.address, write_through=True, rpc_timeout_s=5.0),
            )
        ) as e:
            for n in lengths:
                rows.append(one_length(e, store, fp, cfg.vocab_size, n, longest, args.reps, rng))
    finally:
        store.stop()
    return rows


def one_length(
    e: Engine, store: StoreProcess, fp: Any, vocab: int, n: int, longest: int, reps: int, rng: random.Random
) -> dict[str, Any]:
    """One prompt length's four cases (see the module doc)."""

    def fresh(length: int) -> list[int]:
        return [rng.randrange(1000, vocab) for _ in range(length)]

    def names(p: list[int]) -> list[int]:
        return fp.block_hashes(p)[: (len(p) - 1) // 16]

    cold, prompts = [], []
    for _ in range(reps + 1):
        p = fresh(n)
        cold.append(ttft(e, p))
        wait_for(store, names(p), "host")
        prompts.append(p)
    prompt = prompts[-1]
    local = [ttft(e, prompt) for _ in range(reps + 1)]
    host = []
    for _ in range(reps + 1):
        e.reset_prefix_cache()
        host.append(ttft(e, prompt))
    for _ in range(3):  # push the prompts out of the host tier (their disk copies stay)
        filler = fresh(longest)
        ttft(e, filler)
        wait_for(store, names(filler), "host")
    disk = []
    for p in prompts[1:]:  # each read from disk once (the read puts it back in the host tier)
        where = wait_for(store, names(p), "disk", timeout_s=20)
        e.reset_prefix_cache()
        disk.append((ttft(e, p), where))
    stats = e.stats()
    row = {
        "prompt_tokens": n,
        "cold_s": statistics.median(cold[1:]),
        "local_hit_s": statistics.median(local[1:]),
        "store_host_hit_s": statistics.median(host[1:]),
        "store_disk_hit_s": statistics.median(t for t, _ in disk),
        "disk_case_tiers": [w for _, w in disk],  # (host run, total run) before each read
        "engine_stats": stats,
    }
    for k in ("local_hit_s", "store_host_hit_s", "store_disk_hit_s"):
        row[k.replace("_s", "_vs_cold")] = row[k] / row["cold_s"]
    say(
        f"{n} tokens: cold {row['cold_s'] * 1e3:.1f} ms, local {row['local_hit_s'] * 1e3:.1f}, "
        f"store host {row['store_host_hit_s'] * 1e3:.1f}, disk {row['store_disk_hit_s'] * 1e3:.1f} ms"
    )
    return row


def plot(data: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["ttft"]
    keys = ("cold_s", "local_hit_s", "store_host_hit_s", "store_disk_hit_s")
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.2
    for i, k in enumerate(keys):
        ax.bar([j + i * width for j in range(len(rows))], [r[k] * 1e3 for r in rows], width, label=k[:-2])
    ax.set_xticks([j + 1.5 * width for j in range(len(rows))], [str(r["prompt_tokens"]) for r in rows])
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("TTFT (ms, warm median)")
    ax.set_title(f"{data['preset']} on {data['card']}: where the prompt's KV comes from")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    say(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-3-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--lengths", default="2048,4096,8192")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--copy-blocks", type=int, default=256)
    ap.add_argument("--copies-only", action="store_true")
    ap.add_argument("--out", required=True)
    ap.add_argument("--plot")
    args = ap.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    data: dict[str, Any] = {"preset": args.preset, "card": name, "command": " ".join(sys.argv)}
    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm, tempfile.TemporaryDirectory() as disk:
        say("copies: gather / scatter, store save / load")
        data["copies"] = copies(args.preset, device, args.dtype, args.copy_blocks, Path(shm))
        say(str(data["copies"]))
        if not args.copies_only:
            data["ttft"] = ttft_cases(args, [int(x) for x in args.lengths.split(",")], Path(disk))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    import json

    out.write_text(json.dumps(data, indent=1))
    say(f"wrote {out}")
    if args.plot and "ttft" in data:
        plot(data, args.plot)


if __name__ == "__main__":
    main()
