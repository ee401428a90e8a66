"""OpenTelemetry tracing: one span per request at the router and at the head stage, linked.

Off unless TRELLIS_TRACE is set: `console` prints finished spans as JSON to stderr (one line
each). The router injects the W3C trace context into the metadata of its call to the head stage,
which continues the trace, so a request's spans share one trace id across processes.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Sequence

from opentelemetry import context, trace
from opentelemetry.propagate import extract, inject


def setup_tracing(service: str) -> None:
    """Install a tracer provider for this process if TRELLIS_TRACE asks for one."""
    mode = os.environ.get("TRELLIS_TRACE", "")
    if not mode:
        return
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

    if mode != "console":
        raise ValueError(f"TRELLIS_TRACE: expected 'console' (or unset), got {mode!r}")
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    exporter = ConsoleSpanExporter(
        out=sys.stderr, formatter=lambda s: json.dumps(json.loads(s.to_json())) + "\n"
    )
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def outgoing_metadata(span: trace.Span) -> list[tuple[str, str]]:
    """``span``'s trace context as gRPC metadata for a call to another service (empty when off)."""
    carrier: dict[str, str] = {}
    inject(carrier, context=trace.set_span_in_context(span))
    return list(carrier.items())


def incoming_context(metadata: Iterable[tuple[str, str | bytes]] | None) -> context.Context:
    """The caller's trace context from a call's gRPC metadata (empty when there is none)."""
    carrier = {k: v.decode() if isinstance(v, bytes) else v for k, v in (metadata or ())}
    return extract(carrier)


def span_attributes(**values: object) -> dict[str, str | int | float | bool | Sequence[str]]:
    """Attributes without the None values (OpenTelemetry rejects them)."""
    return {k: v for k, v in values.items() if v is not None}  # type: ignore[misc]
