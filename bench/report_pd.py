"""The P/D plot: TTFT of P/D against colocated serving per prompt length, and the decode streams'
inter-token latency while long prompts arrive (p50 / p90 / p99), from bench/pd_mesh.py's JSON.

    python bench/report_pd.py bench/results/h200/pd_mesh_8b_1xh200.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after the backend is chosen

COLORS = {"pd": "tab:blue", "colocated": "tab:orange"}
LABELS = {"pd": "P/D (prefill r0 -> decode r1)", "colocated": "colocated (2 x both, least-load)"}


def main(path: str) -> None:
    data = json.loads(Path(path).read_text())
    runs = {r["kind"]: r for r in data["runs"]}
    fig, (ttft, itl) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.38
    for k, (kind, run) in enumerate(runs.items()):
        rows = run["ttft"]
        xs = [i + (k - 0.5) * width for i in range(len(rows))]
        ttft.bar(xs, [r["ttft_s"] * 1e3 for r in rows], width, label=LABELS[kind], color=COLORS[kind])
        ttft.set_xticks(range(len(rows)), [f"{r['prompt_tokens']}" for r in rows])
        q = run["interference"]
        values = [q["itl_p50_s"] * 1e3, q["itl_p90_s"] * 1e3, q["itl_p99_s"] * 1e3]
        bars = itl.bar([i + (k - 0.5) * width for i in range(3)], values, width, color=COLORS[kind])
        itl.bar_label(bars, fmt="%.0f", fontsize=8)
    ttft.set(xlabel="prompt tokens", ylabel="TTFT, warm median (ms)", title="TTFT: P/D vs colocated")
    ttft.legend(fontsize=8)
    first = next(iter(runs.values()))["interference"]
    itl.set_xticks(range(3), ["p50", "p90", "p99"])
    itl.set_yscale("log")
    itl.set(
        ylabel="decode inter-token gap (ms, log)",
        title=f"{first['streams']} decode streams while {first['arrivals']} prompts of "
        f"{first['long_prompt_tokens']} tokens arrive",
    )
    card = data.get("card", {}).get("name", "")
    fig.suptitle(f"Llama-3-8B shape, bf16, two processes on one {card}", fontsize=10)
    fig.tight_layout()
    out = Path(path).with_suffix(".png")
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1])
