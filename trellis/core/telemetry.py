"""OpenTelemetry tracing: a span per request at the router and at the head stage, linked, and a
span per step on every stage leader.

Off unless TRELLIS_TRACE is set: `console` prints finished spans as JSON to stderr (one line
each); `otlp` batches them to an OpenTelemetry collector (OTEL_EXPORTER_OTLP_ENDPOINT; protocol
OTEL_EXPORTER_OTLP_PROTOCOL, `grpc` by default or `http/protobuf`; the opentelemetry-exporter-otlp
package, imported only then). The router injects the W3C trace context into the metadata of its
call to the head stage, which continues the trace, so a request's spans share one trace id across
processes. A batched step serves many requests, so the step spans are roots of their own, joined
to the requests by attributes (`step_id`, and `seq_ids` on the head, which `stage.submit` names).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from opentelemetry import context, trace
from opentelemetry.propagate import extract, inject

from trellis.core.errors import ConfigError

OTLP_PROTOCOLS = ("grpc", "http/protobuf")


def setup_tracing(service: str) -> None:
    """Install a tracer provider for this process if TRELLIS_TRACE asks for one (ConfigError if
    it names no exporter, or the OTLP exporter is not installed)."""
    mode = os.environ.get("TRELLIS_TRACE", "")
    if not mode:
        return
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SimpleSpanProcessor,
        SpanProcessor,
    )

    processor: SpanProcessor
    if mode == "console":
        exporter = ConsoleSpanExporter(
            out=sys.stderr, formatter=lambda s: json.dumps(json.loads(s.to_json())) + "\n"
        )
        processor = SimpleSpanProcessor(exporter)
    elif mode == "otlp":  # batched: the step loop never waits for the network
        processor = BatchSpanProcessor(_otlp_exporter())
    else:
        raise ConfigError(f"TRELLIS_TRACE: expected 'console' or 'otlp' (or unset), got {mode!r}")
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)


def _otlp_exporter() -> Any:  # the exporter class is only known once imported
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"
    )
    if protocol not in OTLP_PROTOCOLS:
        raise ConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL: expected one of {OTLP_PROTOCOLS}, got {protocol!r}")
    try:
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:
        raise ConfigError(
            "TRELLIS_TRACE=otlp needs the OTLP exporter: pip install opentelemetry-exporter-otlp"
        ) from None
    return OTLPSpanExporter()  # the endpoint, headers and timeout from the OTEL_EXPORTER_OTLP_* variables


def flush_tracing() -> None:
    """Send the spans still batched (before a process leaves without interpreter teardown)."""
    flush = getattr(trace.get_tracer_provider(), "force_flush", None)
    if flush is not None:
        flush()


def step_tracer(name: str) -> trace.Tracer | None:
    """A tracer for the per-step spans, or None when tracing is off: the step loop checks for None
    once per step and does nothing else, so tracing costs nothing unless TRELLIS_TRACE is set."""
    return trace.get_tracer(name) if os.environ.get("TRELLIS_TRACE") else None


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
