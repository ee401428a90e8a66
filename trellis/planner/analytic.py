"""Closed forms for one replica that prefills and decodes (continuous batching, chunked prefill).

The unknown is B, the sequences decoding at once in a replica; with ``m`` micro-batches in flight
(one per stage) each holds b = B / m. From the cost model:

* a decode-only step of a micro-batch takes a round trip R (its stages plus hops); the replica
  turns one out every max(R, m x slowest stage): that is the time per output token (TPOT);
* a prompt rides along in steps (in chunks that fit the step budget left by the b decodes); a
  step carrying a chunk is slower and, in a pipeline, holds up every micro-batch queued behind it,
  so each prompt stretches every sequence's time by the difference of the round trips;
* Little's law ties the rate to B: B = rate x (output - 1) x TPOT, solved in closed form;
* TTFT = queueing for the chunk steps (M/D/1 mean, Kingman's exponential tail for the p99), the
  wait for a micro-batch to come back to the head, and the prompt's own chunk steps.

Larger B means more throughput and longer steps: the best B is the largest one that keeps the
TPOT and TTFT SLOs, the KV room and the sequence limit; it is found by bisection.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from trellis.planner.cost import ReplicaCost
from trellis.planner.workload import Z99


@dataclass(frozen=True)
class Demand:
    """The workload's figures the closed forms use, and the limits a replica must respect."""

    prompt_mean: float
    prompt_p99: float
    output_mean: float
    output_p10: float  # a short output: its TPOT varies the most
    kv_tokens: int  # a replica's KV room
    max_seqs: int
    max_batched_tokens: int
    ttft_slo_s: float
    tpot_slo_s: float

    @property
    def reserve(self) -> float:
        """KV tokens a request holds from admission to its end (prompt + output)."""
        return self.prompt_mean + self.output_mean

    @property
    def decode_steps(self) -> float:
        return max(self.output_mean - 1.0, 1.0)


@dataclass(frozen=True)
class Point:
    """One replica at one load."""

    concurrency: float  # sequences decoding
    rate: float  # requests per second
    tpot_s: float
    ttft_mean_s: float
    ttft_p99_s: float
    prefill_load: float  # utilisation of the prompt queue (rho)
    seqs: float  # sequences admitted (decoding + prefilling)
    kv_used: float  # tokens reserved
    cycle_s: float  # decode-only cycle
    trip_s: float  # decode-only round trip of one micro-batch
    slowest_stage_s: float
    micro_batches: int  # in flight, one per stage
    tpot_p99_s: float = 0.0  # of each request's own mean TPOT

    @property
    def bubble(self) -> float:
        """Share of a decode cycle the slowest stage idles: the hops the micro-batches do not hide."""
        return max(0.0, 1.0 - self.micro_batches * self.slowest_stage_s / self.cycle_s)


