"""What users would otherwise pick: transformers `generate` on the same GPU, model shape and batch.

    python bench/hf_baseline.py --preset llama-3-8b --batches 1,8,64 --prompt-len 512 --out FILE

Random weights in bf16 (the same shape as Trellis's dummy weights), greedy. Time per decode step =
(time of generate with 1 + N new tokens - time with 1 new token) / N, the median of --repeats
such pairs after a full-length warm-up (one pair alone was seen to be off by 50% at batch 1).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from gpu_common import card, say, write_json
from transformers import AutoConfig, AutoModelForCausalLM

from trellis.core.presets import model_config


def timed_generate(model, ids: torch.Tensor, new: int) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    model.generate(
        ids,
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        attention_mask=torch.ones_like(ids),
        pad_token_id=0,
    )
    torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-3-8b")
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    info = card()
    raw = model_config(args.preset)
    cfg = AutoConfig.for_model(**{k: v for k, v in raw.items() if k not in ("architectures",)})
    say(f"building {args.preset} in transformers on {info['name']} (random bf16 weights)")
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16).eval()
    runs = []
    for b in [int(x) for x in args.batches.split(",")]:
        ids = torch.randint(0, cfg.vocab_size, (b, args.prompt_len), device="cuda")
        timed_generate(model, ids, 1 + args.steps)  # warm-up: every kernel and cache size seen once
        pairs = [
            (timed_generate(model, ids, 1), timed_generate(model, ids, 1 + args.steps))
            for _ in range(args.repeats)
        ]
        one = statistics.median(p[0] for p in pairs)
        step = statistics.median((many - first) / args.steps for first, many in pairs)
        runs.append(
            {"batch": b, "ttft_s": one, "tpot_s": step, "decode_tok_s": b / step, "repeats": args.repeats}
        )
        say(
            f"transformers batch {b:4d}: prefill+1 {one * 1e3:8.1f} ms  step {step * 1e3:7.2f} ms  "
            f"{b / step:8.1f} tok/s"
        )
    import transformers

    write_json(
        args.out,
        {
            "card": info,
            "transformers": transformers.__version__,
            "preset": args.preset,
            "prompt_len": args.prompt_len,
            "runs": runs,
        },
    )


if __name__ == "__main__":
    main()
