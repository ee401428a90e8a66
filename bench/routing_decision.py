"""The cost of one KV-aware routing decision for an 8k-token prompt (512 block names).

    .venv/bin/python bench/routing_decision.py [--redis redis://HOST:PORT/DB] [--iters 2000]

For 2 and 8 replicas, against the embedded registry and a real redis-server (one started on a free
port unless --redis is given): p50 / p99 of the whole decision (the prompt's block names, the
index's leading runs, the estimate per replica, the speculative record), of the block names alone,
and of the decision given the names (the locator call plus the choice). Replica i holds the first
i/n of the prompt; a store holds half on its host tier and all of it on disk. JSON to
bench/results/routing_decision.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trellis.core.kv_names import KVFingerprint
from trellis.registry import EmbeddedRegistry, RedisRegistry, Registry, ReplicaLoad
from trellis.routing.kv_aware import KVAwarePolicy

FP = KVFingerprint("bench-model", "bfloat16", 8, 128, 32, "theta=500000.0;scaling=none", 16)
PROMPT_TOKENS = 8192
OUT = Path(__file__).resolve().parent / "results" / "routing_decision.json"


@dataclass
class Cand:
    name: str
    outstanding: int = 0
    reported: ReplicaLoad | None = None
    kv_canary: int = 0

    @property
    def load(self) -> int:
        return self.outstanding


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def summary(xs: list[float]) -> dict[str, float]:
    ms = [x * 1e3 for x in xs]
    return {
        "p50_ms": round(pct(ms, 0.5), 4),
        "p99_ms": round(pct(ms, 0.99), 4),
        "mean_ms": round(statistics.fmean(ms), 4),
    }


async def populate(reg: Registry, hashes: list[int], n: int) -> list[Cand]:
    for i in range(n):
        await reg.add_blocks(f"r{i}@inst{i}", hashes[: len(hashes) * i // n])
    await reg.add_blocks("kv_store:kv0@s:host", hashes[: len(hashes) // 2])
    await reg.add_blocks("kv_store:kv0@s:disk", hashes)
    return [Cand(f"r{i}", outstanding=i % 3, kv_canary=FP.canary()) for i in range(n)]


async def measure(reg: Registry, n: int, iters: int) -> dict[str, Any]:
    prompt = tuple((7 * i + 3) % 50000 for i in range(PROMPT_TOKENS))
    hashes = FP.block_hashes(prompt)
    reps = await populate(reg, hashes, n)
    policy = KVAwarePolicy(reg, FP, speculative_ttl_s=2.0, locator_timeout_s=1.0)
    for _ in range(50):  # warm up (and load the script)
        await policy(reps, prompt)
    whole, names, given = [], [], []
    for _ in range(iters):
        t0 = time.perf_counter()
        await policy(reps, prompt)
        t1 = time.perf_counter()
        FP.block_hashes(prompt)
        t2 = time.perf_counter()
        whole.append(t1 - t0)
        names.append(t2 - t1)
        given.append(max(0.0, (t1 - t0) - (t2 - t1)))
    runs = await reg.leading_runs(hashes)
    return {
        "replicas": n,
        "blocks": len(hashes),
        "locations": len(runs),
        "decision": summary(whole),
        "block_names": summary(names),
        "decision_given_names": summary(given),
    }


async def run(redis_url: str, iters: int) -> list[dict[str, Any]]:
    out = []
    for n in (2, 8):
        emb = EmbeddedRegistry()
        out.append({"backend": "embedded", **await measure(emb, n, iters)})
        await emb.close()
        red = RedisRegistry(redis_url, namespace=f"bench-{uuid.uuid4().hex[:8]}")
        try:
            out.append({"backend": "redis", **await measure(red, n, max(200, iters // 2))})
        finally:
            await red.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--redis", help="a redis-server to use (default: start one on a free port)")
    ap.add_argument("--iters", type=int, default=2000)
    args = ap.parse_args()
    server = None
    url = args.redis
    if url is None:
        from tests.redis_server import RedisServer

        server = RedisServer().start()
        url = server.url
    try:
        results = asyncio.run(run(url, args.iters))
    finally:
        if server is not None:
            server.stop()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"prompt_tokens": PROMPT_TOKENS, "results": results}, indent=2) + "\n")
    for r in results:
        d, h, g = r["decision"], r["block_names"], r["decision_given_names"]
        print(
            f"{r['backend']:8} {r['replicas']} replicas: decision p50 {d['p50_ms']:.3f} ms"
            f" p99 {d['p99_ms']:.3f} ms | names p50 {h['p50_ms']:.3f} ms"
            f" | given names p50 {g['p50_ms']:.3f} ms p99 {g['p99_ms']:.3f} ms"
        )
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
