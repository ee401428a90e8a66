"""Fit the cost model's software constants to benchmark runs (``bench/report_gpu.py`` calls these).

Bytes, FLOPs and all-reduces come from the hardware figures; what is left of a measured time is
software, and each constant is fitted, by least squares in closed form, on the runs that isolate it:

* ``layer_graph_s``: a CUDA-graph replay of one decode step (``measured.graph_replay_s``, GPU time
  alone) minus the model's time for its bytes, FLOPs and all-reduces, per decoder layer.
* ``step_overhead_s`` + ``step_overhead_per_seq_s`` x batch: the measured TPOT minus the graph
  replay (moved to the mean context of the run), which is host time per plan; a decode burst of
  k steps pays it once per k steps.
* ``prefill_flops_per_s`` and ``layer_eager_s``: the mean TTFT of a closed batch is a sum of
  prefill steps (chunked by the step budget; the last request waits for every chunk before its
  own), each FLOPs / rate + layers x ``layer_eager_s`` + known terms, so it is linear in
  (1 / rate, ``layer_eager_s``) while the steps are compute-bound. The planner's own replay of
  each run gives the coefficients (replays at the estimate and one small step along each
  parameter), and the fit minimises the squared relative errors, re-linearising until the
  estimate stops moving.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from types import MappingProxyType

import numpy as np

from trellis.planner.calibration import Calibration, GpuCalibration
from trellis.planner.errors import PlanError
from trellis.planner.validate import BenchRun, predict, run_cost


@dataclass(frozen=True)
class Fit:
    value: float
    runs: int  # how many runs it was fitted on
    rms_error: float  # root mean square of the relative residuals left


def _replay_context(run: BenchRun) -> float:
    """A graph replayed after a run still holds its last step: every sequence at prompt + output - 1."""
    return run.config["prompt_len"] + run.config["output_len"] - 1.0


def _mean_context(run: BenchRun) -> float:
    """The mean context of the decode steps that TPOT averages over."""
    return run.config["prompt_len"] + run.config["output_len"] / 2


def _without_software(cal: Calibration) -> Calibration:
    return replace(cal, step_overhead_s=0.0, step_overhead_per_seq_s=0.0, layer_graph_s=0.0)


def _replayed(runs: list[BenchRun]) -> list[BenchRun]:
    out = [r for r in runs if "graph_replay_s" in r.measured]
    if any(r.config["tp"] * r.config["pp"] != 1 for r in out):
        raise PlanError("graph_replay_s is one GPU's replay: only TP 1 x PP 1 runs can carry it")
    if not out:
        raise PlanError("no run measured graph_replay_s")
    return out


def _decode_gpu_s(run: BenchRun, cal: Calibration, context: float) -> tuple[float, int]:
    """(model GPU time of one decode step of the whole batch at ``context``, layers)."""
    cost, _ = run_cost(run, cal)
    (stage,) = cost.stages
    b = run.config["batch"]
    t = stage.time(b, b * context, b * context, b, graph=True) - stage.host(b, graph=True)
    return t, stage.layers


def fit_layer_graph_s(runs: list[BenchRun], cal: Calibration) -> Fit:
    """Per-layer GPU time in a CUDA graph: replay = model(bytes, FLOPs) + layers x c, least squares."""
    base = _without_software(cal)
    rows = []
    for run in _replayed(runs):
        model, layers = _decode_gpu_s(run, base, _replay_context(run))
        rows.append((layers, run.measured["graph_replay_s"] - model, run.measured["graph_replay_s"]))
    c = sum(n * r for n, r, _ in rows) / sum(n * n for n, _, _ in rows)
    rms = float(np.sqrt(np.mean([((r - n * c) / m) ** 2 for n, r, m in rows])))
    return Fit(max(0.0, c), len(rows), rms)


def fit_host_overhead(runs: list[BenchRun], cal: Calibration) -> tuple[Fit, Fit]:
    """Host time per plan, a + s x batch, from TPOT - graph replay; with bursts of k, (a + s b) / k."""
    base = _without_software(cal)
    xs, ys, tpots = [], [], []
    for run in _replayed(runs):
        if "tpot_s" not in run.measured:
            continue
        b, burst = run.config["batch"], int(run.config.get("decode_burst") or 1)
        at_replay, _ = _decode_gpu_s(run, base, _replay_context(run))
        at_mean, _ = _decode_gpu_s(run, base, _mean_context(run))
        gpu = run.measured["graph_replay_s"] - (at_replay - at_mean)  # fewer KV bytes at the mean
        xs.append((1 / burst, b / burst))
        ys.append(run.measured["tpot_s"] - gpu)
        tpots.append(run.measured["tpot_s"])
    if len(ys) < 2:
        raise PlanError("the host overhead needs two runs with tpot_s and graph_replay_s")
    a, s = np.linalg.lstsq(np.array(xs), np.array(ys), rcond=None)[0]
    a, s = max(0.0, float(a)), max(0.0, float(s))
    resid = [(y - a * x0 - s * x1) / t for (x0, x1), y, t in zip(xs, ys, tpots, strict=True)]
    rms = float(np.sqrt(np.mean(np.square(resid))))
    return Fit(a, len(ys), rms), Fit(s, len(ys), rms)


def with_prefill(cal: Calibration, gpu: str, flops_per_s: float, layer_eager_s: float) -> Calibration:
    mine = cal.gpus.get(gpu, GpuCalibration())
    gpus = MappingProxyType({**cal.gpus, gpu: replace(mine, prefill_flops_per_s=flops_per_s)})
    return replace(cal, gpus=gpus, layer_eager_s=layer_eager_s)


def fit_prefill(runs: list[BenchRun], cal: Calibration, gpu: str) -> tuple[Fit, Fit]:
    """(prefill FLOP/s, per-layer eager time) from the mean TTFTs of closed batches on ``gpu``."""
    runs = [r for r in runs if "ttft_s" in r.measured and r.config["gpu"] == gpu]
    if len(runs) < 2:
        raise PlanError(f"the prefill rate needs two runs on {gpu} with ttft_s")
    measured = np.array([r.measured["ttft_s"] for r in runs])

    def ttft(u: float, c: float) -> np.ndarray:
        cal_uc = with_prefill(cal, gpu, 1 / u, c)
        return np.array([predict(r, cal_uc)["ttft_s"] for r in runs])

    # TTFT is linear in (u = 1 / rate, c) while every prompt step is compute-bound, piecewise so
    # where a small tail chunk turns memory-bound: re-linearise at each estimate (Gauss-Newton).
    u, c = 1 / 1e15, 1e-4
    for _ in range(20):
        base = ttft(u, c)
        per_u = (ttft(u * 1.001, c) - base) / (u * 0.001)
        per_c = (ttft(u, c + 1e-5) - base) / 1e-5
        const = base - per_u * u - per_c * c
        # Relative errors: (const + per_u u + per_c c) / measured - 1.
        a = np.stack([per_u, per_c], axis=1) / measured[:, None]
        target = 1 - const / measured
        new_u, new_c = np.linalg.lstsq(a, target, rcond=None)[0]
        if new_c < 0:  # no per-layer time shows: the rate alone
            new_c = 0.0
            new_u = float(np.dot(a[:, 0], target) / np.dot(a[:, 0], a[:, 0]))
        if new_u <= 0:
            raise PlanError("the TTFTs do not fit a positive prefill rate")
        done = abs(new_u - u) <= 1e-9 * u and abs(new_c - c) <= 1e-12
        u, c = float(new_u), float(new_c)
        if done:
            break
    else:
        raise PlanError("the prefill fit did not converge")
    rms = float(np.sqrt(np.mean(np.square(ttft(u, c) / measured - 1))))
    return Fit(1 / u, len(runs), rms), Fit(c, len(runs), rms)