class Colocated:
    """A replica that both prefills and decodes: its points as functions of the concurrency."""

    def __init__(self, cost: ReplicaCost, demand: Demand) -> None:
        self.cost, self.d, self.m = cost, demand, cost.pp

    def _trip(self, b: float, chunk: float) -> tuple[float, float]:
        """(round trip, slowest stage) of a micro-batch step with ``b`` decodes and a ``chunk`` of prompt."""
        d = self.d
        ctx = d.prompt_mean + d.output_mean / 2
        if chunk == 0:
            return self.cost.cycle(b, b * ctx, b * ctx, b, graph=True)
        # A chunk attends to itself causally (about chunk^2 / 2 pairs) and to the prompt before it.
        start = max(0.0, d.prompt_mean - chunk) / 2
        return self.cost.cycle(
            b + chunk,
            b * ctx + start + chunk,
            b * ctx + chunk * (start + chunk / 2),
            b + min(1.0, chunk / d.prompt_mean),
            graph=False,
        )

    def point(self, concurrency: float) -> Point | None:
        """The replica with ``concurrency`` sequences decoding; None if prefill cannot keep up."""
        d, m = self.d, self.m
        b = concurrency / m
        room = d.max_batched_tokens - b
        if room < 1:
            return None
        trip_d, slow_d = self._trip(b, 0)
        cyc_d = max(trip_d, m * slow_d)
        chunk = min(d.prompt_mean, room)
        trip_p, slow_p = self._trip(b, chunk)
        cyc_p = max(trip_p, m * slow_p)
        steps_per_prompt = d.prompt_mean / chunk
        # A step carrying a chunk holds up every micro-batch queued behind it at each stage (a convoy),
        # so each prompt delays every sequence by about the difference of the round trips.
        k = steps_per_prompt * (trip_p - trip_d)
        rate = concurrency / (d.decode_steps * cyc_d + concurrency * k)
        if rate * k >= 1:
            return None
        cycle = cyc_d / (1 - rate * k)
        # Prefill as a queue: chunk steps pass the slowest stage one per cyc_p / m, and in a pipeline a
        # prompt also waits out the convoy of the one before it.
        service = steps_per_prompt * max(cyc_p / m, trip_p - trip_d)
        rho = rate * service
        if rho >= 1:
            return None
        # Arrivals are Poisson, service nearly constant: M/D/1 mean wait, and Kingman's exponential tail.
        wait_mean = rho * service / (2 * (1 - rho))
        wait_p99 = service * max(0.0, math.log(100 * rho)) / (2 * (1 - rho)) if rho > 0 else 0.0
        # Then the wait for a micro-batch to come back to the head, and the prompt's own chunk steps.
        base_mean = cycle / (2 * m) + math.ceil(d.prompt_mean / room) * trip_p
        p99_chunk = min(d.prompt_p99, room)
        trip_p99 = trip_p if p99_chunk == chunk else self._trip(b, p99_chunk)[0]
        base_p99 = cycle / m + math.ceil(d.prompt_p99 / room) * trip_p99
        seqs = concurrency + rate * (base_mean + wait_mean)
        # A sequence's own TPOT depends on how many prompts (Poisson) ride along while it decodes; a
        # short one sees few, so its mean varies most: the p99 uses the 10th-percentile output.
        steps = d.output_p10 - 1
        riders = rate * steps_per_prompt * steps * cycle
        tpot_p99 = cycle + Z99 * math.sqrt(riders) * (trip_p - trip_d) / steps
        return Point(
            concurrency,
            rate,
            cycle,
            wait_mean + base_mean,
            wait_p99 + base_p99,
            rho,
            seqs,
            (concurrency + rate * base_mean) * d.reserve,
            cyc_d,
            trip_d,
            slow_d,
            m,
            tpot_p99,
        )

    def violation(self, p: Point | None) -> str | None:
        """The first limit this point breaks, or None."""
        d = self.d
        if p is None:
            return "prefill budget"
        if p.kv_used > d.kv_tokens:
            return "KV room"
        if p.seqs > d.max_seqs:
            return "max sequences"
        if p.tpot_p99_s > d.tpot_slo_s:
            return "TPOT SLO"
        if p.ttft_p99_s > d.ttft_slo_s:
            return "TTFT SLO"
        return None

    def bounds(self) -> dict[str, float]:
        """Hard ceilings on the concurrency, by name."""
        d = self.d
        return {
            "max sequences": float(d.max_seqs),
            "KV room": d.kv_tokens / d.reserve,
            "step budget": self.m * (d.max_batched_tokens - 1.0),
        }

    def upper(self) -> float:
        return max(1e-3, min(self.bounds().values()))

    def best(self) -> tuple[Point | None, str]:
        """The highest-throughput point within every limit, and the limit that stops it going higher."""
        bounds = self.bounds()
        return largest_within(self.point, self.violation, self.upper(), min(bounds, key=bounds.__getitem__))

    def at_rate(self, rate: float) -> Point | None:
        """The point serving ``rate`` requests per second (None if it cannot)."""
        return solve_increasing(self.point, lambda p: p.rate, rate, self.upper())

    def at_concurrency(self, clients: float) -> Point | None:
        """Closed loop: ``clients`` requests in flight (decoding, prefilling or queued)."""
        return solve_increasing(self.point, lambda p: p.seqs, clients, self.upper())


def largest_within(
    point: Callable[[float], Point | None],
    violation: Callable[[Point | None], str | None],
    upper: float,
    upper_name: str,
) -> tuple[Point | None, str]:
    """The point at the largest concurrency in (0, upper] that breaks no limit."""
    low = min(1e-3, upper)
    first = violation(point(low))
    if first is not None:
        return None, first
    top = point(upper)
    if violation(top) is None:
        return top, upper_name
    lo, hi = low, upper
    for _ in range(50):
        mid = (lo + hi) / 2
        if violation(point(mid)) is None:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-3 * lo:
            break
    return point(lo), violation(point(hi)) or upper_name


def solve_increasing(
    point: Callable[[float], Point | None], value: Callable[[Point], float], target: float, upper: float
) -> Point | None:
    """The point whose ``value`` (increasing in concurrency) equals ``target``."""
    top = point(upper)
    if top is None or value(top) < target:
        lo, hi = 0.0, upper  # find the largest concurrency that still has a point
        for _ in range(60):
            mid = (lo + hi) / 2
            if point(mid) is None:
                hi = mid
            else:
                lo = mid
        top = point(lo)
        if top is None or value(top) < target:
            return None
        upper = lo
    lo, hi = 0.0, upper
    for _ in range(60):
        mid = (lo + hi) / 2
        p = point(mid)
        if p is not None and value(p) < target:
            lo = mid
        else:
            hi = mid
    return point(hi)
