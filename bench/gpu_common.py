"""Shared pieces of the GPU benchmarks: the card, its measured ceilings (copy bandwidth, bf16
matmul rate), the yardsticks built on them (decode bytes, prefill FLOPs), result records."""

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


def matmul_rate(n: int = 8192, reps: int = 9) -> float:
    """bf16 FLOP/s of one big torch.matmul (n x n times n x n = 2 n^3 FLOPs), the median of ``reps``
    timed with CUDA events after a warm-up; random inputs (zeros run faster than real data)."""
    a, b = (torch.randn(n, n, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    torch.matmul(a, b)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.matmul(a, b)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n**3 / statistics.median(times)


def decode_step_bytes(shape: Any, batch: int, mean_context: float) -> dict[str, float]:
    """Bytes one decode step of ``batch`` sequences reads: every weight but the embedding table,
    of which each sequence reads one row (a tied table is read whole, as the LM head), plus each
    sequence's K/V at its mean context. ``incl_embedding`` is the older yardstick (whole table)."""
    weights = shape.weight_bytes("bf16")
    table = 0 if shape.tied_embeddings else shape.embedding_params() * 2
    kv = batch * mean_context * shape.kv_bytes_per_token(2)
    read = weights - table + batch * shape.hidden * 2 + kv
    return {"step_bytes": read, "kv_bytes": kv, "incl_embedding": weights + kv}


def prefill_flops(shape: Any, prompt_lens: list[int]) -> dict[str, float]:
    """FLOPs of prefilling fresh prompts: the layers' matmuls, 2 x linear params x tokens (the
    embedding is a lookup; the LM head runs on each prompt's last row only), plus causal attention,
    per layer and prompt of n tokens 2 (QK^T, PV) x 2 x n (n + 1) / 2 x q_heads x head_dim."""
    tokens = sum(prompt_lens)
    lm_head = shape.vocab * shape.hidden
    matmul = 2 * (shape.layers * shape.layer_linear_params() * tokens + lm_head * len(prompt_lens))
    attention = shape.layers * sum(2 * n * (n + 1) * shape.heads * shape.head_dim for n in prompt_lens)
    return {"matmul": float(matmul), "attention": float(attention), "total": float(matmul + attention)}


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
