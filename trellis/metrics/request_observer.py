"""One request at the router, observed: its metrics while it streams, one INFO log line when it ends.

`observe_requests` wraps the router's `generate` (an async generator of deltas), so every front end
(gRPC, HTTP) is observed in one place and the router's own flow stays as it is. Invariants:
- every call ends in exactly one `RequestRecord.end`: one `trellis:requests_total` count and one
  log line (request id, replica, tokens in/out, TTFT, duration, finish reason, outcome), whether
  it finished, was refused, failed, or its reader went away;
- the request id is settled here (the caller's, else a fresh one) and passed down, so the log
  line, the deltas and the upstream request share it;
- per delta only clock reads and counter/histogram updates on cached children: no lookups by label.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from typing import Concatenate, ParamSpec, Protocol, TypeVar, cast

from trellis.core import log
from trellis.core.errors import DeadlineExceeded, InvalidRequest, Overloaded, Unavailable
from trellis.metrics.router_metrics import RouterMetrics

# The error tree's branches as outcomes; anything else unexpected is "error".
_OUTCOME_OF = (
    (InvalidRequest, "invalid"),
    (Overloaded, "overloaded"),
    (Unavailable, "unavailable"),
    (DeadlineExceeded, "deadline"),
    (asyncio.CancelledError, "cancelled"),  # the client's call was cancelled
    (GeneratorExit, "cancelled"),  # the reader closed the stream before the end
)


class DeltaLike(Protocol):
    """What the observer reads of a delta (trellis.routing.router.Delta)."""

    @property
    def token_ids(self) -> Sequence[int]: ...
    @property
    def finish_reason(self) -> str: ...
    @property
    def replica(self) -> str: ...
    @property
    def prompt_ids(self) -> Sequence[int]: ...


class Observed(Protocol):
    """What the decorated method's object must have: its RouterMetrics."""

    @property
    def metrics(self) -> RouterMetrics: ...


def outcome_of(error: BaseException | None, finish_reason: str) -> str:
    """How a request ended: "ok" once its last delta (with a finish reason) was read, else by error."""
    if finish_reason:
        return "ok"
    for kind, outcome in _OUTCOME_OF:
        if isinstance(error, kind):
            return outcome
    return "error"


class RequestRecord:
    """One request's figures so far; `add` per delta, `end` once."""

    __slots__ = (
        "completion_tokens",
        "error",
        "finish_reason",
        "finished_at",
        "first_token_at",
        "last_token_at",
        "prompt_tokens",
        "replica",
        "request_id",
        "started",
        "streaming",
    )

    def __init__(self, request_id: str, started: float) -> None:
        self.request_id = request_id
        self.started = started
        self.replica = ""
        self.streaming = False  # a first delta came: the request moved from waiting to running
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.finished_at: float | None = None
        self.finish_reason = ""
        self.error: BaseException | None = None

    def add(self, delta: DeltaLike, now: float, metrics: RouterMetrics) -> None:
        if not self.streaming:  # the first delta names the replica and brings the prompt
            self.streaming = True
            self.replica = delta.replica
            self.prompt_tokens = len(delta.prompt_ids)
            metrics.waiting.dec()
            metrics.running.inc()
            metrics.series(self.replica).prompt_tokens.inc(self.prompt_tokens)
        series = metrics.series(self.replica)
        n = len(delta.token_ids)
        if n:
            series.generation_tokens.inc(n)
            if self.last_token_at is None:
                self.first_token_at = now
                series.ttft.observe(now - self.started)
            else:  # k tokens in one delta (a decode burst): k gaps of equal share
                gap = (now - self.last_token_at) / n
                for _ in range(n):
                    series.itl.observe(gap)
            self.last_token_at = now
            self.completion_tokens += n
        if delta.finish_reason:
            self.finish_reason = delta.finish_reason
            self.finished_at = now

    def end(self, now: float, metrics: RouterMetrics) -> None:
        """Count the request's outcome, observe its e2e latency if it finished, log its line."""
        (metrics.running if self.streaming else metrics.waiting).dec()
        outcome = outcome_of(self.error, self.finish_reason)
        metrics.ended(self.replica, outcome, self.finish_reason)
        if self.finished_at is not None:
            metrics.series(self.replica).e2e.observe(self.finished_at - self.started)
        ttft = None if self.first_token_at is None else self.first_token_at - self.started
        fields = {
            "replica": self.replica,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "ttft_ms": None if ttft is None else round(ttft * 1e3, 2),
            "duration_ms": round((now - self.started) * 1e3, 2),
            "finish_reason": self.finish_reason,
            "outcome": outcome,
            "error": str(self.error) if outcome not in ("ok", "cancelled") and self.error else None,
        }
        log.get(request_id=self.request_id).info(
            "request finished", **{k: v for k, v in fields.items() if v not in (None, "")}
        )


S = TypeVar("S", bound=Observed)
P = ParamSpec("P")
D = TypeVar("D", bound=DeltaLike)


def observe_requests(
    generate: Callable[Concatenate[S, P], AsyncIterator[D]],
) -> Callable[Concatenate[S, P], AsyncIterator[D]]:
    """Decorate an async generator method that takes `request_id=` and yields deltas."""

    @functools.wraps(generate)
    async def observed(self: S, /, *args: P.args, **kwargs: P.kwargs) -> AsyncIterator[D]:
        request_id = str(kwargs.get("request_id") or "") or uuid.uuid4().hex
        kwargs["request_id"] = request_id
        metrics = self.metrics
        record = RequestRecord(request_id, time.monotonic())
        metrics.waiting.inc()
        try:
            deltas = cast(AsyncGenerator[D, None], generate(self, *args, **kwargs))
            async with contextlib.aclosing(deltas):
                async for delta in deltas:
                    record.add(delta, time.monotonic(), metrics)
                    yield delta
        except BaseException as e:
            record.error = e
            raise
        finally:
            record.end(time.monotonic(), metrics)

    return observed
