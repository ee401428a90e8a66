"""``trellis plan --validate RESULTS...``: the model's predictions next to benchmark measurements.

A result file (JSON, format ``trellis-bench/1``) holds one run, or ``{"runs": [...]}`` several::

    {"format": "trellis-bench/1", "name": "70b-tp8-b32",
     "config": {"model": "llama-3-70b", "dtype": "bf16", "gpu": "h100-sxm", "nodes": 1, "gpus_per_node": 8,
                "tp": 8, "pp": 1, "dp": 1, "batch": 32, "prompt_len": 1024, "output_len": 256,
                "max_batched_tokens": 2048},
     "measured": {"decode_tok_s": 1580.0, "ttft_s": 0.41, "tpot_s": 0.0203}}

``batch`` requests per replica start together (a closed batch). ``ttft_s`` is their mean time to
first token, ``tpot_s`` the mean gap between a request's consecutive tokens once every request has
its first token (steady decoding), ``decode_tok_s`` the output tokens per second of the whole
deployment while they decode (dp x batch / tpot). Any measured figure may be left out. The engine
settings ``max_batched_tokens`` (default 2048), ``decode_burst`` (1), ``one_shot_max_bytes`` (0)
and ``max_in_flight`` (micro-batches in flight; default one per stage) are optional. The
prediction replays the same batch through the simulator, every request arriving at once, and
takes the same steady TPOT from it. With PP > 1 it also gives the pipeline bubble over the run,
as the engine measures it (``measured.bubble``): 1 - sum(stage busy) / (stages x wall), the wall
from submission to the last token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trellis.planner.calibration import Calibration
from trellis.planner.cost import ReplicaCost, replica_cost
from trellis.planner.errors import PlanError
from trellis.planner.hardware import cluster_from_args
from trellis.planner.layout import Layout, split_layers
from trellis.planner.machine import machine_for
from trellis.planner.memory import Budget, replica_memory
from trellis.planner.model import DTYPE_BYTES, load_model
from trellis.planner.report import table
from trellis.planner.simulator import SimConfig, simulate
from trellis.planner.workload import Lengths, Workload, sample_requests

RESULT_FORMAT = "trellis-bench/1"
METRICS = ("decode_tok_s", "ttft_s", "tpot_s")


@dataclass(frozen=True)
class BenchRun:
    name: str
    config: dict[str, Any]
    measured: dict[str, float]


def load_results(paths: list[str]) -> list[BenchRun]:
    runs = []
    for path in paths:
        try:
            raw = json.loads(Path(path).read_text())
        except OSError as e:
            raise PlanError(f"{path}: cannot read the result ({e.strerror})") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PlanError(f"{path}: not valid JSON ({e})") from None
        runs += parse_results(raw, path)
    return runs


def parse_results(raw: Any, where: str = "results") -> list[BenchRun]:
    """The runs of one result file's JSON: one run, or ``{"runs": [...]}``."""
    items = raw.get("runs") if isinstance(raw, dict) and "runs" in raw else [raw]
    if not isinstance(items, list):
        raise PlanError(f"{where}.runs: expected a list of runs")
    default_format = raw.get("format") if isinstance(raw, dict) else None
    return [
        _run(where + (f".runs[{i}]" if len(items) > 1 else ""), item, default_format)
        for i, item in enumerate(items)
    ]


