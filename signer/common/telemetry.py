"""The one telemetry setup: OpenTelemetry tracing for every Keyward service.

Settings come from the service's ``tracing`` config section, and the standard
``OTEL_*`` environment variables win where they are set (``OTEL_TRACES_EXPORTER``,
``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``,
``OTEL_EXPORTER_OTLP_PROTOCOL``, ``OTEL_EXPORTER_OTLP_INSECURE``,
``OTEL_TRACES_SAMPLER_ARG``, ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, and
``OTEL_SDK_DISABLED=true`` turns tracing off), so Keyward drops into an existing
OpenTelemetry setup. The exporters read the rest of their variables themselves
(headers, certificates, timeouts, compression; ``OTEL_BSP_*`` for batching).

Spans are exported in batches (BatchSpanProcessor) and sampled parent-based: a request
that arrives with a sampled parent (W3C ``traceparent`` in gRPC metadata or on a Stream
operation, or the edge's Jaeger context in keyless tag 0x15) is traced, one whose parent
says "not sampled" is not; a root request is traced with probability ``sample_ratio``.
That root decision is taken once, by :meth:`Telemetry.sample_root`, before any span is
built; the SDK's sampler then records every root it is asked for (a ratio sampler there
as well would apply the ratio twice: 1% of 1% at the default).

The hot paths check ``Telemetry.enabled`` before touching the OpenTelemetry API at all,
so with tracing off a request pays one attribute read.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import re
from collections.abc import Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import (
    Tracer,
)

from signer.common.config import in_range, one_of, setting
from signer.common.spans import LeanSpan, ParentIds, context_from_ids

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
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return DISABLED
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
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased

    # OTEL_SERVICE_NAME, then a service.name in OTEL_RESOURCE_ATTRIBUTES, then ours (the
    # SDK reads both variables itself; an attribute given here would override them).
    attributes = {"service.name": env.get("OTEL_SERVICE_NAME", service_name)}
    if "OTEL_SERVICE_NAME" not in env and any(
        part.split("=", 1)[0].strip() == "service.name"
        for part in env.get("OTEL_RESOURCE_ATTRIBUTES", "").split(",")
    ):
        attributes = {}
    resource = Resource.create(attributes)
    # Roots are sampled by Telemetry.sample_root (see the module docstring).
    provider = TracerProvider(resource=resource, sampler=ParentBased(ALWAYS_ON))
    processor: SpanProcessor
    endpoint = _endpoint(config, exporter_name, env)
    if exporter_name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        processor = BatchSpanProcessor(ConsoleSpanExporter())
    elif exporter_name == "otlp-http":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as Http

        processor = BatchSpanProcessor(Http(endpoint=endpoint))
    else:
        from signer.common.otlp import otlp_grpc_processor

        insecure_env = "OTEL_EXPORTER_OTLP_TRACES_INSECURE" in env or (
            "OTEL_EXPORTER_OTLP_INSECURE" in env
        )
        processor = otlp_grpc_processor(
            endpoint=endpoint, insecure=None if insecure_env else config.insecure
        )
    provider.add_span_processor(processor)
    log.info(
        "tracing on",
        extra={"exporter": exporter_name, "sample_ratio": ratio, "endpoint": endpoint or ""},
    )
    # Keyward's own spans (signer.common.spans) into the SDK's batch processor; the
    # provider is there for libraries that want one, and shuts the processor down.
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    from signer.common.spans import LeanTracer

    tracer = LeanTracer(resource, InstrumentationScope(service_name), processor)
    return Telemetry(tracer, ratio, provider)


def _endpoint(config: TracingConfig, exporter: str, env: Mapping[str, str]) -> str | None:
    """The config's endpoint, unless an OTEL_* variable names one (then the exporter
    reads that itself). For OTLP/HTTP a bare ``http://host:4318`` gets the traces path,
    as the variable's value would."""
    if "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT" in env or "OTEL_EXPORTER_OTLP_ENDPOINT" in env:
        return None
    endpoint = config.endpoint
    if endpoint and exporter == "otlp-http":
        if "://" not in endpoint:
            endpoint = "http://" + endpoint
        scheme, _, rest = endpoint.partition("://")
        if "/" not in rest.rstrip("/"):
            endpoint = f"{scheme}://{rest.rstrip('/')}/v1/traces"
    return endpoint


def use_provider(provider: Any, service_name: str, sample_ratio: float = 1.0) -> Telemetry:
    """Telemetry over a provider the caller built (tests use an in-memory exporter)."""
    return Telemetry(provider.get_tracer(service_name), sample_ratio, provider)


# -- context propagation -------------------------------------------------------------


def traceparent(span: Any) -> str:
    """The W3C traceparent header value of ``span``: flags ``01`` (sampled) or ``00``.

    Only the sampled bit is passed on (not level 2's "random" bit the SDK may set), so
    that ``-01`` means sampled to every reader."""
    if type(span) is LeanSpan:  # recording, so sampled; no SpanContext needed
        trace_id, span_id, _, _ = span._ids
        return f"00-{trace_id:032x}-{span_id:016x}-01"
    ctx = span.get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-0{int(ctx.trace_flags) & 1}"


def parse_traceparent(value: str) -> ParentIds | None:
    """(trace id, span id, flags, remote) from a W3C traceparent value, or None if it
    is not one (W3C: lowercase hex, ids not all zero, version ff invalid)."""
    m = _TRACEPARENT.match(value)
    if m is None or (len(value) > 55 and value[55] != "-") or value.startswith("ff"):
        return None
    trace_id, span_id = int(m.group(1), 16), int(m.group(2), 16)
    if not trace_id or not span_id:
        return None
    return trace_id, span_id, int(m.group(3), 16), True


_TRACEPARENT = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


def context_from_traceparent(value: str) -> Context | None:
    """A parent context from a W3C traceparent value, or None if it is not one."""
    ids = parse_traceparent(value)
    return None if ids is None else context_from_ids(ids)


def context_from_jaeger(data: bytes) -> Context | None:
    """A parent context from keyless tag 0x15 (see :func:`parse_jaeger`)."""
    ids = parse_jaeger(data)
    return None if ids is None else context_from_ids(ids)


def parse_jaeger(data: bytes) -> ParentIds | None:
    """The parent in keyless tag 0x15: Jaeger binary or ``trace:span:parent:flags``.

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
        return _ids(trace_id, span_id, _jaeger_sampled(flags))
    if len(data) < 33:
        return None
    trace_id = int.from_bytes(data[0:16], "big")
    span_id = int.from_bytes(data[16:24], "big")
    return _ids(trace_id, span_id, _jaeger_sampled(data[32]))


def _jaeger_sampled(flags: int) -> int:
    """Jaeger's flags: 1 sampled, 2 debug (which Jaeger always samples)."""
    return 1 if flags & 0b11 else 0


def _ids(trace_id: int, span_id: int, flags: int) -> ParentIds | None:
    if not trace_id or not span_id or trace_id >> 128 or span_id >> 64 or trace_id < 0:
        return None
    return trace_id, span_id, flags & 1, True


