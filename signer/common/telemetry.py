"""The one telemetry setup: OpenTelemetry tracing for every Keyward service.

Settings come from the service's ``tracing`` config section, and the standard
``OTEL_*`` environment variables win where they are set (``OTEL_TRACES_EXPORTER``,
``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``,
``OTEL_EXPORTER_OTLP_PROTOCOL``, ``OTEL_TRACES_SAMPLER_ARG``, ``OTEL_SERVICE_NAME``,
``OTEL_RESOURCE_ATTRIBUTES``), so Keyward drops into an existing OpenTelemetry setup.

Spans are exported in batches (BatchSpanProcessor) and sampled parent-based: a request
that arrives with a sampled parent (W3C ``traceparent`` in gRPC metadata or on a Stream
operation, or the edge's Jaeger context in keyless tag 0x15) is traced; a root request
is traced with probability ``sample_ratio``.

The hot paths check ``Telemetry.enabled`` before touching the OpenTelemetry API at all,
so with tracing off a request pays one attribute read.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
from collections.abc import Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    TraceFlags,
    Tracer,
    format_span_id,
    format_trace_id,
)

from signer.common.config import in_range, one_of, setting

log = logging.getLogger("keyward.telemetry")

EXPORTERS = ("none", "otlp", "otlp-grpc", "otlp-http", "console")


@dataclasses.dataclass(slots=True)
class TracingConfig:
    enabled: bool = setting(False, help="export traces (OTEL_TRACES_EXPORTER also turns it on)")
    exporter: str = setting(
        "otlp-grpc",
        help="otlp-grpc, otlp-http, console or none (OTEL_TRACES_EXPORTER and "
        "OTEL_EXPORTER_OTLP_PROTOCOL win)",
        check=one_of(*EXPORTERS),
    )
    endpoint: str | None = setting(
        None, help="OTLP endpoint (default: the exporter's, or OTEL_EXPORTER_OTLP_ENDPOINT)"
    )
    insecure: bool = setting(True, help="plain-text OTLP/gRPC to the collector")
    sample_ratio: float = setting(
        0.01,
        help="share of root requests traced (OTEL_TRACES_SAMPLER_ARG wins)",
        check=in_range(0.0, 1.0),
    )


class Telemetry:
    """What instrumented code needs: a tracer, and whether to bother."""

    def __init__(self, tracer: Tracer | None, sample_ratio: float, provider: Any = None) -> None:
        self.enabled = tracer is not None
        self.tracer: Tracer = tracer or trace.NoOpTracer()
        self.sample_ratio = sample_ratio
        self._provider = provider

    def sample_root(self) -> bool:
        """The root-span sampling decision, taken before any span work (cheap)."""
        return self.enabled and random.random() < self.sample_ratio  # noqa: S311 - sampling

    def shutdown(self) -> None:
        if self._provider is not None:
            self._provider.shutdown()


DISABLED = Telemetry(None, 0.0)


def setup_tracing(
    service_name: str, config: TracingConfig, *, env: Mapping[str, str] | None = None
) -> Telemetry:
    """Build the tracer provider for this process (or return DISABLED)."""
    env = os.environ if env is None else env
    exporter_name = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    enabled = config.enabled or (exporter_name not in ("", "none"))
    if exporter_name in ("", "otlp"):
        exporter_name = config.exporter
    if exporter_name == "otlp":
        exporter_name = "otlp-grpc"
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL"
    )
    if exporter_name.startswith("otlp") and protocol:
        exporter_name = "otlp-http" if protocol.startswith("http") else "otlp-grpc"
    if not enabled or exporter_name == "none":
        return DISABLED
    ratio = config.sample_ratio
    if "OTEL_TRACES_SAMPLER_ARG" in env:
        try:
            ratio = min(1.0, max(0.0, float(env["OTEL_TRACES_SAMPLER_ARG"])))
        except ValueError:
            log.warning("OTEL_TRACES_SAMPLER_ARG is not a number; using %s", ratio)

    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    resource = Resource.create({"service.name": env.get("OTEL_SERVICE_NAME", service_name)})
    provider = TracerProvider(resource=resource, sampler=ParentBased(TraceIdRatioBased(ratio)))
    exporter: SpanExporter
    if exporter_name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        exporter = ConsoleSpanExporter()
    elif exporter_name == "otlp-http":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as Http

        exporter = Http(endpoint=config.endpoint) if config.endpoint else Http()
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as Grpc

        exporter = (
            Grpc(endpoint=config.endpoint, insecure=config.insecure)
            if config.endpoint
            else Grpc(insecure=config.insecure)
        )
    provider.add_span_processor(BatchSpanProcessor(exporter))
    log.info("tracing on", extra={"exporter": exporter_name, "sample_ratio": ratio})
    return Telemetry(provider.get_tracer(service_name), ratio, provider)


def use_provider(provider: Any, service_name: str, sample_ratio: float = 1.0) -> Telemetry:
    """Telemetry over a provider the caller built (tests use an in-memory exporter)."""
    return Telemetry(provider.get_tracer(service_name), sample_ratio, provider)


# -- context propagation -------------------------------------------------------------


def traceparent(span: Any) -> str:
    """The W3C traceparent header value of ``span``."""
    ctx = span.get_span_context()
    flags = int(ctx.trace_flags)
    return f"00-{format_trace_id(ctx.trace_id)}-{format_span_id(ctx.span_id)}-{flags:02x}"


def context_from_traceparent(value: str) -> Context | None:
    """A parent context from a W3C traceparent value, or None if it is not one."""
    parts = value.split("-")
    if len(parts) < 4 or len(parts[1]) != 32 or len(parts[2]) != 16:
        return None
    try:
        trace_id, span_id, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3][:2], 16)
    except ValueError:
        return None
    return _remote(trace_id, span_id, flags)


def context_from_jaeger(data: bytes) -> Context | None:
    """A parent context from keyless tag 0x15: Jaeger binary or ``trace:span:parent:flags``.

    Binary (jaeger-client-go's SpanContext serialisation): trace id high (8 bytes),
    trace id low (8), span id (8), parent span id (8), flags (1), then baggage.
    """
    if not data:
        return None
    text = None
    if data[:1].isalnum() and b":" in data:
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError:
            text = None
    if text is not None:
        parts = text.strip().split(":")
        if len(parts) != 4:
            return None
        try:
            trace_id, span_id = int(parts[0], 16), int(parts[1], 16)
            flags = int(parts[3], 16)
        except ValueError:
            return None
        return _remote(trace_id, span_id, flags & 1)
    if len(data) < 33:
        return None
    trace_id = int.from_bytes(data[0:16], "big")
    span_id = int.from_bytes(data[16:24], "big")
    return _remote(trace_id, span_id, data[32] & 1)


def _remote(trace_id: int, span_id: int, flags: int) -> Context | None:
    if not trace_id or not span_id or trace_id >> 128 or span_id >> 64:
        return None
    span_ctx = SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags & 1))
    return trace.set_span_in_context(NonRecordingSpan(span_ctx))
