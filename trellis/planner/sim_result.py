"""What a replay of a workload through a plan gives back: each request's times, and the statistics
the report prints (percentiles, the steady-state throughput, the benchmarks' steady TPOT)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class SimResult:
    arrival: np.ndarray
    first: np.ndarray  # time of the first token
    finish: np.ndarray
    prompt: np.ndarray
    output: np.ndarray
    makespan_s: float
    wall_s: float  # the simulator's own run time
    steps: int
    busy_fraction: float  # stage-time busy over stage-time available
    kv_peak_fraction: float
    gaps: np.ndarray | None = None  # rows (previous token, token, sequences) of each decode step
    stage_busy_s: tuple[float, ...] = ()  # busy seconds of each stage index, summed over the replicas

    @property
    def bubble(self) -> float:
        """The share of stage-time left idle over the makespan, as the engine reports its bubble:
        1 - sum(stage busy) / (stages x wall). For a batch submitted at once the makespan is the
        benchmarks' interval (submission to the last token)."""
        return 1.0 - self.busy_fraction

    @property
    def steady_tpot(self) -> float:
        """Mean gap between a sequence's consecutive tokens once every request has its first token,
        as the GPU benchmarks report TPOT (prompts of other requests no longer ride along).
        Needs ``simulate(..., gaps=True)``."""
        if self.gaps is None:
            raise ValueError("simulate(..., gaps=True) records the gaps")
        after = self.gaps[self.gaps[:, 0] >= self.first.max()]
        n = after[:, 2]
        return float((n * (after[:, 1] - after[:, 0])).sum() / n.sum()) if n.sum() else 0.0

    @property
    def ttft(self) -> np.ndarray:
        return self.first - self.arrival

    @property
    def tpot(self) -> np.ndarray:
        many = self.output > 1
        return (self.finish[many] - self.first[many]) / (self.output[many] - 1)

    def summary(self) -> dict[str, Any]:
        ttft, tpot = self.ttft, self.tpot

        def pct(a: np.ndarray) -> dict[str, float]:
            if not len(a):
                return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0}
            p50, p90, p99 = np.percentile(a, [50, 90, 99])
            return {"mean": float(a.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99)}

        tokens_s = self._steady_tokens_per_s()
        return {
            "requests": len(self.arrival),
            "makespan_s": self.makespan_s,
            "wall_s": self.wall_s,
            "steps": self.steps,
            "ttft_s": pct(ttft),
            "tpot_s": pct(tpot),
            "throughput_req_s": tokens_s / float(self.output.mean()),
            "output_tok_s": tokens_s,
            "busy_fraction": self.busy_fraction,
            "kv_peak_fraction": self.kv_peak_fraction,
        }

    def _steady_tokens_per_s(self) -> float:
        """Output tokens per second in the steady window: from one mean request lifetime after the
        first arrival (the warm-up) to the last arrival (then the load drains). A request's tokens
        after the first are spread evenly between its first token and its end. A batch that all
        arrives at once has no such window: it is measured over the makespan."""
        start, stop = float(self.arrival.min()), float(self.arrival.max())
        warm = start + min(0.5 * (stop - start), float((self.finish - self.arrival).mean()))
        if stop - warm <= 0:
            return float(self.output.sum()) / self.makespan_s if self.makespan_s else 0.0
        span = np.maximum(self.finish - self.first, 1e-12)
        inside = np.clip(np.minimum(self.finish, stop) - np.maximum(self.first, warm), 0.0, None) / span
        firsts = (self.first >= warm) & (self.first <= stop)
        return float((inside * (self.output - 1)).sum() + firsts.sum()) / (stop - warm)