def _run(where: str, raw: Any, default_format: str | None) -> BenchRun:
    if not isinstance(raw, dict):
        raise PlanError(f"{where}: expected a JSON object")
    if raw.get("format", default_format) != RESULT_FORMAT:
        raise PlanError(
            f"{where}.format: expected {RESULT_FORMAT!r}, got {raw.get('format', default_format)!r}"
        )
    config, measured = raw.get("config"), raw.get("measured", {})
    if not isinstance(config, dict):
        raise PlanError(f"{where}.config: expected an object")
    for key in ("model", "gpu", "tp", "pp", "dp", "batch", "prompt_len", "output_len"):
        if key not in config:
            raise PlanError(f"{where}.config.{key}: required")
    for key in ("tp", "pp", "dp", "batch", "prompt_len", "output_len", "max_in_flight"):
        if key == "max_in_flight" and config.get(key) is None:
            continue  # optional: one micro-batch per stage
        v = config[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise PlanError(f"{where}.config.{key}: expected an integer >= 1, got {v!r}")
    if not isinstance(measured, dict) or not all(
        isinstance(measured.get(k, 0.0), int | float) for k in METRICS
    ):
        raise PlanError(f"{where}.measured: expected numbers for {', '.join(METRICS)}")
    # Figures beyond METRICS (e.g. graph_replay_s, which the calibration fits read) are kept too.
    numbers = {
        k: float(v) for k, v in measured.items() if isinstance(v, int | float) and not isinstance(v, bool)
    }
    return BenchRun(str(raw.get("name", where)), config, numbers)


def run_cost(run: BenchRun, calibration: Calibration) -> tuple[ReplicaCost, SimConfig]:
    """The run's replica as the planner costs it, and the simulator settings that replay its batch."""
    cfg = run.config
    model = load_model(str(cfg["model"]))
    dtype = str(cfg.get("dtype", "bf16"))
    if dtype not in DTYPE_BYTES:
        raise PlanError(f"{run.name}.config.dtype: must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
    per_node = int(cfg.get("gpus_per_node", cfg["tp"] * cfg["pp"] * cfg["dp"]))
    cluster = cluster_from_args(str(cfg["gpu"]), int(cfg.get("nodes", 1)), per_node)
    tp, pp, dp, batch = cfg["tp"], cfg["pp"], cfg["dp"], cfg["batch"]
    prompt, output = cfg["prompt_len"], cfg["output_len"]
    problem = model.tp_problem(tp)
    if problem or pp > model.layers:
        raise PlanError(f"{run.name}: {problem or f'PP {pp} exceeds the {model.layers} layers'}")
    layout = Layout(tp, pp, dp, per_node, split_layers(model.layers, pp))
    tokens = int(cfg.get("max_batched_tokens") or 2048)
    budget = Budget(
        cluster.gpu.memory_bytes,
        float(cfg.get("gpu_memory_utilization", 0.85)),
        dtype,
        2,
        tokens,
        batch,
        prompt + output,
    )
    mem = replica_memory(model, layout, budget)
    cost = replica_cost(
        model,
        layout,
        machine_for(cluster, calibration),
        dtype,
        2,
        decode_burst=int(cfg.get("decode_burst") or 1),
        one_shot_max_bytes=int(cfg.get("one_shot_max_bytes") or 0),
    )
    # The run did hold the batch, so KV room is at least what the batch needed.
    kv_room = max(mem.kv_tokens, batch * (prompt + output))
    return cost, SimConfig(1, kv_room, batch, tokens, max_in_flight=int(cfg.get("max_in_flight") or 0))


def predict(run: BenchRun, calibration: Calibration) -> dict[str, float]:
    cfg = run.config
    dp, batch, output = cfg["dp"], cfg["batch"], cfg["output_len"]
    cost, sim_config = run_cost(run, calibration)
    workload = Workload(Lengths("fixed", cfg["prompt_len"]), Lengths("fixed", output))
    sim = simulate(cost, sim_config, sample_requests(workload, batch, seed=0), gaps=True)
    # The benchmarks' TPOT: the mean gap once every request has its first token (bench/gpu_common.py).
    tpot = sim.steady_tpot if output > 1 else 0.0
    return {
        "ttft_s": float(sim.ttft.mean()),
        "tpot_s": tpot,
        "decode_tok_s": dp * batch / tpot if tpot else 0.0,
        "bubble": sim.bubble,
    }


def validation_table(runs: list[BenchRun], calibration: Calibration) -> str:
    rows = []
    for run in runs:
        pred = predict(run, calibration)
        c = run.config
        label = f"{c['model']} {c['gpu']} TP {c['tp']} x PP {c['pp']} x DP {c['dp']}, batch {c['batch']}"
        for metric in METRICS + (("bubble",) if c["pp"] > 1 else ()):
            got = run.measured.get(metric)
            err = f"{(pred[metric] - got) / got:+.0%}" if got else "-"
            rows.append(
                [run.name, label, metric, f"{pred[metric]:.4g}", "-" if got is None else f"{got:.4g}", err]
            )
    return table(["run", "configuration", "metric", "predicted", "measured", "error"], rows) + "\n"
