"""The workload: prompt and output length distributions, arrivals (a rate or a concurrency), SLOs.

A length is written ``1024`` (fixed), ``uniform:LOW:HIGH`` (integers, both included) or
``lognormal:MEAN:SIGMA[:MAX]`` (MEAN of the distribution, SIGMA of its log, clipped to
[1, MAX]; MAX defaults to the model's context length).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from trellis.planner.errors import PlanError

Z99 = 2.3263478740408408  # the standard normal's 99th percentile
Z999 = 3.090232306167813
Z90 = 1.2815515655446004


@dataclass(frozen=True)
class Lengths:
    kind: str  # fixed | uniform | lognormal
    a: float  # fixed value, uniform low, lognormal mean
    b: float = 0.0  # uniform high, lognormal sigma
    cap: int | None = None  # lognormal clip

    def describe(self) -> str:
        if self.kind == "fixed":
            return f"{int(self.a)}"
        if self.kind == "uniform":
            return f"uniform {int(self.a)}-{int(self.b)}"
        return f"lognormal mean {self.a:g}, sigma {self.b:g}, max {self.cap}"

    def mean(self) -> float:
        if self.kind == "fixed":
            return self.a
        if self.kind == "uniform":
            return (self.a + self.b) / 2
        return min(self.a, float(self.cap or self.a))

    def quantile(self, z: float, q: float) -> float:
        if self.kind == "fixed":
            return self.a
        if self.kind == "uniform":
            return math.ceil(self.a + q * (self.b - self.a))
        mu = math.log(self.a) - self.b**2 / 2
        value = math.exp(mu + self.b * z)
        return min(value, self.cap) if self.cap else value

    def p99(self) -> float:
        return self.quantile(Z99, 0.99)

    def maximum(self) -> int:
        """The longest value a request can have (what its KV must fit)."""
        if self.kind == "fixed":
            return int(self.a)
        if self.kind == "uniform":
            return int(self.b)
        return int(self.cap) if self.cap else math.ceil(self.quantile(Z999, 0.999))

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.kind == "fixed":
            return np.full(n, int(self.a), dtype=np.int64)
        if self.kind == "uniform":
            return rng.integers(int(self.a), int(self.b) + 1, size=n, dtype=np.int64)
        mu = math.log(self.a) - self.b**2 / 2
        values = np.rint(rng.lognormal(mu, self.b, size=n)).astype(np.int64)
        return np.clip(values, 1, self.cap or np.iinfo(np.int64).max)


def parse_lengths(text: str, what: str, default_cap: int) -> Lengths:
    parts = str(text).split(":")
    try:
        if len(parts) == 1:
            dist = Lengths("fixed", float(int(parts[0])))
        elif parts[0] == "uniform" and len(parts) == 3:
            dist = Lengths("uniform", float(int(parts[1])), float(int(parts[2])))
        elif parts[0] == "lognormal" and len(parts) in (3, 4):
            cap = int(parts[3]) if len(parts) == 4 else default_cap
            dist = Lengths("lognormal", float(parts[1]), float(parts[2]), cap)
        else:
            raise ValueError
    except ValueError:
        raise PlanError(
            f"{what}: {text!r} is not a length (N, uniform:LOW:HIGH or lognormal:MEAN:SIGMA[:MAX])"
        ) from None
    low = dist.a if dist.kind != "lognormal" else 1
    if low < 1 or (dist.kind == "uniform" and dist.b < dist.a) or (dist.kind == "lognormal" and dist.b < 0):
        raise PlanError(f"{what}: {text!r} must describe lengths >= 1 (and LOW <= HIGH, SIGMA >= 0)")
    return dist


@dataclass(frozen=True)
class Workload:
    prompt: Lengths
    output: Lengths
    rate: float | None = None  # requests per second (Poisson), open loop
    concurrency: int | None = None  # clients each with one request in flight, closed loop
    ttft_slo_s: float = 2.0  # p99
    tpot_slo_s: float = 0.05  # p99

    def longest_request(self) -> int:
        return self.prompt.maximum() + self.output.maximum()

    def describe(self) -> str:
        load = (
            f"{self.rate:g} req/s (Poisson)"
            if self.rate
            else f"{self.concurrency} concurrent clients"
            if self.concurrency
            else "as much as the SLOs allow"
        )
        return (
            f"prompt {self.prompt.describe()}, output {self.output.describe()} tokens; {load}; "
            f"SLO p99 TTFT <= {self.ttft_slo_s * 1e3:g} ms, TPOT <= {self.tpot_slo_s * 1e3:g} ms"
        )


@dataclass(frozen=True)
class Requests:
    """A sampled trace: arrival times (open loop; zeros for closed loop) and lengths."""

    arrival: np.ndarray
    prompt: np.ndarray
    output: np.ndarray

    def __len__(self) -> int:
        return len(self.prompt)


def sample_requests(
    workload: Workload, n: int, seed: int, rate: float | None = None, max_len: int | None = None
) -> Requests:
    """``n`` requests; Poisson arrivals at ``rate`` (default the workload's) unless closed loop.

    With ``max_len``, a prompt is cut to ``max_len - 1`` and its output stops at ``max_len`` tokens
    in all, as the engine stops a sequence at the context length.
    """
    rng = np.random.default_rng(seed)
    prompt = workload.prompt.sample(rng, n)
    output = workload.output.sample(rng, n)
    if max_len is not None:
        prompt = np.minimum(prompt, max_len - 1)
        output = np.maximum(1, np.minimum(output, max_len - prompt))
    r = rate if rate is not None else workload.rate
    arrival = np.cumsum(rng.exponential(1.0 / r, size=n)) if r else np.zeros(n)
    return Requests(arrival, prompt, output)
