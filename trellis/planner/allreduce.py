"""The time of one TP all-reduce, read off the measured table.

An all-reduce of S bytes over n GPUs moves 2(n-1)/n x S bytes per GPU: its bus bytes. The
calibration measures it at several sizes (NCCL eager, NCCL captured in a CUDA graph, and the
one-shot peer-memory kernel); the time at any size is piecewise linear in bus bytes between the
measured sizes, the smallest size's time below them (a smaller all-reduce is no faster: it is all
latency), and the largest size's time plus the extra bytes at the bus bandwidth beyond them.

A decode step's all-reduce carries every row of the batch in one call: 2 calls per layer whatever
the batch, each of rows x hidden x 2 bytes. So a 64-row all-reduce costs one lookup at 64 x 16 KB,
not 64 latencies.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass, field

_MEMO_SIZES = 1 << 16  # sizes remembered per all-reduce: a replay's steps repeat a few thousand


def bus_bytes(nbytes: float, gpus: int) -> float:
    return 2 * (gpus - 1) / gpus * nbytes


@dataclass(frozen=True)
class Curve:
    """Seconds against bus bytes: through the points, flat below the first, and at
    ``bytes_per_s`` past the last."""

    bus: tuple[float, ...]  # ascending
    seconds: tuple[float, ...]
    bytes_per_s: float

    @classmethod
    def through(cls, points: Iterable[tuple[float, float]], bytes_per_s: float) -> Curve:
        by_size: dict[float, list[float]] = {}
        for x, t in points:
            by_size.setdefault(x, []).append(t)
        xs = sorted(by_size)
        if not xs:
            raise ValueError("a curve needs at least one point")
        return cls(tuple(xs), tuple(sum(by_size[x]) / len(by_size[x]) for x in xs), bytes_per_s)

    def __call__(self, bus: float) -> float:
        xs, ts = self.bus, self.seconds
        i = bisect_right(xs, bus)
        if i == 0:
            return ts[0]
        if i == len(xs):
            return ts[-1] + (bus - xs[-1]) / self.bytes_per_s
        x0, x1, t0, t1 = xs[i - 1], xs[i], ts[i - 1], ts[i]
        return t0 + (t1 - t0) * (bus - x0) / (x1 - x0)


@dataclass(frozen=True)
class AllReduceCost:
    """One all-reduce over ``gpus`` GPUs of one link: the measured curves, and what a link other
    than the measured one adds (its extra wire latency, and its slower or faster bytes)."""

    gpus: int
    eager: Curve
    graph: Curve
    one_shot_eager: Curve | None = None
    one_shot_graph: Curve | None = None
    one_shot_max_bytes: int = 0  # the engine's one-shot kernel takes all-reduces up to this size
    wire_latency_s: float = 0.0
    wire_s_per_bus_byte: float = 0.0
    _memo: dict[tuple[float, bool, bool], float] = field(
        default_factory=dict, compare=False, hash=False, repr=False
    )

    def seconds(self, nbytes: float, graph: bool) -> float:
        """One all-reduce of ``nbytes`` (rows x hidden x 2 for a step's hidden states)."""
        return self._remembered(nbytes, graph, False)

    def gather_seconds(self, nbytes: float, graph: bool) -> float:
        """An all-gather of ``nbytes`` in all: each GPU receives (n-1)/n of it, half an
        all-reduce's bus bytes; NCCL's curve at those bus bytes."""
        return self._remembered(nbytes, graph, True)

    def _remembered(self, nbytes: float, graph: bool, gather: bool) -> float:
        key = (nbytes, graph, gather)
        t = self._memo.get(key)
        if t is None:
            t = self._gather(nbytes, graph) if gather else self._all_reduce(nbytes, graph)
            if len(self._memo) < _MEMO_SIZES:
                self._memo[key] = t
        return t

    def _all_reduce(self, nbytes: float, graph: bool) -> float:
        bus = bus_bytes(nbytes, self.gpus)
        curve = self.graph if graph else self.eager
        if nbytes <= self.one_shot_max_bytes:
            curve = (self.one_shot_graph if graph else self.one_shot_eager) or curve
        return curve(bus) + self.wire_latency_s + bus * self.wire_s_per_bus_byte

    def _gather(self, nbytes: float, graph: bool) -> float:
        bus = (self.gpus - 1) / self.gpus * nbytes
        curve = self.graph if graph else self.eager
        return curve(bus) + self.wire_latency_s + bus * self.wire_s_per_bus_byte
