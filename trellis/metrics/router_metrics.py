"""The router's request metrics: outcomes, latencies and token counts, as vLLM names them (`trellis:`).

Every series carries `model_name`; the per-request families also carry `replica`, the DP replica
that served the request ("" for one refused before a replica was chosen). Invariants:
- each request counts once in `trellis:requests_total`, by outcome (OUTCOMES), when it ends;
- `num_requests_waiting` + `num_requests_running` is the number of requests inside the router:
  waiting until their first delta (tokenizing, queued or prefilling upstream), then running;
- the families live on the CollectorRegistry given (one per process), never the global default.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# How a request ended at the router (trellis:requests_total{outcome}).
OUTCOMES = ("ok", "invalid", "overloaded", "unavailable", "deadline", "cancelled", "error")
# How a P/D request's path settled (trellis_router_handoffs_total; trellis/routing/handoff_stream.py).
HANDOFF_OUTCOMES = ("handoff", "aggregated_fallback", "first_token_finished", "failed", "cancelled")

# vLLM's buckets, with finer ones below: a CPU demo's tokens come in milliseconds.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
E2E_BUCKETS = (
    0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
    50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip


@dataclass(frozen=True)
class ReplicaSeries:
    """The labelled children of one replica's per-request families (looked up once, not per token)."""

    ttft: Histogram
    itl: Histogram
    e2e: Histogram
    prompt_tokens: Counter
    generation_tokens: Counter


class RouterMetrics:
    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry() if registry is None else registry
        per_request = ("model_name", "replica")
        reg = self.registry
        self.requests = Counter(
            "trellis:requests",
            "Requests that ended, by outcome.",
            [*per_request, "outcome"],
            registry=reg,
        )
        self.success = Counter(
            "trellis:request_success",
            "Requests that finished (outcome ok), by finish reason.",
            [*per_request, "finished_reason"],
            registry=reg,
        )
        self.ttft = Histogram(
            "trellis:time_to_first_token_seconds",
            "From a request's arrival at the router to its first generated token.",
            per_request,
            buckets=TTFT_BUCKETS,
            registry=reg,
        )
        self.itl = Histogram(
            "trellis:inter_token_latency_seconds",
            "Time between a request's consecutive generated tokens (a delta of k tokens: k gaps).",
            per_request,
            buckets=ITL_BUCKETS,
            registry=reg,
        )
        self.e2e = Histogram(
            "trellis:e2e_request_latency_seconds",
            "From a request's arrival to its last token, for requests that finished.",
            per_request,
            buckets=E2E_BUCKETS,
            registry=reg,
        )
        self.prompt_tokens = Counter(
            "trellis:prompt_tokens", "Prompt tokens of requests served.", per_request, registry=reg
        )
        self.generation_tokens = Counter(
            "trellis:generation_tokens", "Tokens generated.", per_request, registry=reg
        )
        self.running = Gauge(
            "trellis:num_requests_running",
            "Requests at the router that are streaming tokens.",
            ["model_name"],
            registry=reg,
        ).labels(model_name)
        self.waiting = Gauge(
            "trellis:num_requests_waiting",
            "Requests at the router that have no token yet (tokenizing, queued or prefilling).",
            ["model_name"],
            registry=reg,
        ).labels(model_name)
        # KV-aware routing (trellis/routing/kv_aware.py): what each decision predicted; the hits
        # the workers actually found are theirs to count.
        self.kv_predicted_hit_blocks = Counter(
            "trellis_router_kv_predicted_hit_blocks",
            "Prompt blocks the KV-aware policy expected the chosen replica (or the KV store) to hold.",
            per_request,
            registry=reg,
        )
        self.kv_prompt_blocks = Counter(
            "trellis_router_kv_prompt_blocks",
            "Full prompt blocks of the requests the KV-aware policy routed.",
            per_request,
            registry=reg,
        )
        self.kv_fallbacks = Counter(
            "trellis_router_kv_fallbacks",
            "KV-aware decisions that fell back to least-load, by reason (locator error or timeout).",
            ["model_name", "reason"],
            registry=reg,
        )
        # P/D disaggregation: each paired request once, by how it settled; P's first token to D's.
        self.handoffs = Counter(
            "trellis_router_handoffs",
            "Requests routed to a prefill/decode pair, by outcome: handoff (the decode replica "
            "streamed), aggregated_fallback, first_token_finished, failed, cancelled.",
            ["model_name", "outcome"],
            registry=reg,
        )
        self._handoffs = {o: self.handoffs.labels(model_name, o) for o in HANDOFF_OUTCOMES}
        self.handoff_seconds = Histogram(
            "trellis_router_handoff_seconds",
            "From the prefill replica's first token to the decode replica's first token.",
            ["model_name"],
            buckets=TTFT_BUCKETS,
            registry=reg,
        ).labels(model_name)
        self._series: dict[str, ReplicaSeries] = {}

    def series(self, replica: str) -> ReplicaSeries:
        """The per-request children of `replica` (created on its first request)."""
        found = self._series.get(replica)
        if found is None:
            labels = (self.model_name, replica)
            found = self._series[replica] = ReplicaSeries(
                ttft=self.ttft.labels(*labels),
                itl=self.itl.labels(*labels),
                e2e=self.e2e.labels(*labels),
                prompt_tokens=self.prompt_tokens.labels(*labels),
                generation_tokens=self.generation_tokens.labels(*labels),
            )
        return found

    def ended(self, replica: str, outcome: str, finished_reason: str) -> None:
        """Count one request that ended (finished_reason: "" unless outcome is ok)."""
        self.requests.labels(self.model_name, replica, outcome).inc()
        if outcome == "ok":
            self.success.labels(self.model_name, replica, finished_reason).inc()

    def kv_decision(self, replica: str, predicted_hit_blocks: int, prompt_blocks: int) -> None:
        """Count one KV-aware decision: the blocks it expects to hit of the prompt's full blocks."""
        self.kv_predicted_hit_blocks.labels(self.model_name, replica).inc(predicted_hit_blocks)
        self.kv_prompt_blocks.labels(self.model_name, replica).inc(prompt_blocks)

    def handoff_ended(self, outcome: str) -> None:
        """Count one paired request by how it settled (HANDOFF_OUTCOMES)."""
        found = self._handoffs.get(outcome)
        (found if found is not None else self.handoffs.labels(self.model_name, outcome)).inc()

    def handoff_latency(self, seconds: float) -> None:
        """Observe one hand-off's gap: the prefill replica's first token to the decode replica's."""
        self.handoff_seconds.observe(seconds)

    def kv_fallback(self, reason: str) -> None:
        """Count one KV-aware decision that fell back to least-load."""
        self.kv_fallbacks.labels(self.model_name, reason).inc()
