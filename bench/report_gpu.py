"""Turn the GPU runs under bench/results/h200/ into: one trellis-bench/1 file per configuration
(parsing the run logs where a run died before writing its JSON), the calibration file the planner
reads (bench/calibration.json, its software constants fitted to the one-GPU 8B runs by
trellis.planner.fit), the planner's predictions beside every run (planner_validation.txt), plots,
and the markdown rows of bench/RESULTS.md.

    python bench/report_gpu.py      (no GPU needed: it reads what the GPU runs left)
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from gpu_common import bench_record

from trellis.planner import fit
from trellis.planner.calibration import parse_calibration
from trellis.planner.model import load_model
from trellis.planner.validate import parse_results, validation_table

RESULTS = Path(__file__).parent / "results" / "h200"
LINE = re.compile(
    r"batch\s+(\d+): TTFT\s+([\d.]+) ms\s+TPOT\s+([\d.]+) ms\s+decode\s+([\d.]+) tok/s.*"
    r"throughput\s+([\d.]+) tok/s"
)
COPY = re.compile(r"copy ([\d.]+) TB/s")


def from_log(name: str, preset: str, tp: int, pp: int, burst: int, gpus: int, one_shot: int = 0) -> dict:
    """A run whose JSON was never written (its process teardown hung): its printed lines.
    ``one_shot`` is the run's --one-shot-max-bytes, which the log omits (bench/RESULTS.md: the 70B
    TP 4 runs used the one-shot kernel up to 64 KB)."""
    text = (RESULTS / f"{name}.log").read_text()
    bw = float(COPY.search(text).group(1)) * 1e12
    runs = []
    for m in LINE.finditer(text):
        b, ttft, tpot, _, thr = (float(x) for x in m.groups())
        args = SimpleNamespace(preset=preset, tp=tp, pp=pp, prompt_len=512, output_len=128)
        runs.append(
            bench_record(
                f"{preset}-tp{tp}-pp{pp}-b{int(b)}-burst{burst}",
                args,
                {"name": "NVIDIA H200", "count": gpus},
                int(b),
                ttft=ttft / 1e3,
                tpot=tpot / 1e3,
                throughput=thr,
                max_batched_tokens=8192,
                decode_burst=burst,
                **({"one_shot_max_bytes": one_shot} if one_shot else {}),
            )
        )
    return {
        "format": "trellis-bench/1",
        "card": {"name": "NVIDIA H200", "count": gpus},
        "copy_bytes_per_s": bw,
        "source": f"{name}.log",
        "runs": runs,
    }


def roofline_tpot(preset: str, tp: int, batch: int, bw: float) -> float:
    """All weights plus the batch's KV at its mean context (512 + 64), read at the copy rate,
    split over the TP GPUs of a stage; PP stages run one after another for a token."""
    shape = load_model(preset)
    return (shape.weight_bytes("bf16") + batch * 576 * shape.kv_bytes_per_token(2)) / (tp * bw)


# The engine runs that wrote their own JSON: key -> file stem under RESULTS.
WRITTEN = {
    "decode_8b_tp1_burst1": "decode_8b_tp1_burst1_1xh200",
    "decode_8b_tp1_burst8": "decode_8b_tp1_burst8_1xh200",
    "decode_8b_tp1_burst8_x4": "decode_8b_tp1_burst8_4xh200",
}


def main() -> None:
    files = {
        **{key: json.loads((RESULTS / f"{stem}.json").read_text()) for key, stem in WRITTEN.items()},
        "decode_8b_tp2_burst8_x4": from_log("tp2_nccl", "llama-3-8b", 2, 1, 8, 4),
        "decode_70b_tp4_burst8_x4": from_log("70b_tp4", "llama-3-70b", 4, 1, 8, 4, one_shot=65536),
        "decode_70b_tp2pp2_x4": from_log("70b_tp2pp2", "llama-3-70b", 2, 2, 1, 4),
    }
    for name, data in files.items():
        if "source" in data:
            (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=1))
    hf = json.loads((RESULTS / "hf_baseline_8b_1xh200.json").read_text())
    hf_by_batch = {r["batch"]: r for r in hf["runs"]}
    rows = []
    for name, data in files.items():
        bw = data["copy_bytes_per_s"]
        for r in data["runs"]:
            c, m = r["config"], r["measured"]
            roof = roofline_tpot(c["model"], c["tp"], c["batch"], bw)
            base = hf_by_batch.get(c["batch"]) if c["model"] == "llama-3-8b" and c["tp"] == 1 else None
            rows.append(
                {
                    "file": name,
                    "model": c["model"],
                    "tp": c["tp"],
                    "pp": c["pp"],
                    "batch": c["batch"],
                    "burst": c.get("decode_burst", 1),
                    "gpus_on_machine": data["card"]["count"],
                    "tpot_ms": m["tpot_s"] * 1e3,
                    "decode_tok_s": m["decode_tok_s"],
                    "ttft_ms": m["ttft_s"] * 1e3,
                    "roofline_tok_s": c["batch"] / roof,
                    "fraction": roof / m["tpot_s"],
                    "vs_transformers": m["decode_tok_s"] / base["decode_tok_s"] if base else None,
                }
            )
    (RESULTS / "summary.json").write_text(json.dumps(rows, indent=1))
    print(
        "| config | machine | batch | TPOT ms | decode tok/s | roofline tok/s | % roofline | x transformers |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        cfg = f"{r['model']} TP{r['tp']} PP{r['pp']} burst {r['burst']}"
        vs = f"{r['vs_transformers']:.1f}x" if r["vs_transformers"] else ""
        print(
            f"| {cfg} | {r['gpus_on_machine']}x H200 | {r['batch']} | {r['tpot_ms']:.2f} | "
            f"{r['decode_tok_s']:.0f} | "
            f"{r['roofline_tok_s']:.0f} | {100 * r['fraction']:.1f}% | {vs} |"
        )
    write_calibration(files)
    write_validation(files)
    plot_decode(files, hf)
    plot_allreduce()


# The runs the software constants are fitted on: one GPU, so no all-reduce or hop is in them; every
# other run (TP 2, TP 4, TP 2 x PP 2) is a prediction out of sample.
FIT_ON = ("decode_8b_tp1_burst1", "decode_8b_tp1_burst8", "decode_8b_tp1_burst8_x4")
# 256 MB over 2 x H200 at 300 GB/s bus bandwidth, measured before these runs (the defaults'
# figure); the sweeps above stop at 1 MB, where latency still dominates.
LARGE_ALLREDUCE = {"bytes": 256 << 20, "gpus": 2, "eager_s": (256 << 20) / 300e9, "measured_here": False}


def allreduce_point(r: dict) -> dict:
    """One size of the table: NCCL eager and in a graph, and the one-shot kernel where it was exact."""
    point = {
        "bytes": r["bytes"],
        "gpus": r["gpus"],
        "eager_s": r["nccl_eager_us"] / 1e6,
        "graph_s": r["nccl_graph_us"] / 1e6,
    }
    if r.get("custom_correct"):
        point["one_shot_eager_s"] = r["custom_eager_us"] / 1e6
        point["one_shot_graph_s"] = r["custom_graph_us"] / 1e6
    return point


def fit_software(cal: dict, files: dict) -> dict:
    """The software constants, each fitted on the one-GPU runs (trellis.planner.fit says how)."""
    runs = [r for name in FIT_ON for r in parse_results(files[name], name)]
    parsed = parse_calibration(cal)
    layer = fit.fit_layer_graph_s(runs, parsed)
    fixed, per_seq = fit.fit_host_overhead(runs, parsed)
    parsed = replace(
        parsed, layer_graph_s=layer.value, step_overhead_s=fixed.value, step_overhead_per_seq_s=per_seq.value
    )
    rate, eager = fit.fit_prefill(runs, parsed, "h200")
    fits = {
        "layer_graph_s": layer,
        "step_overhead_s": fixed,
        "step_overhead_per_seq_s": per_seq,
        "prefill_flops_per_s": rate,
        "layer_eager_s": eager,
    }
    for key, f in fits.items():
        print(f"fitted {key} = {f.value:.4g} on {f.runs} runs (rms relative error {f.rms_error:.1%})")
    cal["gpus"]["h200"]["prefill_flops_per_s"] = rate.value
    for key in ("layer_graph_s", "step_overhead_s", "step_overhead_per_seq_s", "layer_eager_s"):
        cal[key] = fits[key].value
    cal["fitted_on"] = {
        "runs": {f"{WRITTEN[name]}.json": len(files[name]["runs"]) for name in FIT_ON},
        "rms_relative_error": {k: round(f.rms_error, 4) for k, f in fits.items()},
    }
    return cal


def write_calibration(files: dict) -> None:
    ar2 = json.loads((RESULTS / "allreduce_2xh200.json").read_text())["rows"]
    ar4 = json.loads((RESULTS / "allreduce_4xh200.json").read_text())["rows"]
    ucx = json.loads((RESULTS / "ucx_handoff_4xh200.json").read_text())
    cal = {
        "format": "trellis-calibration/1",
        "source": "bench/report_gpu.py from bench/results/h200 (1x and 4x H200, NVLink, 2026-11-26)",
        "gpus": {"h200": {"hbm_copy_bytes_per_s": files["decode_8b_tp1_burst1"]["copy_bytes_per_s"]}},
        "links": {
            "nvlink": {
                "gpu": "h200",
                "allreduce": [allreduce_point(r) for r in ar2 + ar4] + [LARGE_ALLREDUCE],
                # Not measured in these runs: the figure measured earlier on 2 x H200 (64 MB at 332 GB/s).
                "nccl_send": {"bytes": 67108864, "seconds": 67108864 / 332e9, "measured_here": False},
                "ucx": {
                    "small_bytes": 16384,
                    "small_round_trip_s": ucx["round_trip_us"]["16384"]["p50"] / 1e6,
                    "large_bytes": 67108864,
                    "large_one_way_s": ucx["one_way_us"]["67108864"] / 1e6,
                },
            }
        },
    }
    path = Path(__file__).parent / "calibration.json"
    path.write_text(json.dumps(fit_software(cal, files), indent=1) + "\n")
    print(f"wrote {path}")


def write_validation(files: dict) -> None:
    """`trellis plan --validate` of every engine run against the calibration just written."""
    cal = parse_calibration(json.loads((Path(__file__).parent / "calibration.json").read_text()))
    parts = [
        f"# trellis plan --validate, calibration bench/calibration.json; its software constants were "
        f"fitted on {', '.join(WRITTEN[k] for k in FIT_ON)}: every other run is out of sample.\n"
    ]
    for name, data in files.items():
        stem = WRITTEN.get(name, name)
        parts.append(f"## {stem}\n{validation_table(parse_results(data, stem), cal)}")
    path = RESULTS / "planner_validation.txt"
    path.write_text("\n".join(parts))
    print(f"wrote {path}")


def plot_decode(files: dict, hf: dict) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    bw = files["decode_8b_tp1_burst1"]["copy_bytes_per_s"]
    for key, label in (
        ("decode_8b_tp1_burst1", "Trellis, every step"),
        ("decode_8b_tp1_burst8", "Trellis, bursts of 8"),
    ):
        runs = files[key]["runs"]
        ax.plot(
            [r["config"]["batch"] for r in runs],
            [r["measured"]["decode_tok_s"] for r in runs],
            "o-",
            label=label,
        )
    batches = [r["config"]["batch"] for r in files["decode_8b_tp1_burst1"]["runs"]]
    ax.plot(batches, [b / roofline_tpot("llama-3-8b", 1, b, bw) for b in batches], "k--", label="roofline")
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
        title="Llama-3-8B shape, bf16, one H200 (prompt 512, output 128)",
    )
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / "decode_8b_1xh200.png", dpi=120)


def plot_allreduce() -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for n in (2, 4):
        rows = json.loads((RESULTS / f"allreduce_{n}xh200.json").read_text())["rows"]
        x = [r["bytes"] / 1024 for r in rows]
        for key, style in (("nccl_eager_us", ":"), ("nccl_graph_us", "--"), ("custom_graph_us", "-")):
            ax.plot(
                x, [r[key] for r in rows], style, marker="o", label=f"{n} GPUs {key[:-3].replace('_', ' ')}"
            )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="KB (bf16)",
        ylabel="microseconds",
        title="All-reduce on H200 (NVLink)",
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / "allreduce_h200.png", dpi=120)


if __name__ == "__main__":
    main()
