"""Turn the GPU runs of every card (bench/results/h200/, bench/results/h100/, as bench/report_cards.py
lists them) into: one trellis-bench/1 file per configuration read from a log (a run that died before
writing its JSON), summary.json, the calibration file the planner reads (bench/calibration.json,
report_calibration.py: each card's software constants fitted on its own one-GPU 8B runs), the
planner's predictions beside every run (planner_validation.txt), plots, and the markdown rows of
bench/RESULTS.md. Each card is reported from its own files; a later run not there yet is skipped
with one printed line.

    python bench/report_gpu.py      (no GPU needed: it reads what the GPU runs left)
"""

from __future__ import annotations

import json
from typing import Any

from report_calibration import PATH as CALIBRATION
from report_calibration import write_calibration
from report_cards import CARDS, Loaded, load, roofline_tpot
from report_plots import plot_allreduce, plot_decode

from trellis.planner.calibration import parse_calibration
from trellis.planner.validate import parse_results, validation_table

# Pipeline figures some runs carry (gpu_decode.py with PP): passed through to the summary.
PASSED_THROUGH = ("bubble", "stage_busy_s")


def summary_rows(data: Loaded) -> list[tuple[dict[str, Any], str]]:
    """Each run's summary.json row, and its configuration as the markdown table names it."""
    rows = []
    for name, run_file in data.runs.items():
        bw, gpus = run_file["copy_bytes_per_s"], run_file["card"]["count"]
        hf = data.baseline(gpus)
        hf_by_batch = {r["batch"]: r for r in hf["runs"]} if hf else {}
        for r in run_file["runs"]:
            c, m = r["config"], r["measured"]
            roof = roofline_tpot(c["model"], c["tp"], c["batch"], bw)
            base = hf_by_batch.get(c["batch"]) if c["model"] == "llama-3-8b" and c["tp"] == 1 else None
            row = {
                "file": name,
                "model": c["model"],
                "tp": c["tp"],
                "pp": c["pp"],
                "batch": c["batch"],
                "burst": c.get("decode_burst", 1),
                "gpus_on_machine": gpus,
                "tpot_ms": m["tpot_s"] * 1e3,
                "decode_tok_s": m["decode_tok_s"],
                "ttft_ms": m["ttft_s"] * 1e3,
                "roofline_tok_s": c["batch"] / roof,
                "fraction": roof / m["tpot_s"],
                "vs_transformers": m["decode_tok_s"] / base["decode_tok_s"] if base else None,
            }
            if c["pp"] > 1 and "max_in_flight" in c:
                row["in_flight"] = c["max_in_flight"]
            row |= {k: m[k] for k in PASSED_THROUGH if k in m}
            rows.append((row, config_label(c)))
    return rows


def config_label(c: dict[str, Any]) -> str:
    label = f"{c['model']} TP{c['tp']} PP{c['pp']} burst {c.get('decode_burst', 1)}"
    if c["pp"] > 1 and "max_in_flight" in c:
        label += f", {c['max_in_flight']} in flight"
    if c["tp"] > 1 and c.get("one_shot_max_bytes"):
        label += f", one-shot <= {c['one_shot_max_bytes'] >> 10} KB"
    return label


