"""Decode and batch throughput of the Trellis engine on GPUs, against the bandwidth roofline.

    python bench/gpu_decode.py --preset llama-3-8b --tp 1 --pp 1 --batches 1,8,32,64,128 \
        --prompt-len 512 --output-len 128 --out bench/results/gpu_decode_8b_tp1.json

Dummy weights (bf16), random prompts, greedy, every request runs to output-len tokens. Per batch:
TTFT (mean), time per output token (mean over requests), throughput, and the roofline: the step
time if every byte the step reads (all weights but the embedding table, of which each sequence
reads one row, + the KV cache of the batch) moved at the copy bandwidth measured in the same run.
The older roofline, which counted the whole embedding table, stays beside it in the JSON
("roofline_incl_embedding").
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from gpu_common import bench_record, card, copy_bandwidth, decode_step_bytes, say, steady_tpot, write_json

from trellis.core.engine_config import EngineConfig
from trellis.core.sampling import SamplingParams
from trellis.engine import Engine, EngineArgs
from trellis.planner.model import load_model


def graph_step_ms(engine: Engine, batches: list[int], reps: int = 50) -> dict[int, float]:
    """GPU time of one decode step alone: replays of the captured graph, timed with CUDA events
    (the static buffers still hold the last real step's tables, so the replays read real data)."""
    import torch

    graphs = engine.executor.ctx.runner.graphs
    out = {}
    for b in batches:
        bs = graphs.bucket(b)
        g = graphs._graphs[bs]
        g.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            g.replay()
        end.record()
        end.synchronize()
        out[b] = start.elapsed_time(end) / reps
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-3-8b")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--batches", default="1,8,32,64,128")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--max-batched-tokens", type=int, default=8192)
    ap.add_argument("--no-graphs", action="store_true")
    ap.add_argument(
        "--decode-burst", type=int, default=1, help="greedy decode steps per plan (1: every step)"
    )
    ap.add_argument(
        "--one-shot-max-bytes", type=int, default=0, help="TP all-reduces up to this size over peer memory"
    )
    ap.add_argument(
        "--max-in-flight", type=int, default=None, help="micro-batches in flight with PP (default: stages)"
    )
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    from trellis.runtime.rank import dump_stacks_if_hung

    dump_stacks_if_hung()
    info = card()
    say(f"card: {info['name']} x{info['count']}; measuring copy bandwidth")
    bw = copy_bandwidth()
    shape = load_model(args.preset)
    weight_bytes = shape.weight_bytes("bf16")
    say(f"copy {bw / 1e12:.2f} TB/s; {args.preset}: {weight_bytes / 1e9:.2f} GB of weights")
    t0 = time.perf_counter()
    say(f"starting the engine: TP {args.tp} x PP {args.pp}, dummy weights, CUDA graphs {not args.no_graphs}")
    engine = Engine(
        EngineArgs(
            preset=args.preset,
            tp=args.tp,
            pp=args.pp,
            device="cuda",
            dtype="bfloat16",
            max_model_len=args.prompt_len + args.output_len + 16,
            engine=EngineConfig(
                max_num_seqs=max(batches),
                max_num_batched_tokens=args.max_batched_tokens,
                enable_prefix_caching=False,
                cuda_graphs=not args.no_graphs,
                one_shot_max_bytes=args.one_shot_max_bytes,
                decode_burst=args.decode_burst,
                max_in_flight=args.max_in_flight,
            ),
        )
    )
    say(f"engine up in {time.perf_counter() - t0:.1f}s; {engine.num_blocks} KV blocks")
    suffix = (
        ("-oneshot" if args.one_shot_max_bytes else "")
        + (f"-burst{args.decode_burst}" if args.decode_burst > 1 else "")
        + (f"-inflight{args.max_in_flight}" if args.max_in_flight else "")
    )
    in_flight = args.max_in_flight or args.pp
    rng = random.Random(0)
    vocab = engine.cfg.vocab_size
    engine.generate(
        [[rng.randrange(vocab) for _ in range(16)]], SamplingParams(max_tokens=8, ignore_eos=True)
    )
    runs = []
    for b in batches:
        prompts = [[rng.randrange(vocab) for _ in range(args.prompt_len)] for _ in range(b)]
        busy_before = engine.stage_busy_seconds()
        start = time.perf_counter()
        outs = engine.generate(prompts, SamplingParams(max_tokens=args.output_len, ignore_eos=True))
        end = max(o.token_times[-1] for o in outs)
        busy = [b - a for a, b in zip(busy_before, engine.stage_busy_seconds(), strict=True)]
        # Over the whole run (prefill and decode): the share of stage-time the pipeline left idle.
        bubble = engine.bubble_fraction([0.0] * len(busy), busy, end - start)
        ttft = statistics.mean(o.token_times[0] - o.submitted_at for o in outs)
        tpot = steady_tpot([o.token_times for o in outs])
        mean_ctx = args.prompt_len + args.output_len / 2
        step = decode_step_bytes(shape, b, mean_ctx)
        # Each of the TP GPUs of a stage reads its 1/TP share; PP stages run one after another
        # for a given token, so the per-token time does not shrink with PP.
        roof_tpot = step["step_bytes"] / (args.tp * bw)
        old_roof_tpot = step["incl_embedding"] / (args.tp * bw)
        run = bench_record(
            f"{args.preset}-tp{args.tp}-pp{args.pp}-b{b}" + suffix,
            args,
            info,
            b,
            ttft=ttft,
            tpot=tpot,
            throughput=b * args.output_len / (end - start),
            max_batched_tokens=args.max_batched_tokens,
            decode_burst=args.decode_burst,
            one_shot_max_bytes=args.one_shot_max_bytes,
            max_in_flight=in_flight,
        )
        run["measured"]["stage_busy_s"] = busy
        run["measured"]["bubble"] = bubble
        run["roofline"] = {
            "tpot_s": roof_tpot,
            "decode_tok_s": b / roof_tpot,
            "step_bytes": step["step_bytes"],
            "fraction": roof_tpot / tpot,
        }
        run["roofline_incl_embedding"] = {
            "tpot_s": old_roof_tpot,
            "step_bytes": step["incl_embedding"],
            "fraction": old_roof_tpot / tpot,
        }
        runs.append(run)
        say(
            f"batch {b:4d}: TTFT {ttft * 1e3:8.1f} ms  TPOT {tpot * 1e3:7.2f} ms  "
            f"decode {b / tpot:9.1f} tok/s  "
            f"roofline {b / roof_tpot:9.1f} tok/s ({100 * roof_tpot / tpot:5.1f}%)  "
            f"throughput {run['measured']['throughput_tok_s']:9.1f} tok/s"
            + (f"  bubble {100 * bubble:4.1f}% ({in_flight} in flight)" if args.pp > 1 else "")
        )
    if args.tp == 1 and args.pp == 1 and not args.no_graphs:
        replay = graph_step_ms(engine, batches)
        for run, b in zip(runs, batches, strict=True):
            run["measured"]["graph_replay_s"] = replay[b] / 1e3
            say(
                f"batch {b:4d}: one graph replay {replay[b]:.2f} ms (GPU only) "
                f"vs step {run['measured']['tpot_s'] * 1e3:.2f} ms"
            )
    write_json(
        args.out,
        {
            "format": "trellis-bench/1",
            "card": info,
            "copy_bytes_per_s": bw,
            "weight_bytes": weight_bytes,
            "runs": runs,
        },
    )
    engine.close()


if __name__ == "__main__":
    main()
