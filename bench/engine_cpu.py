"""Offline engine throughput on CPU: tokens/s at batch 1 and 32, TP 1 vs TP 2 vs PP 2, in one run.

    .venv/bin/python bench/engine_cpu.py [--prompt-len 64] [--output-len 64] [--batches 1,32]

Makes a small random Llama checkpoint (hidden 256, 4 layers) in a temporary directory, starts one
engine per split, and times greedy batches of random prompts that all run to --output-len tokens.
Each process of a replica gets cpu_count // (TP x PP) compute threads, so the splits share the
cores instead of oversubscribing them. Writes bench/results/engine_cpu.json (with the machine, the
torch version, the command and the load average around the run, since other work on the machine
skews the numbers) and bench/results/engine_cpu.png, and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from trellis.core import log
from trellis.core.engine_config import EngineConfig
from trellis.core.sampling import SamplingParams
from trellis.engine import Engine, EngineArgs

RESULTS = Path(__file__).resolve().parent / "results"
SPLITS = ((1, 1), (2, 1), (1, 2))  # (TP, PP)
MODEL = {
    "vocab_size": 4096,
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "max_position_embeddings": 1024,
}


def say(message: str) -> None:
    print(f"[engine_cpu {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def make_model(path: Path, seed: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM  # a dev dependency, only needed here

    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**MODEL, tie_word_embeddings=False)).float().save_pretrained(path)
    return path


def set_threads(threads: int) -> None:
    """This process (the head's rank 0) directly; the replica's other processes inherit the variable."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def time_batch(engine: Engine, prompts: list[list[int]], output_len: int, repeats: int) -> list[float]:
    """Wall seconds of each repeat of one closed batch, every request to output_len tokens."""
    params = SamplingParams(max_tokens=output_len, ignore_eos=True)
    walls = []
    for _ in range(repeats):
        start = time.perf_counter()
        outs = engine.generate(prompts, params)
        walls.append(time.perf_counter() - start)
        if any(len(o.token_ids) != output_len for o in outs):
            raise RuntimeError("a request stopped before output_len tokens")
    return walls


def bench_split(model: Path, tp: int, pp: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    threads = max(1, (os.cpu_count() or 1) // (tp * pp))
    set_threads(threads)
    say(f"TP {tp} x PP {pp}: starting the engine ({threads} thread(s) per process)")
    t0 = time.perf_counter()
    rng = random.Random(tp * 10 + pp)
    runs = []
    with Engine(
        EngineArgs(model=str(model), tp=tp, pp=pp, engine=EngineConfig(max_num_seqs=max(args.batches)))
    ) as engine:
        say(f"TP {tp} x PP {pp}: up in {time.perf_counter() - t0:.1f}s; warming up")
        warm = [[rng.randrange(MODEL["vocab_size"]) for _ in range(args.prompt_len)] for _ in range(2)]
        time_batch(engine, warm, 8, 1)
        for batch in args.batches:
            prompts = [
                [rng.randrange(MODEL["vocab_size"]) for _ in range(args.prompt_len)] for _ in range(batch)
            ]
            walls = time_batch(engine, prompts, args.output_len, args.repeats)
            best = min(walls)
            out_tok_s = batch * args.output_len / best
            tried = ", ".join(f"{w:.2f}" for w in walls)
            say(f"TP {tp} x PP {pp}, batch {batch:3d}: {out_tok_s:8.1f} output tok/s (best of {tried} s)")
            runs.append(
                {
                    "name": f"tp{tp}-pp{pp}-b{batch}",
                    "config": {
                        "tp": tp,
                        "pp": pp,
                        "batch": batch,
                        "prompt_len": args.prompt_len,
                        "output_len": args.output_len,
                        "threads_per_process": threads,
                    },
                    "measured": {
                        "output_tok_s": out_tok_s,
                        "total_tok_s": batch * (args.prompt_len + args.output_len) / best,
                        "wall_s": best,
                        "wall_s_repeats": [round(w, 4) for w in walls],
                    },
                }
            )
    return runs


def machine() -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads_default": torch.get_num_threads(),
    }


def print_table(runs: list[dict[str, Any]], batches: list[int]) -> None:
    header = f"{'split':<10}" + "".join(f"{f'batch {b} tok/s':>18}" for b in batches)
    print(header)
    print("-" * len(header))
    for tp, pp in SPLITS:
        row = {
            r["config"]["batch"]: r["measured"]["output_tok_s"]
            for r in runs
            if (r["config"]["tp"], r["config"]["pp"]) == (tp, pp)
        }
        print(f"{f'TP{tp} PP{pp}':<10}" + "".join(f"{row[b]:>18.1f}" for b in batches))


def plot(runs: list[dict[str, Any]], batches: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"TP{tp} PP{pp}" for tp, pp in SPLITS]
    fig, axes = plt.subplots(1, len(batches), figsize=(4.5 * len(batches), 3.6))
    for ax, batch in zip(list(axes) if len(batches) > 1 else [axes], batches, strict=True):
        values = [
            next(
                r["measured"]["output_tok_s"]
                for r in runs
                if (r["config"]["tp"], r["config"]["pp"], r["config"]["batch"]) == (tp, pp, batch)
            )
            for tp, pp in SPLITS
        ]
        bars = ax.bar(labels, values, color=["#4c72b0", "#dd8452", "#55a868"])
        ax.bar_label(bars, fmt="%.0f")
        ax.set_title(f"batch {batch}")
        ax.margins(y=0.15)
        ax.set_ylabel("output tokens/s")
    fig.suptitle(f"Trellis offline engine on CPU ({os.cpu_count()} cores, float32, hidden 256, 4 layers)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--batches", default="1,32", help="comma-separated batch sizes")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per batch; the best counts")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    args = ap.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    os.environ.setdefault("TRELLIS_LOG_LEVEL", "WARNING")  # the replica's processes inherit it
    log.configure("bench")
    info = machine()
    load_before = os.getloadavg()
    say(f"{info['cpu_count']} CPUs, torch {info['torch']}; load average {load_before[0]:.2f}")
    if load_before[0] > 0.5 * (info["cpu_count"] or 1):
        say("warning: the machine is busy; other work will skew these numbers (the best repeat counts)")
    started = time.perf_counter()
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="trellis-bench-") as tmp:
        say("writing a random checkpoint: " + ", ".join(f"{k} {v}" for k, v in MODEL.items()))
        model = make_model(Path(tmp) / "model", seed=0)
        for tp, pp in SPLITS:
            runs.extend(bench_split(model, tp, pp, args))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    result = {
        "bench": "engine_cpu",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": info,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "elapsed_s": time.perf_counter() - started,
        "model": {**MODEL, "dtype": "float32", "weights": "random (transformers init, seed 0)"},
        "sampling": "greedy, ignore_eos: every request runs to output_len",
        "metric": "output_tok_s = batch * output_len / wall seconds of the whole batch (prefill included)",
        "runs": runs,
    }
    json_path, png_path = args.out_dir / "engine_cpu.json", args.out_dir / "engine_cpu.png"
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    plot(runs, args.batches, png_path)
    say(f"wrote {json_path} and {png_path}")
    print_table(runs, args.batches)


if __name__ == "__main__":
    main()
