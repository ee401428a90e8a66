"""Sessions that repeat a long prefix, across 2 replicas: kv-aware routing against least-load.

    python bench/kv_routing_sessions.py --out bench/results/kv_routing_sessions_cpu.json \
        --plot bench/results/kv_routing_sessions_cpu.png [--sessions 16 --turns 4 --prefix 2048]

A mesh of real processes on this host (router + 2 replicas, embedded registry, no KV store, so a
hit is a replica's own prefix cache): `sessions` sessions, each a prefix of `prefix` tokens of its
own, run `turns` rounds; in each round every session sends one request at once (its prefix plus a
short tail; the sessions in a random order each round), so 16 x 4 = 64 requests. Per policy: TTFT
of every request (first streamed token), how often a session moved replica, and the hit rate:
prompt tokens served from a prefix cache over the reusable ones (every turn after a session's first
reuses its prefix's full blocks). The model is a random Llama made here, wide
enough that a 2k-token prefill costs real time on a CPU.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.mesh_fixtures import StreamReader, head_address, running_mesh, stage_stats
from trellis.core.engine_config import EngineConfig
from trellis.deploy.local_spec import local_spec
from trellis.wire.router_client import RouterClient


def make_model(path: Path, positions: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=1000,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=positions,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def router_counter(port: int, name: str) -> float:
    """The sum of a counter over its labels on the router's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def run_policy(model: Path, policy: str, args: argparse.Namespace) -> dict[str, Any]:
    blocks = 2 * args.sessions * (args.prefix // 16 + 4)  # room for every session's prefix, twice
    spec = local_spec(
        str(model),
        replicas=2,
        router_policy=policy,
        engine=EngineConfig(num_blocks=blocks, max_num_batched_tokens=args.prefix + 64),
        metrics=True,
    )
    rng = random.Random(1)
    prefixes = [[rng.randrange(2, 1000) for _ in range(args.prefix)] for _ in range(args.sessions)]
    ttfts: list[float] = []
    placed: list[dict[int, str]] = []  # per round: session -> the replica that served it
    with running_mesh(spec) as mesh, RouterClient(mesh.router.address) as client:
        hits_before = sum(stage_stats(head_address(mesh, r)).prefix_hit_tokens for r in ("r0", "r1"))
        for turn in range(args.turns):
            order = list(range(args.sessions))
            rng.shuffle(order)  # sessions do not arrive in the same order every round
            started = time.monotonic()
            readers = [
                StreamReader(
                    client.stream(
                        prefixes[i] + [rng.randrange(2, 1000) for _ in range(8)], max_tokens=4, timeout=600
                    )
                )
                for i in order
            ]
            firsts = []
            for r in readers:
                assert r.first.wait(600), "no first token"
                firsts.append(time.monotonic() - started)
                r.join(600)
            ttfts.extend(firsts)
            placed.append({i: r.result.replica for i, r in zip(order, readers, strict=True)})
            print(
                f"[bench] {policy} turn {turn}: mean TTFT {statistics.mean(firsts) * 1e3:.0f} ms", flush=True
            )
        hits = sum(stage_stats(head_address(mesh, r)).prefix_hit_tokens for r in ("r0", "r1")) - hits_before
        predicted = router_counter(spec.router.metrics_port, "trellis_router_kv_predicted_hit_blocks_total")
    reusable = args.sessions * (args.turns - 1) * (args.prefix // 16) * 16
    later = ttfts[args.sessions :]  # the turns that could hit
    return {
        "policy": policy,
        "ttft_mean_s": statistics.mean(ttfts),
        "ttft_mean_reuse_turns_s": statistics.mean(later),
        "ttft_p50_s": statistics.median(ttfts),
        "hit_tokens": hits,
        "reusable_tokens": reusable,
        "hit_rate": hits / reusable,
        "predicted_hit_blocks": predicted,  # the router's (kv-aware only), over every request
        "actual_hit_blocks": hits // 16,
        "index_accuracy": (hits // 16) / predicted if predicted else None,
        "ttfts_s": ttfts,
        "moves": sum(a[i] != b[i] for a, b in itertools.pairwise(placed) for i in a),  # changed replica
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=16)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--prefix", type=int, default=2048)
    ap.add_argument("--out", required=True)
    ap.add_argument("--plot")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = make_model(Path(tmp) / "model", args.prefix + 256)
        rows = [run_policy(model, p, args) for p in ("kv-aware", "least-load")]
    kv, ll = rows
    data = {
        "command": " ".join(sys.argv),
        "card": "cpu",
        "sessions": args.sessions,
        "turns": args.turns,
        "prefix_tokens": args.prefix,
        "rows": rows,
        "kv_aware_mean_ttft_vs_least_load": kv["ttft_mean_s"] / ll["ttft_mean_s"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(data, indent=1))
    print(
        f"[bench] hit rate kv-aware {kv['hit_rate']:.1%}, least-load {ll['hit_rate']:.1%}; mean TTFT "
        f"{kv['ttft_mean_s'] * 1e3:.0f} vs {ll['ttft_mean_s'] * 1e3:.0f} ms "
        f"({data['kv_aware_mean_ttft_vs_least_load']:.0%}); wrote {args.out}"
    )
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for r in rows:
            ax.plot(
                sorted(t * 1e3 for t in r["ttfts_s"]), label=f"{r['policy']} (hit rate {r['hit_rate']:.0%})"
            )
        ax.set_xlabel("request (sorted)")
        ax.set_ylabel("TTFT ms")
        ax.set_title(
            f"{args.sessions} sessions x {args.turns} turns, {args.prefix}-token prefixes, 2 replicas (CPU)"
        )
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)


if __name__ == "__main__":
    main()
