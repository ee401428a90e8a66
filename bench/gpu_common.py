"""Shared pieces of the GPU benchmarks: the card, its measured copy bandwidth, result records."""

from __future__ import annotations

import json
import os
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
