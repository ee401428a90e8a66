"""Closed forms for a prefill/decode split: some replicas only prefill, the others only decode.

A prefill replica fills each step with up to ``max_batched_tokens`` prompt tokens and samples the
first token; the prompt's KV then moves to a decode replica (every GPU sends its own slice, in
parallel), which decodes without prompts slowing its steps. TTFT comes from the prefill side
(queueing as an M/M/1 tail, plus the prompt's chunk cycles); TPOT from the decode side, with the
KV move spread over the output tokens. The split with k prefill replicas of dp serves
min(k x prefill rate, (dp - k) x decode rate).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from trellis.planner.analytic import Demand, Point, largest_within, solve_increasing
from trellis.planner.cost import ReplicaCost


@dataclass(frozen=True)
class SplitPoint:
    prefill: Point  # per prefill replica
    decode: Point  # per decode replica
    prefill_replicas: int
    decode_replicas: int

    @property
    def rate(self) -> float:
        return min(self.prefill.rate * self.prefill_replicas, self.decode.rate * self.decode_replicas)


class Disaggregated:
    def __init__(self, cost: ReplicaCost, demand: Demand, kv_move_s: float) -> None:
        self.cost, self.d, self.m = cost, demand, cost.pp
        self.kv_move_s = kv_move_s  # one prompt's KV from a prefill replica to a decode replica

    # ---- the prefill side: the unknown is the arrival rate ------------------------------------
    def _prefill_trip(self, tokens: float) -> tuple[float, float]:
        """(round trip, slowest stage) of a step of ``tokens`` prompt tokens (causal attention)."""
        return self.cost.cycle(tokens, tokens / 2, tokens * tokens / 2, 1, graph=False)

    def prefill_point(self, rate: float) -> Point | None:
        d, m = self.d, self.m
        budget = d.max_batched_tokens
        trip, slowest = self._prefill_trip(budget)
        full = max(trip, m * slowest)  # full steps leave the replica one per full / m
        service = d.prompt_mean * full / (m * budget)  # a prompt's share of the step budget
        rho = rate * service
        if rho >= 1:
            return None

        def own(p: float) -> float:
            # The wait for the step in flight to come back, then the prompt's own chunk steps.
            return rho * full / (2 * m) + math.ceil(p / budget) * self._prefill_trip(min(p, budget))[0]

        # M/D/1 mean wait and Kingman's exponential tail, as for co-located replicas.
        wait_mean = rho * service / (2 * (1 - rho))
        wait_p99 = service * max(0.0, math.log(100 * rho)) / (2 * (1 - rho)) if rho > 0 else 0.0
        seqs = rate * (wait_mean + own(d.prompt_mean))
        return Point(
            concurrency=0.0,
            rate=rate,
            tpot_s=0.0,
            ttft_mean_s=wait_mean + own(d.prompt_mean),
            ttft_p99_s=wait_p99 + own(d.prompt_p99),
            prefill_load=rho,
            seqs=seqs,
            kv_used=seqs * d.prompt_mean,
            cycle_s=full,
            trip_s=trip,
            slowest_stage_s=slowest,
            micro_batches=m,
        )

    def prefill_violation(self, p: Point | None) -> str | None:
        if p is None:
            return "prefill budget"
        if p.kv_used > self.d.kv_tokens:
            return "KV room"
        if p.ttft_p99_s > self.d.ttft_slo_s:
            return "TTFT SLO"
        return None

    def prefill_best(self) -> tuple[Point | None, str]:
        d = self.d
        trip, slowest = self._prefill_trip(d.max_batched_tokens)
        capacity = self.m * d.max_batched_tokens / (d.prompt_mean * max(trip, self.m * slowest))
        return largest_within(
            self.prefill_point, self.prefill_violation, capacity * (1 - 1e-9), "prefill budget"
        )

    # ---- the decode side: the unknown is the concurrency --------------------------------------
    def decode_point(self, concurrency: float) -> Point | None:
        d, m = self.d, self.m
        b = concurrency / m
        if b > d.max_batched_tokens:
            return None
        ctx = d.prompt_mean + d.output_mean / 2
        trip, slowest = self.cost.cycle(b, b * ctx, b * ctx, b, graph=True)
        cycle = max(trip, m * slowest)
        rate = concurrency / (d.decode_steps * cycle)
        tpot = cycle + self.kv_move_s / d.decode_steps
        # KV arrives with the request: it is held from the move until the last token.
        seqs = concurrency + rate * self.kv_move_s
        tpot_p99 = cycle + self.kv_move_s / (d.output_p10 - 1)
        return Point(
            concurrency, rate, tpot, 0.0, 0.0, 0.0, seqs, seqs * d.reserve, cycle, trip, slowest, m, tpot_p99
        )

    def decode_violation(self, p: Point | None) -> str | None:
        if p is None:
            return "step budget"
        if p.kv_used > self.d.kv_tokens:
            return "KV room"
        if p.seqs > self.d.max_seqs:
            return "max sequences"
        if p.tpot_p99_s > self.d.tpot_slo_s:
            return "TPOT SLO"
        return None

    def decode_bounds(self) -> dict[str, float]:
        d = self.d
        return {
            "max sequences": float(d.max_seqs),
            "KV room": d.kv_tokens / d.reserve,
            "step budget": self.m * float(d.max_batched_tokens),
        }

    def decode_best(self) -> tuple[Point | None, str]:
        bounds = self.decode_bounds()
        return largest_within(
            self.decode_point,
            self.decode_violation,
            min(bounds.values()),
            min(bounds, key=bounds.__getitem__),
        )

    # ---- the split ----------------------------------------------------------------------------
    def best(self, dp: int) -> tuple[SplitPoint | None, str]:
        """The split of ``dp`` replicas that serves the most within the SLOs."""
        pre, why_p = self.prefill_best()
        dec, why_d = self.decode_best()
        if pre is None or dec is None or dp < 2:
            return None, why_p if pre is None else why_d if dec is None else "needs 2 replicas"
        k = max(range(1, dp), key=lambda k: min(k * pre.rate, (dp - k) * dec.rate))
        limit = why_p if k * pre.rate < (dp - k) * dec.rate else why_d
        return SplitPoint(pre, dec, k, dp - k), limit

    def at_rate(self, dp: int, rate: float) -> SplitPoint | None:
        """The split that serves ``rate`` with the most headroom, at that rate."""
        pre, _ = self.prefill_best()
        dec, _ = self.decode_best()
        if pre is None or dec is None or dp < 2:
            return None
        k = max(range(1, dp), key=lambda k: min(k * pre.rate, (dp - k) * dec.rate))
        p = self.prefill_point(rate / k)
        bounds = self.decode_bounds()
        q = solve_increasing(self.decode_point, lambda x: x.rate, rate / (dp - k), min(bounds.values()))
        if p is None or q is None:
            return None
        return SplitPoint(p, q, k, dp - k)
