"""Prefill time (TTFT) of the Trellis engine on one GPU, against the FLOP limit of the same run.

    python bench/gpu_prefill.py --preset llama-3-8b --lengths 512,2048,8192,32768 \
        --out bench/results/h200/prefill_8b_1xh200.json --plot bench/results/h200/prefill_8b_1xh200.png

Dummy weights (bf16), random prompts (prefix caching off), one output token, so a request's time
to its first token is its prefill. Cases: one prompt of each length in one step (the token budget
as large as the longest prompt), 8 prompts of 512 in one step, and the longest prompt up to 8k
chunked by the default 2,048-token budget (each later chunk attends over the cache; run in a child
process first, as a second engine in one process finds the first one's memory still held). Each case:
the warm median of --reps full-length requests after one warm-up (whose time is kept as
``first_s``). Beside it the limit: matmul + causal-attention FLOPs (gpu_common.prefill_flops) at
the bf16 matmul rate measured in this run. Attention variants, in one process on one engine:
``old`` (the previous _attend, below: 3-D views, so SDPA's math path), ``flash`` (as shipped:
prefill_attention on flash) and ``cudnn-padded`` (long fresh prompts on cuDNN, padded:
prefill_attention.LONG_PROMPTS_ON_CUDNN). Lengths past the
preset's context run the same shape with max_model_len raised (dummy weights: the cost is that of
a long-context model of this shape); ``old`` skips 32k (its fp32 score tensor would need 137 GB).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from gpu_common import card, matmul_rate, prefill_flops, say, write_json

from trellis.core.engine_config import EngineConfig
from trellis.core.sampling import SamplingParams
from trellis.engine import Engine, EngineArgs
from trellis.planner.model import load_model
from trellis.runtime.kernels import paged_decode_attention
from trellis.runtime.model import prefill_attention
from trellis.runtime.model.attention_metadata import attend_paged, key_slots
from trellis.runtime.model.gpu_backend import GpuAttentionBackend

OLD_MAX_TOKENS = 8192  # the old path's [32, n, n] fp32 scores: 8.6 GB at 8k, 137 GB at 32k
CHUNK_BUDGET = 2048  # the engine's default max_num_batched_tokens


def old_attend(
    self: GpuAttentionBackend,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: tuple[torch.Tensor, torch.Tensor],
    *,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """GpuAttentionBackend._attend before fused prefill (kept here to time before and after)."""
    meta = self._meta
    k_cache, v_cache = kv_cache
    if self._all_decode:
        return paged_decode_attention(
            q,
            k_cache,
            v_cache,
            meta.block_tables,
            meta.context_lens,
            scale=scale,
            sliding_window=sliding_window,
        )
    out = torch.empty_like(q)
    if self._decode_rows.numel():
        seqs = self._decode_seqs
        out[self._decode_rows] = paged_decode_attention(
            q[self._decode_rows],
            k_cache,
            v_cache,
            meta.block_tables[seqs],
            meta.context_lens[seqs],
            scale=scale,
            sliding_window=sliding_window,
        )
    flat_k, flat_v = (c.view(-1, *c.shape[2:]) for c in kv_cache)
    for i, row, n, start in self._prefill:
        if start == 0 and sliding_window is None:
            o = F.scaled_dot_product_attention(
                *(t[row : row + n].transpose(0, 1) for t in (q, k, v)),
                is_causal=True,
                scale=scale,
                enable_gqa=True,
            )
            out[row : row + n] = o.transpose(0, 1)
        else:
            slots = key_slots(meta, i, start + n)
            out[row : row + n] = attend_paged(
                q[row : row + n], flat_k, flat_v, slots, start, scale=scale, sliding_window=sliding_window
            )
    return out


@contextlib.contextmanager
def variant(name: str) -> Iterator[None]:
    """Run the engine's prefill attention as ``name`` for the duration (the runner is in-process)."""
    shipped_attend, shipped_cudnn = GpuAttentionBackend._attend, prefill_attention.LONG_PROMPTS_ON_CUDNN
    if name == "old":
        GpuAttentionBackend._attend = old_attend  # type: ignore[method-assign]
    elif name in ("flash", "cudnn-padded"):
        prefill_attention.LONG_PROMPTS_ON_CUDNN = name == "cudnn-padded"
    else:
        raise ValueError(f"unknown variant {name!r}")
    try:
        yield
    finally:
        GpuAttentionBackend._attend = shipped_attend  # type: ignore[method-assign]
        prefill_attention.LONG_PROMPTS_ON_CUDNN = shipped_cudnn


def time_prefill(engine: Engine, lens: list[int], reps: int, rng: random.Random) -> dict[str, Any]:
    """One warm-up, then ``reps`` runs of fresh random prompts of ``lens`` submitted together: the
    time from submission to the last prompt's first token (the batch's prefill), warm median."""
    vocab = engine.cfg.vocab_size
    times = []
    for _ in range(reps + 1):
        prompts = [[rng.randrange(vocab) for _ in range(n)] for n in lens]
        outs = engine.generate(prompts, SamplingParams(max_tokens=1, ignore_eos=True))
        times.append(max(o.token_times[0] for o in outs) - min(o.submitted_at for o in outs))
    return {"first_s": times[0], "runs_s": times[1:], "ttft_s": statistics.median(times[1:])}


