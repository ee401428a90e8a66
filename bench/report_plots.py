"""The plots of one card's runs: 8B decode on one GPU against transformers and the roofline, and
the all-reduce sweep."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from report_cards import Loaded, roofline_tpot


def plot_decode(data: Loaded) -> None:
    card = data.card
    fig, ax = plt.subplots(figsize=(7, 4.5))
    first = data.runs[card.plot[0][0]]
    for key, label in card.plot:
        runs = data.runs[key]["runs"]
        ax.plot(
            [r["config"]["batch"] for r in runs],
            [r["measured"]["decode_tok_s"] for r in runs],
            "o-",
            label=label,
        )
    bw = first["copy_bytes_per_s"]
    batches = [r["config"]["batch"] for r in first["runs"]]
    ax.plot(batches, [b / roofline_tpot("llama-3-8b", 1, b, bw) for b in batches], "k--", label="roofline")
    hf = data.hf.get(1)
    if hf is not None:
        ax.plot(
            [r["batch"] for r in hf["runs"]],
            [r["decode_tok_s"] for r in hf["runs"]],
            "s-",
            label=f"transformers {hf['transformers']} generate",
        )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="batch",
        ylabel="decode tokens/s",
        title=f"Llama-3-8B shape, bf16, one {card.label} (prompt 512, output 128)",
    )
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(card.path / f"decode_8b_1x{card.dir}.png", dpi=120)
    plt.close(fig)


def plot_allreduce(data: Loaded) -> None:
    if not data.allreduce:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for table in data.allreduce:
        rows, n = table["rows"], table["world"]
        x = [r["bytes"] / 1024 for r in rows]
        for key, style in (("nccl_eager_us", ":"), ("nccl_graph_us", "--"), ("custom_graph_us", "-")):
            if all(key in r for r in rows):
                label = f"{n} GPUs {key[:-3].replace('_', ' ')}"
                ax.plot(x, [r[key] for r in rows], style, marker="o", label=label)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="KB (bf16)",
        ylabel="microseconds",
        title=f"All-reduce on {data.card.label} (NVLink)",
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(data.card.path / f"allreduce_{data.card.dir}.png", dpi=120)
    plt.close(fig)
