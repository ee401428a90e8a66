"""Paged decode attention time against its split-K factor (Llama-3-8B shapes, bf16).

    python bench/attn_splits.py
"""

from __future__ import annotations

import torch
import triton

from services.stage_worker.model.paged_decode import paged_decode_attention


def main() -> None:
    hk, g, d, bs = 8, 4, 128, 16
    for batch, ctx in ((1, 576), (1, 4096), (8, 576), (64, 576), (128, 576)):
        blocks = batch * (ctx // bs + 1)
        k = torch.randn(blocks + 1, bs, hk, d, dtype=torch.bfloat16, device="cuda")
        v = torch.randn_like(k)
        q = torch.randn(batch, hk * g, d, dtype=torch.bfloat16, device="cuda")
        tables = torch.randperm(blocks, device="cuda", dtype=torch.int32)[: batch * (ctx // bs + 1)].view(batch, -1)
        lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
        kv_bytes = 2 * batch * ctx * hk * d * 2
        row = []
        for splits in (1, 2, 3, 4, 8, 16):
            ms = triton.testing.do_bench(lambda s=splits: paged_decode_attention(
                q, k, v, tables, lens, scale=d**-0.5, num_splits=s), warmup=20, rep=100, return_mode="median")
            row.append(f"s{splits}={ms * 1e3:6.1f}us")
        auto = triton.testing.do_bench(lambda: paged_decode_attention(q, k, v, tables, lens, scale=d**-0.5),
                                       warmup=20, rep=100, return_mode="median")
        print(f"B={batch:3d} ctx={ctx:5d} KV {kv_bytes / 1e6:7.1f} MB: " + " ".join(row)
              + f"  auto={auto * 1e3:6.1f}us ({kv_bytes / auto / 1e9:6.0f} GB/s)", flush=True)


if __name__ == "__main__":
    main()
