"""A stage leader's metrics, read at scrape time from its stats: nothing is updated on the step loop.

The head (stage 0) reports its scheduler (requests running / waiting, KV blocks, prefix cache,
preemptions) and every stage's busy seconds with the pipeline bubble; every stage leader reports
the UCX hand-off of its own links. Every series carries `model_name`, `replica` and `stage` (for
`stage_busy_seconds_total`, the stage that was busy; `pipeline_bubble` is the replica's).
Invariants: `kv_cache_blocks{state="used"}` + `{state="free"}` = the stage's KV blocks; the
counters are the stats' running totals, so they only grow while the process lives.
`collect` runs where the registry is scraped: on the service's event loop (http_server.py), so
it reads the scheduler between steps, never from another thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# The bubble is over the interval since the previous scrape; a shorter one keeps the last value.
MIN_BUBBLE_INTERVAL_S = 1.0


class StageFigures(Protocol):
    """What the collector reads (trellis.core.stage_api.StageStats)."""

    @property
    def num_blocks(self) -> int: ...
    @property
    def free_blocks(self) -> int: ...
    @property
    def running(self) -> int: ...
    @property
    def waiting(self) -> int: ...
    @property
    def prefix_query_tokens(self) -> int: ...
    @property
    def prefix_hit_tokens(self) -> int: ...
    @property
    def preemptions(self) -> int: ...
    @property
    def store_loaded_blocks(self) -> int: ...
    @property
    def store_voided_loads(self) -> int: ...
    @property
    def store_committed_blocks(self) -> int: ...
    @property
    def store_errors(self) -> int: ...
    @property
    def stage_busy_s(self) -> Sequence[float]: ...
    @property
    def pd_prefills(self) -> int: ...
    @property
    def pd_fallbacks(self) -> int: ...
    @property
    def pd_blocks_sent(self) -> int: ...
    @property
    def pd_reserved(self) -> int: ...
    @property
    def pd_committed(self) -> int: ...
    @property
    def pd_recomputed(self) -> int: ...
    @property
    def pd_voided(self) -> int: ...
    @property
    def pd_blocks_loaded(self) -> int: ...
    @property
    def handoff_bytes_sent(self) -> int: ...
    @property
    def handoff_bytes_received(self) -> int: ...
    @property
    def handoff_seconds(self) -> float: ...


class StageCollector(Collector):
    def __init__(
        self,
        read: Callable[[], StageFigures],
        *,
        model_name: str,
        replica: str,
        stage: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._read = read
        self._model_name, self._replica, self._stage = model_name, replica, stage
        self._clock = clock
        self._created = clock()
        self._busy_at: tuple[float, list[float]] | None = None  # (when, totals) at the last bubble
        self._bubble: float | None = None

    def describe(self) -> list[Metric]:
        return []  # the families depend on the stage; registering must not read the stats

    def collect(self) -> Iterator[Metric]:
        s = self._read()
        ident = [self._model_name, self._replica, str(self._stage)]
        labels = ["model_name", "replica", "stage"]
        if self._stage == 0:
            yield from self._head(s, ident, labels)
        sent = CounterMetricFamily(
            "trellis:handoff_bytes",
            "Payload bytes (activations, results) on this stage leader's UCX links.",
            labels=[*labels, "direction"],
        )
        sent.add_metric([*ident, "sent"], s.handoff_bytes_sent)
        sent.add_metric([*ident, "received"], s.handoff_bytes_received)
        yield sent
        yield _counter(
            "trellis:handoff_seconds",
            "Seconds this stage leader spent sending hand-off frames over UCX.",
            labels,
            ident,
            s.handoff_seconds,
        )

    def _head(self, s: StageFigures, ident: list[str], labels: list[str]) -> Iterator[Metric]:
        yield _gauge(
            "trellis:num_requests_running", "Sequences the scheduler runs.", labels, ident, s.running
        )
        yield _gauge(
            "trellis:num_requests_waiting", "Sequences waiting to be scheduled.", labels, ident, s.waiting
        )
        blocks = GaugeMetricFamily(
            "trellis:kv_cache_blocks", "KV cache blocks by state.", labels=[*labels, "state"]
        )
        blocks.add_metric([*ident, "used"], s.num_blocks - s.free_blocks)
        blocks.add_metric([*ident, "free"], s.free_blocks)
        yield blocks
        usage = (s.num_blocks - s.free_blocks) / s.num_blocks if s.num_blocks else 0.0
        yield _gauge(
            "trellis:kv_cache_usage_perc", "KV cache usage (1 = all blocks used).", labels, ident, usage
        )
        yield _counter(
            "trellis:prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache.",
            labels,
            ident,
            s.prefix_query_tokens,
        )
        yield _counter(
            "trellis:prefix_cache_hits",
            "Prompt tokens found in the prefix cache.",
            labels,
            ident,
            s.prefix_hit_tokens,
        )
        yield _counter(
            "trellis:num_preemptions", "Sequences preempted (their KV freed).", labels, ident, s.preemptions
        )
        for name, doc, value in (
            (
                "kv_store_loaded_blocks",
                "KV blocks loaded from the store at admission.",
                s.store_loaded_blocks,
            ),
            ("kv_store_voided_loads", "Store loads voided and recomputed.", s.store_voided_loads),
            (
                "kv_store_committed_blocks",
                "KV blocks this head committed to the store.",
                s.store_committed_blocks,
            ),
            ("kv_store_errors", "Store calls that failed (each a fallback to recompute).", s.store_errors),
            ("pd_prefills", "Prefill halves submitted here (P).", s.pd_prefills),
            (
                "pd_fallbacks",
                "Prefill halves decoded here after all: no target, a refused or failed copy, a deadline (P).",
                s.pd_fallbacks,
            ),
            ("pd_blocks_sent", "KV blocks copied to decode replicas, confirmed (P).", s.pd_blocks_sent),
            ("pd_reserved", "Hand-off reservations made (D).", s.pd_reserved),
            ("pd_committed", "Decode halves that found their reservation (D).", s.pd_committed),
            ("pd_recomputed", "Decode halves that did not, recomputed here (D).", s.pd_recomputed),
            (
                "pd_voided",
                "Hand-off loads voided (checksum or copy failure) and recomputed (D).",
                s.pd_voided,
            ),
            ("pd_blocks_loaded", "KV blocks loaded from staging slots and checked (D).", s.pd_blocks_loaded),
        ):
            yield _counter(f"trellis:{name}", doc, labels, ident, value)
        busy = list(s.stage_busy_s)
        if not busy:  # the ring is not up yet
            return
        per_stage = CounterMetricFamily(
            "trellis:stage_busy_seconds", "Compute seconds of each pipeline stage.", labels=labels
        )
        for stage, seconds in enumerate(busy):
            per_stage.add_metric([self._model_name, self._replica, str(stage)], seconds)
        yield per_stage
        yield _gauge(
            "trellis:pipeline_bubble",
            "Share of the stages' time idle since the previous scrape (0: always busy).",
            ["model_name", "replica"],
            ident[:2],
            self._bubble_since_last(busy),
        )

    def _bubble_since_last(self, busy: list[float]) -> float:
        """1 - busy seconds of all stages / (stages x wall seconds), as trellis.runtime.busy does."""
        now = self._clock()
        # The first scrape: the interval since the collector was made (before any step ran).
        then, before = self._busy_at or (self._created, [0.0] * len(busy))
        wall = now - then
        if self._bubble is None or wall >= MIN_BUBBLE_INTERVAL_S:
            spent = sum(b - a for a, b in zip(before, busy, strict=True))
            self._bubble = min(1.0, max(0.0, 1.0 - spent / (len(busy) * wall))) if wall > 0 else 0.0
            self._busy_at = (now, busy)
        return self._bubble


def _gauge(name: str, doc: str, labels: list[str], values: list[str], value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=labels)
    family.add_metric(values, value)
    return family


def _counter(name: str, doc: str, labels: list[str], values: list[str], value: float) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=labels)
    family.add_metric(values, value)
    return family