def start_engine(preset: str, max_model_len: int, budget: int) -> Engine:
    t0 = time.perf_counter()
    engine = Engine(
        EngineArgs(
            preset=preset,
            device="cuda",
            dtype="bfloat16",
            max_model_len=max_model_len,
            # Room beside the KV cache for 32k-token activations and the old path's fp32 scores.
            engine=EngineConfig(
                max_num_seqs=8,
                max_num_batched_tokens=budget,
                enable_prefix_caching=False,
                cuda_graphs=False,
                gpu_memory_utilization=0.7,
            ),
        )
    )
    say(f"engine up in {time.perf_counter() - t0:.1f}s: budget {budget} tokens, context {max_model_len}")
    return engine


def run_cases(
    engine: Engine, cases: dict[str, list[int]], variants: list[str], args: Any, shape: Any, rate: float
) -> list[dict[str, Any]]:
    rng = random.Random(0)
    runs = []
    for case, lens in cases.items():
        flops = prefill_flops(shape, lens)
        limit = flops["total"] / rate
        row: dict[str, Any] = {"case": case, "prompt_lens": lens, "flops": flops, "limit_s": limit}
        for name in variants:
            if name == "old" and max(lens) > OLD_MAX_TOKENS:
                continue
            with variant(name):
                got = time_prefill(engine, lens, args.reps, rng)
            got["fraction_of_limit"] = limit / got["ttft_s"]
            row[name] = got
            say(
                f"{case:18s} {name:9s} TTFT {got['ttft_s'] * 1e3:8.1f} ms (first {got['first_s'] * 1e3:7.1f})"
                f"  limit {limit * 1e3:7.1f} ms  {100 * got['fraction_of_limit']:5.1f}%"
            )
        runs.append(row)
    return runs


def plot(runs: list[dict[str, Any]], variants: list[str], info: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(variants)
    for j, name in enumerate(variants):
        xs = [i + (j - (len(variants) - 1) / 2) * width for i in range(len(runs))]
        ys = [100 * r[name]["fraction_of_limit"] if name in r else 0.0 for r in runs]
        bars = ax.bar(xs, ys, width, label=name)
        ax.bar_label(bars, labels=[f"{y:.0f}" if y else "-" for y in ys], fontsize=7)
    ax.set_xticks(range(len(runs)), [r["case"] for r in runs], fontsize=8)
    ax.set_ylabel("% of the FLOP limit (higher is better)")
    ax.set_title(f"Prefill, Llama-3-8B shape, bf16, {info['name']}: TTFT vs matmul + attention FLOPs")
    ax.axhline(75, color="k", ls="--", lw=0.8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    say(f"wrote {path}")


def chunked_runs(args: Any, rate: float) -> list[dict[str, Any]]:
    """The chunked case, in a child process run first: an engine closed in this process keeps
    its GPU memory, so a second one here would find no room for its KV cache."""
    longest = max((n for n in parse_lengths(args) if CHUNK_BUDGET < n <= OLD_MAX_TOKENS), default=None)
    if longest is None:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "chunked.json"
        child = [sys.executable, __file__, "--preset", args.preset, "--reps", str(args.reps)]
        child += ["--variants", args.variants, "--out", str(out), "--chunked-child", f"{longest}:{rate}"]
        subprocess.run(child, check=True)
        return json.loads(out.read_text())["runs"]


def parse_lengths(args: Any) -> list[int]:
    return [int(n) for n in args.lengths.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-3-8b")
    ap.add_argument("--lengths", default="512,2048,8192")
    ap.add_argument("--batch-of-512", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--variants", default="old,flash,cudnn-padded")
    ap.add_argument("--out", required=True)
    ap.add_argument("--plot")
    ap.add_argument("--chunked-child", help=argparse.SUPPRESS)  # "LENGTH:RATE", see chunked_runs
    args = ap.parse_args()
    variants = args.variants.split(",")
    shape = load_model(args.preset)
    if args.chunked_child:
        n, rate = args.chunked_child.split(":")
        engine = start_engine(args.preset, int(n) + 16, CHUNK_BUDGET)
        cases = {f"1 x {n} chunked {CHUNK_BUDGET}": [int(n)]}
        write_json(args.out, {"runs": run_cases(engine, cases, variants, args, shape, float(rate))})
        engine.close()
        return
    lengths = parse_lengths(args)
    info = card()
    rate = matmul_rate()
    say(f"card: {info['name']}; bf16 matmul {rate / 1e12:.0f} TFLOP/s (8192^3, median of 9)")
    chunked = chunked_runs(args, rate)
    cases = {f"1 x {n}": [n] for n in lengths}
    cases[f"{args.batch_of_512} x 512"] = [512] * args.batch_of_512
    longest = max(max(lengths), 512 * args.batch_of_512)
    engine = start_engine(args.preset, max(lengths) + 16, longest)
    runs = run_cases(engine, cases, variants, args, shape, rate) + chunked
    engine.close()
    write_json(
        args.out,
        {
            "format": "trellis-prefill/1",
            "card": info,
            "matmul_flops_per_s": rate,
            "preset": args.preset,
            "runs": runs,
        },
    )
    if args.plot:
        plot(runs, variants, info, args.plot)


if __name__ == "__main__":
    main()
