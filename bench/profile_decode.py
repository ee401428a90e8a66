"""Where a decode step's GPU time goes: kernel time by kernel, from the profiler (eager steps).

python bench/profile_decode.py --preset llama-3-8b --batch 1
"""

from __future__ import annotations

import argparse
import random
from collections import defaultdict

import torch
from gpu_common import say

from trellis.core.engine_config import EngineConfig
from trellis.core.sampling import SamplingParams
from trellis.engine import Engine, EngineArgs


def kernel_times(engine: Engine, prompts: list[list[int]], n: int) -> dict[str, list[float]]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        engine.generate(prompts, SamplingParams(max_tokens=n, ignore_eos=True))
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            t = totals[ev.name[:90]]
            t[0] += ev.device_time_total
            t[1] += 1
    return totals


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-3-8b")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--steps", type=int, default=16)
    args = ap.parse_args()
    engine = Engine(
        EngineArgs(
            preset=args.preset,
            device="cuda",
            dtype="bfloat16",
            max_model_len=1024,
            engine=EngineConfig(max_num_seqs=128, cuda_graphs=False, enable_prefix_caching=False),
        )
    )
    rng = random.Random(0)
    for b in [int(x) for x in args.batches.split(",")]:
        prompts = [[rng.randrange(32000) for _ in range(512)] for _ in range(b)]
        engine.generate(prompts, SamplingParams(max_tokens=4, ignore_eos=True))
        # Kernel time of (prefill + steps decodes) minus that of the prefill alone.
        prefill = kernel_times(engine, prompts, 1)
        both = kernel_times(engine, prompts, 1 + args.steps)
        totals = {
            k: [v[0] - prefill.get(k, [0, 0])[0], v[1] - prefill.get(k, [0, 0])[1]] for k, v in both.items()
        }
        decode_steps = args.steps
        say(f"batch {b}: GPU kernel time per decode step (eager steps; graphs remove the gaps)")
        grand = sum(v[0] for v in totals.values())
        for name, (us, n) in sorted(totals.items(), key=lambda kv: -kv[1][0])[:22]:
            print(f"  {us / decode_steps:9.1f} us/step  {n / decode_steps:6.1f} calls/step  {name}")
        print(f"  total {grand / decode_steps:9.1f} us/step")
    engine.close()


if __name__ == "__main__":
    main()
