"""bench/calibration.json from every card's runs: each GPU's copy rate, its all-reduce table and UCX
hop where measured, and its software constants fitted (trellis.planner.fit) on its one-GPU runs.

The top-level card's constants and link are the file's own (any GPU without a section of its own
reads them); every other card's go in its GPU section, which a plan for that GPU reads instead
(trellis.planner.calibration.Calibration.for_gpu).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from report_cards import Loaded

from trellis.planner import fit
from trellis.planner.calibration import parse_calibration
from trellis.planner.validate import parse_results

PATH = Path(__file__).parent / "calibration.json"
# 256 MB over 2 x H200 at 300 GB/s bus bandwidth, measured before these runs (the defaults'
# figure); the sweeps stop at 1 MB, where latency still dominates. Both cards have the same
# NVLink 4 (450 GB/s a direction), so an H100 table borrows it too, marked as such.
LARGE_ALLREDUCE = {"bytes": 256 << 20, "gpus": 2, "eager_s": (256 << 20) / 300e9, "measured_here": False}
# Not measured in these runs: the figure measured earlier on 2 x H200 (64 MB at 332 GB/s).
NCCL_SEND = {"bytes": 67108864, "seconds": 67108864 / 332e9, "measured_here": False}


def allreduce_point(r: dict[str, Any]) -> dict[str, Any]:
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


def ucx_figures(ucx: dict[str, Any]) -> dict[str, Any]:
    return {
        "small_bytes": 16384,
        "small_round_trip_s": ucx["round_trip_us"]["16384"]["p50"] / 1e6,
        "large_bytes": 67108864,
        "large_one_way_s": ucx["one_way_us"]["67108864"] / 1e6,
    }


def link_section(data: Loaded, lender: tuple[str, dict[str, Any]] | None) -> dict[str, Any] | None:
    """The card's NVLink: its all-reduce tables and UCX hop; None while no table was measured.
    What it did not measure (the large all-reduce, the NCCL send, a missing UCX run) is borrowed
    from ``lender`` (the top-level card's GPU and UCX figures), and marked so."""
    card = data.card
    if not data.allreduce:
        return None
    borrowed = {"measured_on": lender[0]} if lender else {}
    if data.ucx is not None:
        hop = ucx_figures(data.ucx)
    elif lender is not None:
        hop = {**lender[1], "measured_here": False, **borrowed}
    else:
        raise SystemExit(f"{card.dir}: all-reduce tables but no UCX run to complete the link")
    return {
        "gpu": card.preset,
        "allreduce": [allreduce_point(r) for t in data.allreduce for r in t["rows"]]
        + [{**LARGE_ALLREDUCE, **borrowed}],
        "nccl_send": {**NCCL_SEND, **borrowed},
        "ucx": hop,
    }


def fit_software(cal: dict[str, Any], data: Loaded) -> dict[str, Any]:
    """The card's prefill rate and software constants, each fitted on its one-GPU runs
    (trellis.planner.fit says how), and a note of what they were fitted on."""
    card, files = data.card, data.runs
    names = {run.key: run.name for run in card.runs}
    used = [key for key in card.fit_on if key in files]
    runs = [r for key in used for r in parse_results(files[key], names[key])]
    parsed = parse_calibration(cal).for_gpu(card.preset)
    layer = fit.fit_layer_graph_s(runs, parsed)
    fixed, per_seq = fit.fit_host_overhead(runs, parsed)
    parsed = replace(
        parsed, layer_graph_s=layer.value, step_overhead_s=fixed.value, step_overhead_per_seq_s=per_seq.value
    )
    rate, eager = fit.fit_prefill(runs, parsed, card.preset)
    fits = {
        "layer_graph_s": layer,
        "step_overhead_s": fixed,
        "step_overhead_per_seq_s": per_seq,
        "prefill_flops_per_s": rate,
        "layer_eager_s": eager,
    }
    for key, f in fits.items():
        err = f"rms relative error {f.rms_error:.1%}"
        print(f"{card.label}: fitted {key} = {f.value:.4g} on {f.runs} runs ({err})")
    return {
        **{key: f.value for key, f in fits.items()},
        "fitted_on": {
            "runs": {f"{names[key]}.json": len(files[key]["runs"]) for key in used},
            "rms_relative_error": {k: round(f.rms_error, 4) for k, f in fits.items()},
        },
    }


# The order the constants are written in (the first card's at the top level, as before).
CONSTANTS = ("layer_graph_s", "step_overhead_s", "step_overhead_per_seq_s", "layer_eager_s", "fitted_on")


def write_calibration(cards: list[Loaded]) -> None:
    """``cards``: the top-level card first."""
    top = cards[0]
    assert top.card.top_level and not any(c.card.top_level for c in cards[1:])
    top_link = link_section(top, None)
    if top_link is None:
        raise SystemExit(f"{top.card.dir}: the top-level card needs its all-reduce tables")
    cal: dict[str, Any] = {
        "format": "trellis-calibration/1",
        "source": "bench/report_gpu.py from " + " and ".join(c.card.source for c in cards),
        # The copy rate the first fitted run measured beside its sweep.
        "gpus": {
            c.card.preset: {"hbm_copy_bytes_per_s": c.runs[c.card.fit_on[0]]["copy_bytes_per_s"]}
            for c in cards
        },
        "links": {"nvlink": top_link},
    }
    for data in cards:
        fitted = fit_software(cal, data)
        section = cal["gpus"][data.card.preset]
        section["prefill_flops_per_s"] = fitted["prefill_flops_per_s"]
        link = None if data.card.top_level else link_section(data, (top.card.preset, top_link["ucx"]))
        if link is not None:
            section["links"] = {"nvlink": link}
        own = cal if data.card.top_level else section
        own.update({key: fitted[key] for key in CONSTANTS})
    PATH.write_text(json.dumps(cal, indent=1) + "\n")
    print(f"wrote {PATH}")
