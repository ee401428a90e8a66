"""Shared pieces of the GPU benchmarks: the card, its measured copy bandwidth, result records."""

from __future__ import annotations

import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def card() -> dict[str, Any]:
    p = torch.cuda.get_device_properties(0)
    return {
        "name": p.name,
        "count": torch.cuda.device_count(),
        "memory_gib": round(p.total_memory / 2**30, 1),
        "sms": p.multi_processor_count,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }


def copy_bandwidth(nbytes: int = 4 << 30, reps: int = 20) -> float:
    """Device-to-device copy rate, counting bytes read and written (2N per copy of N), bytes/s."""
    a = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        b.copy_(a)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * nbytes / sorted(times)[len(times) // 2]


def gpu_preset(name: str) -> str:
    """The planner's GPU preset for a device name."""
    return "h200" if "H200" in name else "h100-sxm" if "H100" in name else name.lower()


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data.setdefault("command", " ".join([os.path.basename(sys.executable), *sys.argv]))
    path.write_text(json.dumps(data, indent=1))
    say(f"wrote {path}")


def steady_tpot(token_times: list[list[float]]) -> float:
    """Mean gap between consecutive tokens once every request has its first token: the time per
    output token with the whole batch decoding (prefill chunks of late requests excluded; with
    decode bursts the tokens of a burst arrive together, and the mean spreads the burst's time)."""
    all_started = max(times[0] for times in token_times)
    gaps = [b - a for times in token_times for a, b in itertools.pairwise(times) if a >= all_started]
    return statistics.fmean(gaps) if gaps else float("nan")


def bench_record(
    name: str,
    args: Any,
    info: dict[str, Any],
    batch: int,
    *,
    ttft: float,
    tpot: float,
    throughput: float,
    **config: Any,
) -> dict[str, Any]:
    """One run in the planner's trellis-bench/1 format (`trellis plan --validate` reads it)."""
    return {
        "format": "trellis-bench/1",
        "name": name,
        "config": {
            "model": args.preset,
            "dtype": "bf16",
            "gpu": gpu_preset(info["name"]),
            "nodes": 1,
            "gpus_per_node": info["count"],
            "tp": args.tp,
            "pp": args.pp,
            "dp": 1,
            "batch": batch,
            "prompt_len": args.prompt_len,
            "output_len": args.output_len,
            **config,
        },
        "measured": {
            "decode_tok_s": batch / tpot,
            "ttft_s": ttft,
            "tpot_s": tpot,
            "throughput_tok_s": throughput,
        },
    }