def print_decode_rows(label: str, rows: list[tuple[dict[str, Any], str]]) -> None:
    print(
        "| config | machine | batch | TPOT ms | decode tok/s | roofline tok/s | % roofline | x transformers |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r, cfg in rows:
        vs = f"{r['vs_transformers']:.1f}x" if r["vs_transformers"] else ""
        bubble = f" (bubble {100 * r['bubble']:.1f}%)" if "bubble" in r and r["pp"] > 1 else ""
        print(
            f"| {cfg} | {r['gpus_on_machine']}x {label} | {r['batch']} | {r['tpot_ms']:.2f}{bubble} | "
            f"{r['decode_tok_s']:.0f} | "
            f"{r['roofline_tok_s']:.0f} | {100 * r['fraction']:.1f}% | {vs} |"
        )


def print_other_rows(data: Loaded) -> None:
    """The transformers line, the mesh table, the all-reduce table and the UCX line."""
    for gpus, hf in sorted(data.hf.items()):
        steps = ", ".join(
            f"{r['tpot_s'] * 1e3:.1f} ms at batch {r['batch']} ({r['decode_tok_s']:.0f} tok/s)"
            for r in hf["runs"]
        )
        print(f"\ntransformers {hf['transformers']} generate, {gpus}x {data.card.label} machine: {steps}")
    if data.mesh is not None:
        engine = data.runs[data.card.plot[0][0]]  # every step, one GPU: the mesh's engine
        by_batch = {r["config"]["batch"]: r["measured"] for r in engine["runs"]}
        print("\n| batch | TTFT ms | TPOT ms | throughput tok/s (prefill included) | x engine throughput |")
        print("| --- | --- | --- | --- | --- |")
        for r in data.mesh["runs"]:
            b, m = r["config"]["batch"], r["measured"]
            vs = f"{m['throughput_tok_s'] / by_batch[b]['throughput_tok_s']:.2f}x" if b in by_batch else ""
            times = f"{m['ttft_s'] * 1e3:.1f} | {m['tpot_s'] * 1e3:.2f}"
            print(f"| {b} | {times} | {m['throughput_tok_s']:,.0f} | {vs} |")
    if data.allreduce:
        names = {
            "nccl_eager_us": "NCCL eager",
            "nccl_graph_us": "NCCL graph",
            "custom_graph_us": "one-shot graph",
        }
        cols = [(t["world"], key) for t in data.allreduce for key in names]
        print("\n| size | " + " | ".join(f"{n} GPUs {names[k]} us" for n, k in cols) + " |")
        print("| --- |" + " --- |" * len(cols))
        by_world = {t["world"]: {r["bytes"]: r for r in t["rows"]} for t in data.allreduce}
        for size in sorted({r["bytes"] for t in data.allreduce for r in t["rows"]}):
            cells = [by_world[n].get(size, {}).get(k) for n, k in cols]
            text = " | ".join("" if v is None else f"{v:.1f}" for v in cells)
            print(f"| {size >> 10} KB | {text} |")
    if data.ucx is not None:
        u = data.ucx
        rt = u["round_trip_us"]["16384"]
        ways = ", ".join(
            f"{int(s) >> 20} MB {us:.0f} us ({u['one_way_gb_s'][s]:.1f} GB/s)"
            for s, us in u["one_way_us"].items()
        )
        trip = f"16 KB round trip {rt['p50']:.0f} us p50 / {rt['p99']:.0f} us p99"
        print(f"\nUCX GPU{u['src_gpu']} -> GPU{u['dst_gpu']}: {trip}; one way {ways}")


def link_note(raw: dict[str, Any], preset: str, label: str) -> str:
    """Where a non-top-level card's all-reduce and UCX times come from."""
    link = raw["gpus"][preset].get("links", {}).get("nvlink")
    if link is None:
        return f"All-reduce and UCX times: the top-level table (no {label} all-reduce run here yet)."
    counts = sorted({p["gpus"] for p in link["allreduce"] if p.get("measured_here", True)})
    hop = f"from {link['ucx']['measured_on']}" if "measured_on" in link["ucx"] else f"measured on {label}"
    return (
        f"All-reduce: measured on {label} ({', '.join(map(str, counts))} GPUs; the 256 MB point is "
        f"from {link['allreduce'][-1].get('measured_on', label)}); UCX hop {hop}."
    )


def write_validation(data: Loaded) -> None:
    """`trellis plan --validate` of every engine run against the calibration just written."""
    card = data.card
    raw = json.loads(CALIBRATION.read_text())
    cal = parse_calibration(raw)
    names = {run.key: run.name for run in card.runs}
    fitted = ", ".join(names[k] for k in card.fit_on if k in data.runs)
    section = "" if card.top_level else f" (its {card.preset} section)"
    parts = [
        f"# trellis plan --validate, calibration bench/calibration.json{section}; its software constants "
        f"were fitted on {fitted}: every other run is out of sample.\n"
    ]
    if not card.top_level:
        parts[0] += f"# {link_note(raw, card.preset, card.label)}\n"
    for key, run_file in data.runs.items():
        parts.append(f"## {names[key]}\n{validation_table(parse_results(run_file, names[key]), cal)}")
    path = card.path / "planner_validation.txt"
    path.write_text("\n".join(parts))
    print(f"wrote {path}")


def main() -> None:
    cards = [load(card) for card in CARDS]
    for data in cards:
        for name, run_file in data.runs.items():
            if "source" in run_file:  # read from a log: its record, as the planner reads one
                (data.card.path / f"{name}.json").write_text(json.dumps(run_file, indent=1))
        rows = summary_rows(data)
        (data.card.path / "summary.json").write_text(json.dumps([r for r, _ in rows], indent=1))
        print(f"\n## {data.card.label} (bench/results/{data.card.dir})\n")
        print_decode_rows(data.card.label, rows)
        print_other_rows(data)
        print()
    write_calibration(cards)
    for data in cards:
        write_validation(data)
        plot_decode(data)
        plot_allreduce(data)


if __name__ == "__main__":
    main()
