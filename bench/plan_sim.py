"""Planner and simulator at scale: Llama-3-70B on 8 to 1024 H100s, 100k requests through each plan.

Writes bench/results/plan_sim.json (plans, predictions, simulated percentiles, wall times) and
bench/results/plan_sim.png (simulator wall time against GPUs; TTFT and TPOT distributions at 1024).

    .venv/bin/python bench/plan_sim.py [--requests 100000] [--load 0.9]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import NullFormatter

from trellis.planner.calibration import default_calibration
from trellis.planner.hardware import cluster_from_args
from trellis.planner.model import load_model
from trellis.planner.replay import replay
from trellis.planner.search import PlanOptions, make_plan
from trellis.planner.workload import Workload, parse_lengths

RESULTS = Path(__file__).resolve().parent / "results"
NODES = (1, 8, 32, 128)  # x 8 H100 per node: 8 to 1024 GPUs


def run_one(nodes: int, requests: int, load: float, seed: int) -> tuple[dict[str, Any], Any]:
    model = load_model("llama-3-70b")
    workload = Workload(
        parse_lengths("lognormal:1024:0.6", "prompt", model.max_len),
        parse_lengths("lognormal:256:0.6", "output", model.max_len),
    )
    t0 = time.perf_counter()
    plan = make_plan(
        model, cluster_from_args("h100-sxm", nodes), workload, default_calibration(), PlanOptions()
    )
    plan_s = time.perf_counter() - t0
    best = plan.best
    assert best is not None
    rate = load * best.capacity
    sim = replay(plan, best, requests, seed=seed, rate=rate)
    s = sim.summary()
    row = {
        "gpus": nodes * 8, "layout": best.layout.label(), "layouts_considered": len(plan.candidates),
        "plan_wall_s": plan_s, "sim_wall_s": sim.wall_s, "requests": requests, "steps": sim.steps,
        "offered_req_s": rate,
        "predicted": {"capacity_req_s": best.capacity, "tpot_s": best.tpot_s, "tpot_p99_s": best.tpot_p99_s,
                      "ttft_mean_s": best.ttft_mean_s, "ttft_p99_s": best.ttft_p99_s},
        "simulated": s,
    }  # fmt: skip
    return row, sim


def plot(rows: list[dict[str, Any]], sim: Any, path: Path) -> None:
    plt.switch_backend("Agg")  # files only, no display
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    gpus = [r["gpus"] for r in rows]
    a.plot(gpus, [r["sim_wall_s"] for r in rows], "o-", label="simulate")
    a.plot(gpus, [r["plan_wall_s"] for r in rows], "s--", label="plan (search)")
    a.set_xscale("log", base=2)
    a.set_xticks(gpus, [str(g) for g in gpus])
    a.set_xlabel("H100 GPUs")
    a.set_ylabel("wall time, s (2-core CPU)")
    a.set_title(f"{rows[0]['requests']:,} requests, Llama-3-70B")
    a.legend()
    a.grid(alpha=0.3)
    for arr, name in ((sim.ttft * 1e3, "TTFT"), (sim.tpot * 1e3, "TPOT")):
        xs = np.sort(arr)
        b.plot(xs, np.arange(1, len(xs) + 1) / len(xs), label=name)
    b.set_xscale("log")
    b.xaxis.set_minor_formatter(NullFormatter())
    ticks = [10, 20, 50, 100, 200, 500, 1000, 2000]
    b.set_xticks(ticks, [str(t) for t in ticks])
    b.set_xlabel("ms")
    b.set_ylabel("fraction of requests")
    b.set_title(f"{rows[-1]['gpus']} GPUs: {rows[-1]['layout']}")
    b.legend()
    b.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--load", type=float, default=0.9, help="fraction of the plan's capacity offered")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows, last = [], None
    for nodes in NODES:
        row, last = run_one(nodes, args.requests, args.load, args.seed)
        rows.append(row)
        s = row["simulated"]
        print(
            f"{row['gpus']:5d} GPUs  {row['layout']:22s} plan {row['plan_wall_s']:.2f} s  "
            f"simulate {row['sim_wall_s']:.1f} s  {s['throughput_req_s']:.0f} req/s  "
            f"TTFT p99 {s['ttft_s']['p99'] * 1e3:.0f} ms  TPOT p99 {s['tpot_s']['p99'] * 1e3:.1f} ms"
        )
    host = {"cpus": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine()}
    doc = {"benchmark": "plan_sim", "model": "llama-3-70b", "gpu": "h100-sxm", "gpus_per_node": 8,
           "workload": {"prompt": "lognormal mean 1024, sigma 0.6", "output": "lognormal mean 256, sigma 0.6",
                        "load": args.load},
           "host": host, "runs": rows}  # fmt: skip
    (RESULTS / "plan_sim.json").write_text(json.dumps(doc, indent=2) + "\n")
    plot(rows, last, RESULTS / "plan_sim.png")
    print(f"wrote {RESULTS / 'plan_sim.json'} and {RESULTS / 'plan_sim.png'}")


if __name__ == "__main__":
    main()
