"""Tracing and log plumbing in one process: the SDK's in-memory exporter, the OTLP
encoder against the stock one, exports to a real OTLP receiver (gRPC and HTTP), the
OTEL_* variables, sampling, and trace ids in the log formatters.
"""

from __future__ import annotations

import http.server
import io
import json
import logging
import random
import threading
from collections.abc import Iterator, Sequence

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from otlp_receiver import OtlpReceiver

from gateway.protocol import Op, Operation
from gateway.tracing import end_request_span, start_request_span
from signer.common.logs import JSONFormatter, TextFormatter
from signer.common.otlp import EncodingBatchProcessor, SpanEncoder, encode_lean, encode_span
from signer.common.spans import LeanTracer, span_ids, start_child
from signer.common.telemetry import (
    DISABLED,
    Telemetry,
    TracingConfig,
    context_from_jaeger,
    context_from_traceparent,
    parse_traceparent,
    setup_tracing,
    traceparent,
    use_provider,
)

OTEL_VARIABLES = (
    "OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_TRACES_SAMPLER_ARG", "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES", "OTEL_SDK_DISABLED", "OTEL_EXPORTER_OTLP_INSECURE",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as r:
        yield r


def in_memory(ratio: float = 1.0) -> tuple[Telemetry, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "test"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return use_provider(provider, "test", ratio), exporter


def traced(receiver: OtlpReceiver, **settings: object) -> TracingConfig:
    values: dict[str, object] = {"enabled": True, "exporter": "otlp-grpc",
                                 "endpoint": receiver.endpoint, "insecure": True,
                                 "sample_ratio": 1.0}
    values.update(settings)
    return TracingConfig(**values)  # type: ignore[arg-type]


# -- the encoder ---------------------------------------------------------------------


def lean(exporter: InMemorySpanExporter, service: str = "lean") -> LeanTracer:
    return LeanTracer(Resource.create({"service.name": service}),
                      InstrumentationScope("keyward", "2"), SimpleSpanProcessor(exporter))


def varied_spans() -> list[ReadableSpan]:
    exporter = InMemorySpanExporter()
    for service in ("one", "two", "lean"):
        provider = TracerProvider(
            resource=Resource.create({"service.name": service, "n": 3, "ok": True}))
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        for scope, version in (("keyward", "1.0"), ("other", None)):
            tracer: trace.Tracer = provider.get_tracer(scope, version)
            if service == "lean":
                tracer = lean(exporter)
            remote = context_from_traceparent(
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
            root = tracer.start_span(
                "keyless OpECDSASignSHA256", kind=SpanKind.SERVER, context=remote,
                attributes={"s": "x" * 300, "i": -5, "big": 2**62, "f": 1.5, "b": False,
                            "strs": ("a", "b"), "ints": (1, 2, 3), "empty": ""})
            root.add_event("retry", {"attempt": 2, "why": "UNAVAILABLE"})
            root.add_event("bare")
            child = tracer.start_span("hsm operation", context=trace.set_span_in_context(root),
                                      links=[Link(root.get_span_context(), {"l": 1})])
            child.set_status(Status(StatusCode.ERROR, "CKR_DEVICE_ERROR"))
            child.end()
            root.set_status(Status(StatusCode.OK))
            root.end()
            for kind in SpanKind:
                tracer.start_span(f"kind {kind.name}", kind=kind).end()
    return list(exporter.get_finished_spans())


def test_the_fast_encoder_writes_what_the_stock_encoder_writes() -> None:
    spans = varied_spans()
    encoder = SpanEncoder()
    for batch in (spans, spans[:1], spans[3:9], []):
        ours = ExportTraceServiceRequest.FromString(encoder.encode(batch))
        assert ours == encode_spans(batch)
    # Twice, for the cached resource, scope and attribute encodings.
    assert ExportTraceServiceRequest.FromString(encoder.encode(spans)) == encode_spans(spans)


def test_spans_reach_an_otlp_grpc_collector(receiver: OtlpReceiver) -> None:
    tel = setup_tracing("keyward-test", traced(receiver), env={})
    op = Operation(opcode=Op.ECDSA_SIGN_SHA256, ski=b"\x01" * 20, payload=b"\x02" * 32,
                   sni=b"example.com")
    span, parent = start_request_span(tel, op, "OpECDSASignSHA256", 7, "CN=edge")
    assert span is not None and int(parent[-2:], 16) & 1  # sampled
    end_request_span(span, None)
    tel.shutdown()
    [got] = receiver.wait_for(lambda spans: spans or None)
    assert got.name == "keyless OpECDSASignSHA256"
    assert got.service == "keyward-test"
    assert got.kind == 2  # SERVER
    assert got.attributes == {
        "keyless.opcode": "OpECDSASignSHA256", "keyless.request.id": 7,
        "keyless.ski": "01" * 20, "tls.client.identity": "CN=edge",
        "keyless.sni": "example.com", "keyless.result": "ok"}
    assert parent.startswith(f"00-{got.trace_id}-{got.span_id}-")


def test_lean_spans_follow_the_tracing_api() -> None:
    exporter = InMemorySpanExporter()
    tracer = lean(exporter)
    sampled = context_from_traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    unsampled = context_from_traceparent(
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00")
    # Parent-based: an unsampled parent gives a span that records nothing.
    quiet = tracer.start_span("no", context=unsampled)
    assert not quiet.is_recording()
    assert quiet.get_span_context().trace_id == 0x0AF7651916CD43DD8448EB211C80319C
    quiet.end()
    span = tracer.start_span("yes", context=sampled, kind=SpanKind.SERVER,
                             attributes={"ok": 1, "bad": object(), "list": [1, 2]})  # type: ignore[dict-item]
    span.set_attribute("mixed", [1, "a"])  # type: ignore[list-item]  # not an OTel value
    span.set_attributes({"s": "x", "f": 0.5})
    span.set_status(Status(StatusCode.OK))
    span.set_status(StatusCode.ERROR, "ignored: OK is final")
    span.update_name("renamed")
    with tracer.start_as_current_span("child") as child:
        assert trace.get_current_span() is child
        try:
            raise RuntimeError("boom")
        except RuntimeError as e:
            child.record_exception(e)
    span.end()
    span.set_attribute("late", 1)  # after end: ignored
    assert not span.is_recording()
    child_span, parent_span = exporter.get_finished_spans()
    assert parent_span.name == "renamed"
    assert dict(parent_span.attributes or {}) == {"ok": 1, "list": (1, 2), "s": "x", "f": 0.5}
    assert parent_span.status.status_code is StatusCode.OK
    assert parent_span.parent is not None and parent_span.parent.is_remote
    assert parent_span.get_span_context().trace_id == 0x0AF7651916CD43DD8448EB211C80319C
    assert child_span.parent is None  # use_span made "child" current, not the parent
    [event] = child_span.events
    assert event.name == "exception" and event.attributes
    assert event.attributes["exception.type"] == "RuntimeError"


def test_lean_spans_encode_as_any_span_does() -> None:
    exporter = InMemorySpanExporter()
    tracer = lean(exporter)
    remote = context_from_traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    root = tracer.start_span("keyless OpECDSASignSHA256", kind=SpanKind.SERVER,
                             attributes={"s": "x", "i": 7, "big": -(2**40), "b": True,
                                         "f": 2.5, "t": ("a", "b")})
    child = tracer.start_span("hsm operation", context=trace.set_span_in_context(root))
    child.set_status(Status(StatusCode.ERROR, "CKR_DEVICE_ERROR"))
    child.end()
    tracer.start_span("from the edge", context=remote, kind=SpanKind.CLIENT).end()
    with_event = tracer.start_span("with an event")
    with_event.add_event("retry", {"n": 1})
    with_event.end()
    root.set_status(Status(StatusCode.OK))
    root.end()
    spans = exporter.get_finished_spans()
    assert len(spans) == 4
    for span in spans:
        assert encode_lean(span) == encode_span(span)


def test_a_full_export_queue_drops_spans_and_counts_them() -> None:
    release = threading.Event()
    exported: list[int] = []

    class Slow(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            release.wait(10)
            exported.append(len(spans))
            return SpanExportResult.SUCCESS

    processor = EncodingBatchProcessor(Slow(), env={"OTEL_BSP_MAX_QUEUE_SIZE": "10",
                                                    "OTEL_BSP_SCHEDULE_DELAY": "60000"})
    tracer = LeanTracer(Resource.create({}), InstrumentationScope("t"), processor)
    for i in range(30):
        tracer.start_span(f"s{i}").end()
    assert processor.dropped >= 10  # at most 10 queued and 10 in the blocked export
    release.set()
    assert processor.force_flush(10_000)
    processor.shutdown()
    assert sum(exported) + processor.dropped == 30


# -- sampling ---------------------------------------------------------------------------


def test_the_root_sample_ratio_is_applied_once(receiver: OtlpReceiver) -> None:
    tel = setup_tracing("keyward-test", traced(receiver, sample_ratio=0.25), env={})
    random.seed(5)
    op = Operation(opcode=Op.ECDSA_SIGN_SHA256, ski=b"\x01" * 20, payload=b"\x02" * 32)
    recorded = 0
    for i in range(2000):
        span, parent = start_request_span(tel, op, "OpECDSASignSHA256", i, "-")
        if span is not None:
            assert span.is_recording()
            recorded += 1
            end_request_span(span, None)
        else:
            assert parent.endswith("-00")  # the signer is told: not sampled
    tel.shutdown()
    # 500 expected; a ratio applied twice would give about 125.
    assert 400 < recorded < 600


def test_an_unsampled_request_propagates_not_sampled() -> None:
    tel, exporter = in_memory(ratio=0.0)
    op = Operation(opcode=Op.ECDSA_SIGN_SHA256, ski=b"\x01" * 20, payload=b"\x02" * 32)
    span, parent = start_request_span(tel, op, "OpECDSASignSHA256", 1, "-")
    assert span is None
    ctx = trace.get_current_span(context_from_traceparent(parent)).get_span_context()
    assert ctx.is_valid and not ctx.trace_flags.sampled
    # The edge said "not sampled": its trace id travels on, still not sampled.
    edge = (0xABC).to_bytes(16, "big") + (0xDEF).to_bytes(8, "big") + bytes(8) + b"\x00"
    span, parent = start_request_span(tel, Operation(
        opcode=Op.ECDSA_SIGN_SHA256, ski=b"\x01" * 20, payload=b"", jaeger_span=edge),
        "OpECDSASignSHA256", 2, "-")
    assert span is None
    assert parent == f"00-{0xABC:032x}-{0xDEF:016x}-00"
    assert exporter.get_finished_spans() == ()


@pytest.mark.parametrize(("data", "expected"), [
    ((1 << 127 | 5).to_bytes(16, "big") + (9).to_bytes(8, "big") + bytes(8) + b"\x01"
     + bytes(4), (1 << 127 | 5, 9, True)),
    ((5).to_bytes(16, "big") + (9).to_bytes(8, "big") + bytes(8) + b"\x02", (5, 9, True)),
    ((5).to_bytes(16, "big") + (9).to_bytes(8, "big") + bytes(8) + b"\x00", (5, 9, False)),
    (b"abc123:def:0:1", (0xABC123, 0xDEF, True)),
    (b"abc123:def:0:3", (0xABC123, 0xDEF, True)),  # sampled and debug
    (b"abc123:def:0:0", (0xABC123, 0xDEF, False)),
    (b"0af7651916cd43dd8448eb211c80319c:b7ad6b7169203331:0:1",
     (0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, True)),
])
def test_jaeger_span_contexts_in_tag_0x15(data: bytes, expected: tuple[int, int, bool]) -> None:
    parent = context_from_jaeger(data)
    assert parent is not None
    ctx = trace.get_current_span(parent).get_span_context()
    assert (ctx.trace_id, ctx.span_id, ctx.trace_flags.sampled) == expected
    assert ctx.is_remote


@pytest.mark.parametrize("data", [
    b"", b"\x00" * 33, b"abc:def:0", b"xyz:def:0:1", b"abc:0:0:1", b"\x01" * 20,
    b"1" * 40 + b":1:0:1",  # a trace id over 128 bits
])
def test_malformed_jaeger_contexts_are_ignored(data: bytes) -> None:
    assert context_from_jaeger(data) is None


_TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.mark.parametrize(("value", "expected"), [
    (_TP, (0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, 1)),
    (_TP[:-2] + "00", (0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, 0)),
    ("01" + _TP[2:] + "-extra", (0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, 1)),
    (_TP.upper(), None),  # W3C: lowercase only
    ("ff" + _TP[2:], None),  # version ff is invalid
    (_TP + "x", None),
    (_TP[:-1], None),
    ("00-" + "0" * 32 + "-b7ad6b7169203331-01", None),
    ("00-0af7651916cd43dd8448eb211c80319c-" + "0" * 16 + "-01", None),
    ("00-+af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", None),
    ("", None),
])
def test_traceparent_parsing(value: str, expected: tuple[int, int, int] | None) -> None:
    ids = parse_traceparent(value)
    assert (ids[:3] if ids else None) == expected
    ctx = context_from_traceparent(value)
    assert (ctx is None) == (expected is None)


def test_lean_child_spans_need_no_context_objects() -> None:
    """start_child, Keyward's hot path, makes the spans the tracing API would make."""
    exporter = InMemorySpanExporter()
    tracer = LeanTracer(Resource.create({}), InstrumentationScope("t"), SimpleSpanProcessor(exporter))
    parent = parse_traceparent(_TP)
    assert parent is not None
    server = start_child(tracer, "server", parent, SpanKind.SERVER, {"a": 1})
    assert server is not None
    child = start_child(tracer, "child", span_ids(server), SpanKind.INTERNAL, {})
    assert child is not None
    assert start_child(tracer, "unsampled", (1, 2, 0, True), SpanKind.SERVER, {}) is None
    root = start_child(tracer, "root", None, SpanKind.SERVER, {})
    assert root is not None
    for span in (child, server, root):
        span.end()
    got = {s.name: s for s in exporter.get_finished_spans()}
    assert got["server"].context.trace_id == parent[0]
    assert got["server"].parent is not None and got["server"].parent.span_id == parent[1]
    assert got["server"].parent.is_remote
    assert got["child"].parent is not None
    assert got["child"].parent.span_id == got["server"].context.span_id
    assert not got["child"].parent.is_remote
    assert got["root"].parent is None
    assert got["server"].attributes == {"a": 1}
    assert traceparent(server) == f"00-{parent[0]:032x}-{got['server'].context.span_id:016x}-01"


# -- configuration and OTEL_* ---------------------------------------------------------


def test_otel_endpoint_variable_wins_over_the_config(
    receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    with OtlpReceiver() as other:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"http://{other.endpoint}")
        monkeypatch.setenv("OTEL_SERVICE_NAME", "edge-keyserver")
        tel = setup_tracing("keyward-test", traced(receiver))
        tel.tracer.start_span("x").end()
        tel.shutdown()
        [got] = other.wait_for(lambda spans: spans or None)
        assert got.service == "edge-keyserver"
    assert receiver.spans() == []


def test_service_name_from_otel_resource_attributes(
    receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.name=kw-eu,deployment.environment=t")
    tel = setup_tracing("keyward-test", traced(receiver))
    tel.tracer.start_span("x").end()
    tel.shutdown()
    [got] = receiver.wait_for(lambda spans: spans or None)
    assert got.resource["service.name"] == "kw-eu"
    assert got.resource["deployment.environment"] == "t"


def test_otel_sdk_disabled_turns_tracing_off(
    receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert setup_tracing("keyward-test", traced(receiver)) is DISABLED
    monkeypatch.delenv("OTEL_SDK_DISABLED")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    assert setup_tracing("keyward-test", TracingConfig()).enabled


def test_otlp_http_to_a_bare_endpoint_posts_to_v1_traces() -> None:
    posts: list[tuple[str, str, int]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            posts.append((self.path, self.headers["Content-Type"], len(body)))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        tel = setup_tracing("keyward-test", TracingConfig(
            enabled=True, exporter="otlp-http",
            endpoint=f"http://127.0.0.1:{server.server_address[1]}"), env={})
        tel.tracer.start_span("x").end()
        tel.shutdown()
    finally:
        server.shutdown()
        server.server_close()
    assert [(path, ctype) for path, ctype, _ in posts] == [
        ("/v1/traces", "application/x-protobuf")]


# -- logs ------------------------------------------------------------------------------


def _record(**extra: object) -> logging.LogRecord:
    record = logging.LogRecord("keyward.gateway", logging.INFO, __file__, 1, "request failed",
                               None, None)
    record.__dict__.update(extra)
    return record


def test_logs_carry_the_trace_and_span_of_a_traced_request() -> None:
    tel, _ = in_memory()
    span = tel.tracer.start_span("keyless OpECDSASignSHA256")
    ids = {"trace_id": f"{span.get_span_context().trace_id:032x}",
           "span_id": f"{span.get_span_context().span_id:016x}"}
    out = json.loads(JSONFormatter().format(_record(span=span, ski="ab", request_id="r1")))
    assert out["msg"] == "request failed"
    assert {k: out[k] for k in ("trace_id", "span_id", "ski", "request_id")} == {
        **ids, "ski": "ab", "request_id": "r1"}
    assert "span" not in out
    text = TextFormatter("%(message)s").format(_record(span=span))
    assert text == f"request failed trace_id={ids['trace_id']} span_id={ids['span_id']}"
    # Not traced: no ids, and no "span=None" either.
    out = json.loads(JSONFormatter().format(_record(span=None, ski="ab")))
    assert "trace_id" not in out and "span" not in out
    # Logged inside an active span, without passing one: the current span's ids.
    with trace.use_span(span):
        out = json.loads(JSONFormatter().format(_record()))
    assert (out["trace_id"], out["span_id"]) == (ids["trace_id"], ids["span_id"])
    span.end()


def test_a_json_exception_log_is_one_line() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JSONFormatter())
    log = logging.getLogger("keyward.test.json")
    log.addHandler(handler)
    log.propagate = False
    try:
        try:
            raise ValueError("bad thing")
        except ValueError:
            log.exception("it failed", extra={"ski": "cd"})
    finally:
        log.removeHandler(handler)
    [line] = stream.getvalue().splitlines()
    out = json.loads(line)
    assert out["error"] == "ValueError: bad thing"
    assert "Traceback" in out["traceback"] and out["ski"] == "cd"
