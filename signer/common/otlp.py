"""A faster OTLP/gRPC span exporter: the stock exporter with its encoder replaced.

opentelemetry-exporter-otlp's encoder builds a protobuf message object per span, per
attribute and per value before serialising them, which costs about as much CPU again
as making the span (some 40 µs a span here): at full sampling that alone took a tenth
of Keyward's keyless throughput. This module writes the same bytes directly, following
``opentelemetry/proto/trace/v1/trace.proto``, and hands them to the stock exporter's
gRPC call, so retries, headers, TLS, compression and timeouts stay the exporter's own.
Resources and instrumentation scopes, the same for every span of a process, are
encoded once. ``tests/test_telemetry.py`` checks the output against the stock
encoder's, message for message.

If the installed exporter lacks the two hooks used here (``_translate_data`` and
``_initialize_channel_and_stub``), :func:`otlp_grpc_exporter` returns the stock one.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor

from signer.common.spans import LeanSpan

log = logging.getLogger("keyward.telemetry")

_EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
_KINDS = {0: 1, 1: 2, 2: 3, 3: 4, 4: 5}  # SDK SpanKind value -> proto SpanKind
# SpanFlags: the parent's is_remote is known (0x100), and it was remote (0x200).
_HAS_IS_REMOTE = 0x100
_IS_REMOTE = 0x200
_pack_q = struct.Struct("<Q").pack
_pack_d = struct.Struct("<d").pack
_pack_i = struct.Struct("<I").pack


def _varint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _len(field: int, data: bytes) -> bytes:
    """A length-delimited field (tag, length, bytes)."""
    n = len(data)
    return bytes((field << 3 | 2,)) + (bytes((n,)) if n < 0x80 else _varint(n)) + data


def _str(field: int, text: str) -> bytes:
    return _len(field, text.encode()) if text else b""


def _any(value: Any) -> bytes:
    """An AnyValue message's bytes (TypeError for a type OTLP has no value for)."""
    if value is None:
        return b""
    if isinstance(value, str):
        return _len(1, value.encode())
    if isinstance(value, bool):
        return b"\x10" + (b"\x01" if value else b"\x00")
    if isinstance(value, int):
        return b"\x18" + _varint(value & 0xFFFF_FFFF_FFFF_FFFF)
    if isinstance(value, float):
        return b"\x21" + _pack_d(value)
    if isinstance(value, bytes):
        return _len(7, value)
    if isinstance(value, Sequence):
        return _len(5, b"".join(_len(1, _any(v)) for v in value))
    if isinstance(value, Mapping):
        return _len(6, b"".join(_len(1, _kv(str(k), v)) for k, v in value.items()))
    raise TypeError(f"no OTLP value for {type(value).__name__}")


def _kv(key: str, value: Any) -> bytes:
    return _len(1, key.encode()) + _len(2, _any(value))


# Encoded attribute fields by (field, key, value) for string and bool values: most of
# Keyward's attributes repeat (opcode, key, mechanism, token, peer, result).
_CACHE: dict[tuple[int, str, Any, type], bytes] = {}
_CACHE_MAX = 4096
_CACHED_TYPES = (str, bool, int)


def _attributes(field: int, attributes: Mapping[str, Any] | None) -> bytes:
    if not attributes:
        return b""
    # The SDK's BoundedAttributes is a Mapping over a plain dict; iterate the dict.
    items = (
        attributes if type(attributes) is dict else getattr(attributes, "_dict", attributes)
    ).items()
    cache = _CACHE
    out = []
    for k, v in items:
        kind = type(v)
        cacheable = kind in _CACHED_TYPES and (kind is not int or -1 <= v < 1024)
        if cacheable:
            hit = cache.get((field, k, v, kind))
            if hit is not None:
                out.append(hit)
                continue
        try:
            encoded = _len(field, _kv(k, v))
        except TypeError:
            continue  # dropped, as the stock encoder drops it
        if cacheable:
            if len(cache) >= _CACHE_MAX:
                cache.clear()
            cache[(field, k, v, kind)] = encoded
        out.append(encoded)
    return b"".join(out)


# Span.attributes (field 9) for lean spans, whose values are always of an allowed type:
# a KeyValue per attribute, from a cache for repeating (key, value) pairs and from the
# key's cached prefix otherwise (request ids, timings).
_SPAN_ATTRS: dict[tuple[str, Any], bytes] = {}
_KEY_PREFIX: dict[str, bytes] = {}


def _span_attributes(attributes: dict[str, Any]) -> bytes:
    cache = _SPAN_ATTRS
    out = []
    for item in attributes.items():
        kind = type(item[1])
        if kind is str or (kind is bool):
            hit = cache.get(item if kind is str else (item[0], (item[1],)))
            if hit is not None:
                out.append(hit)
                continue
        key, value = item
        prefix = _KEY_PREFIX.get(key)
        if prefix is None:
            prefix = _KEY_PREFIX[key] = _len(1, key.encode())
        if kind is int:
            any_value = b"\x18" + _varint(value & 0xFFFF_FFFF_FFFF_FFFF)
        elif kind is float:
            any_value = b"\x21" + _pack_d(value)
        else:
            try:
                any_value = _any(value)
            except TypeError:
                continue  # dropped, as the stock encoder drops it
        kv = prefix + b"\x12" + _varint(len(any_value)) + any_value
        encoded = b"\x4a" + _varint(len(kv)) + kv
        if kind is str or kind is bool:
            if len(cache) >= _CACHE_MAX:
                cache.clear()
            cache[item if kind is str else (key, (value,))] = encoded
        out.append(encoded)
    return b"".join(out)


def _trace_state(state: Any) -> str:
    return ",".join(f"{k}={v}" for k, v in state.items()) if state else ""


def _flags(context: Any) -> int:
    return _HAS_IS_REMOTE | (_IS_REMOTE if context is not None and context.is_remote else 0)


def _fields(span: ReadableSpan) -> tuple[Any, Sequence[Any], Sequence[Any], int, int, int]:
    """Attributes, events, links and the counts of those dropped, from the span's own
    storage when it has it (the SDK's public properties copy them, or wrap them in a
    proxy, on every read)."""
    try:
        attributes: Any = span._attributes
        events: Any = span._events
        links: Any = span._links
    except AttributeError:
        return (
            span.attributes,
            span.events,
            span.links,
            span.dropped_attributes,
            span.dropped_events,
            span.dropped_links,
        )
    # Bounded containers (the SDK's) count what they dropped; plain ones drop nothing.
    return (
        attributes,
        events,
        links,
        0 if type(attributes) is dict else getattr(attributes, "dropped", 0),
        0 if type(events) is list else getattr(events, "dropped", 0),
        0 if type(links) is tuple else getattr(links, "dropped", 0),
    )


_IDS = struct.Struct(">BBQQBBQ")  # trace id (16 bytes, as two halves) and span id
_PARENT = struct.Struct(">BBQ")
_IDS_PARENT = struct.Struct(">BBQQBBQBBQ")  # trace id, span id, parent span id
_TIMES = struct.Struct("<BQBQ")
_FLAGS_LOCAL = b"\x85\x01" + _pack_i(_HAS_IS_REMOTE)
_FLAGS_REMOTE = b"\x85\x01" + _pack_i(_HAS_IS_REMOTE | _IS_REMOTE)
# Per-span constants worth remembering: name and kind, and the status.
_HEADS: dict[tuple[str, Any], bytes] = {}
_STATUSES: dict[tuple[int, str], bytes] = {}


def _head(name: str, kind: Any) -> bytes:
    hit = _HEADS.get((name, kind))
    if hit is None:
        hit = _str(5, name) + b"\x30" + bytes((_KINDS[kind.value],))
        if len(_HEADS) < _CACHE_MAX:
            _HEADS[(name, kind)] = hit
    return hit


def _status(code: int, description: str) -> bytes:
    hit = _STATUSES.get((code, description))
    if hit is None:
        hit = _len(15, _str(2, description) + (b"\x18" + _varint(code) if code else b""))
        if len(_STATUSES) < _CACHE_MAX:
            _STATUSES[(code, description)] = hit
    return hit


def encode_span(span: ReadableSpan) -> bytes:
    """One Span message's bytes."""
    ctx = span.get_span_context()
    assert ctx is not None
    parent = span.parent
    attributes, events, links, dropped_attributes, dropped_events, dropped_links = _fields(span)
    trace_id = ctx.trace_id
    out = [
        _IDS.pack(0x0A, 16, trace_id >> 64, trace_id & 0xFFFF_FFFF_FFFF_FFFF, 0x12, 8, ctx.span_id)
    ]
    if ctx.trace_state:
        out.append(_str(3, _trace_state(ctx.trace_state)))
    if parent is not None:
        out.append(_PARENT.pack(0x22, 8, parent.span_id))
    out.append(_head(span.name, span.kind))
    out.append(_TIMES.pack(0x39, span.start_time or 0, 0x41, span.end_time or 0))
    if attributes:
        out.append(_attributes(9, attributes))
    if dropped_attributes:
        out.append(b"\x50" + _varint(dropped_attributes))
    for event in events if len(events) else ():
        body = (
            b"\x09"
            + _pack_q(event.timestamp or 0)
            + _str(2, event.name)
            + _attributes(3, event.attributes)
        )
        dropped = getattr(event, "dropped_attributes", 0)
        if dropped:
            body += b"\x20" + _varint(dropped)
        out.append(_len(11, body))
    if dropped_events:
        out.append(b"\x60" + _varint(dropped_events))
    for link in links if len(links) else ():
        lc = link.context
        body = (
            b"\x0a\x10"
            + lc.trace_id.to_bytes(16, "big")
            + b"\x12\x08"
            + lc.span_id.to_bytes(8, "big")
            + _str(3, _trace_state(lc.trace_state))
            + _attributes(4, link.attributes)
        )
        if link.dropped_attributes:
            body += b"\x28" + _varint(link.dropped_attributes)
        body += b"\x35" + _pack_i(_flags(lc))
        out.append(_len(13, body))
    if dropped_links:
        out.append(b"\x70" + _varint(dropped_links))
    status = span.status
    if status is not None:
        out.append(_status(status.status_code.value, status.description or ""))
    out.append(_FLAGS_REMOTE if parent is not None and parent.is_remote else _FLAGS_LOCAL)
    return b"".join(out)


_UNSET_STATUS = _len(15, b"")


def encode_lean(span: Any) -> bytes:
    """:func:`encode_span` for a :class:`signer.common.spans.LeanSpan`, reading the ids
    it keeps as integers rather than through SpanContext's properties."""
    trace_id, span_id, parent_id, remote = span._ids
    high, low = trace_id >> 64, trace_id & 0xFFFF_FFFF_FFFF_FFFF
    state = span._state
    if parent_id is not None and not state:  # the usual case: one pack for all ids
        out = [_IDS_PARENT.pack(0x0A, 16, high, low, 0x12, 8, span_id, 0x22, 8, parent_id)]
    else:
        out = [_IDS.pack(0x0A, 16, high, low, 0x12, 8, span_id)]
        if state:
            out.append(_str(3, _trace_state(state)))
        if parent_id is not None:
            out.append(_PARENT.pack(0x22, 8, parent_id))
    out.append(_head(span._name, span._kind))
    out.append(_TIMES.pack(0x39, span._start_time, 0x41, span._end_time))
    attributes = span._lean_attributes
    if attributes:
        out.append(_span_attributes(attributes))
    if span._events or span._links:
        return encode_span(span)  # rare in Keyward: the general path
    status = span._status
    if status.status_code.value == 0 and not status.description:
        out.append(_UNSET_STATUS)
    else:
        out.append(_status(status.status_code.value, status.description or ""))
    out.append(_FLAGS_REMOTE if remote else _FLAGS_LOCAL)
    return b"".join(out)


class SpanEncoder:
    """ExportTraceServiceRequest bytes for a batch; resources and scopes cached."""

    def __init__(self) -> None:
        self._resources: dict[int, tuple[Any, bytes]] = {}
        self._scopes: dict[int, tuple[Any, bytes]] = {}

    def _resource(self, resource: Any) -> bytes:
        hit = self._resources.get(id(resource))
        if hit is None or hit[0] is not resource:
            body = _attributes(1, resource.attributes if resource is not None else None)
            hit = self._resources[id(resource)] = (resource, body)
        return hit[1]

    def _scope(self, scope: Any) -> bytes:
        hit = self._scopes.get(id(scope))
        if hit is None or hit[0] is not scope:
            body = _len(1, b"")
            if scope is not None:
                body = _len(
                    1,
                    _str(1, scope.name)
                    + _str(2, scope.version or "")
                    + _attributes(3, getattr(scope, "attributes", None)),
                )
            hit = self._scopes[id(scope)] = (scope, body)
        return hit[1]

    def encode(self, spans: Sequence[ReadableSpan]) -> bytes:
        return self.encode_parts(
            [(s.resource, s.instrumentation_scope, _len(2, encode_span(s))) for s in spans]
        )

    def encode_parts(self, parts: Sequence[tuple[Any, Any, bytes]]) -> bytes:
        """The request for spans already encoded: (resource, scope, bytes), the bytes
        being a ScopeSpans ``spans`` field (a Span, length-delimited as field 2)."""
        # Resource -> scope -> spans, in first-seen order (as the stock encoder does).
        by_id: dict[int, tuple[Any, dict[int, tuple[Any, list[bytes]]]]] = {}
        for resource, scope, data in parts:
            _, scopes = by_id.setdefault(id(resource), (resource, {}))
            scopes.setdefault(id(scope), (scope, []))[1].append(data)
        # Equal resources (or scopes) that are distinct objects share one entry, as in
        # the stock encoder; there are only a few groups, so comparing them is cheap.
        groups: list[tuple[Any, list[tuple[Any, list[bytes]]]]] = []
        for resource, scopes in by_id.values():
            same = next((g for g in groups if g[0] == resource), None)
            if same is None:
                same = (resource, [])
                groups.append(same)
            for scope, encoded in scopes.values():
                into = next((x for x in same[1] if x[0] == scope), None)
                if into is None:
                    same[1].append((scope, encoded))
                else:
                    into[1].extend(encoded)
        out = []
        for resource, scope_groups in groups:
            body = [_len(1, self._resource(resource))]
            for scope, encoded in scope_groups:
                schema = scope.schema_url if scope is not None else ""
                body.append(_len(2, self._scope(scope) + b"".join(encoded) + _str(3, schema or "")))
            body.append(_str(3, getattr(resource, "schema_url", "") or ""))
            out.append(_len(1, b"".join(body)))
        return b"".join(out)


class _RawStub:
    """The TraceService stub with the request passed through as bytes."""

    def __init__(self, channel: Any) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceResponse,
        )

        self.Export = channel.unary_unary(
            _EXPORT,
            request_serializer=None,
            response_deserializer=ExportTraceServiceResponse.FromString,
        )


class EncodedBatch(list[tuple[Any, Any, bytes]]):
    """Spans already encoded by :class:`EncodingBatchProcessor`."""


def otlp_grpc_exporter(**kwargs: Any) -> Any:
    """An OTLP/gRPC span exporter using :class:`SpanEncoder` (kwargs as the stock one);
    it also takes an :class:`EncodedBatch`. The stock exporter if its hooks are gone."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    if not all(
        hasattr(OTLPSpanExporter, h) for h in ("_translate_data", "_initialize_channel_and_stub")
    ):
        return OTLPSpanExporter(**kwargs)
    encoder = SpanEncoder()

    class FastOTLPSpanExporter(OTLPSpanExporter):
        fast = True

        def _translate_data(self, data: Sequence[ReadableSpan]) -> Any:
            if isinstance(data, EncodedBatch):
                return encoder.encode_parts(data)
            return encoder.encode(data)

        def _initialize_channel_and_stub(self) -> None:
            base: Any = super()
            base._initialize_channel_and_stub()
            me: Any = self
            me._client = _RawStub(self._channel)

    exporter: Any = FastOTLPSpanExporter(**kwargs)
    return exporter


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    try:
        value = int(env.get(name, default))
    except ValueError:
        return default
    return value if value > 0 else default


class EncodingBatchProcessor(SpanProcessor):
    """The BatchSpanProcessor's job, with each span encoded as it ends.

    The SDK's processor queues span objects and encodes whole batches on its worker
    thread, which then holds the GIL for milliseconds while the event loop waits, and
    encoding across that thread hand-off costs about twice as much CPU as in line. Here
    ``on_end`` encodes the span (some 8 µs) and queues its bytes; the worker only joins
    them and makes the gRPC call, with the GIL released. ``OTEL_BSP_SCHEDULE_DELAY``,
    ``OTEL_BSP_MAX_QUEUE_SIZE`` and ``OTEL_BSP_MAX_EXPORT_BATCH_SIZE`` apply as to the
    SDK's; a full queue drops spans (logged once, counted in ``dropped``).
    """

    def __init__(self, exporter: Any, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self._exporter = exporter
        self._delay = _env_int(env, "OTEL_BSP_SCHEDULE_DELAY", 5000) / 1000
        self._max_queue = _env_int(env, "OTEL_BSP_MAX_QUEUE_SIZE", 2048)
        self._max_batch = min(_env_int(env, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512), self._max_queue)
        self._queue: deque[tuple[Any, Any, bytes]] = deque()
        self._wake = threading.Event()
        self._flushes: deque[threading.Event] = deque()
        self._stopped = False
        self.dropped = 0
        self._worker = threading.Thread(target=self._run, name="keyward-span-export", daemon=True)
        self._worker.start()

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        if type(span) is not LeanSpan:  # lean spans are recorded only when sampled
            ctx = span.context
            if ctx is None or not ctx.trace_flags.sampled:
                return
        if self._stopped:
            return
        queue = self._queue
        if len(queue) >= self._max_queue:
            self.dropped += 1
            if self.dropped == 1:
                log.warning(
                    "span export queue full (%d spans): dropping spans; "
                    "OTEL_BSP_MAX_QUEUE_SIZE raises the limit",
                    self._max_queue,
                )
            return
        if type(span) is LeanSpan:
            data = encode_lean(span)
            # A ScopeSpans.spans element (field 2); the span's resource and scope,
            # read without the properties' indirection.
            entry = b"\x12" + _varint(len(data)) + data
            queue.append((span._resource, span._instrumentation_scope, entry))
        else:
            data = encode_span(span)
            queue.append((span.resource, span.instrumentation_scope, _len(2, data)))
        if len(queue) == self._max_batch:
            self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait(self._delay)
            self._wake.clear()
            self._drain()
            while self._flushes:
                self._flushes.popleft().set()
            if self._stopped:
                self._drain()
                return

    def _drain(self) -> None:
        queue = self._queue
        while queue:
            batch = EncodedBatch()
            for _ in range(min(self._max_batch, len(queue))):
                batch.append(queue.popleft())
            try:
                self._exporter.export(batch)
            except Exception:
                log.exception("exporting spans failed")

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        if self._stopped:
            return not self._queue
        done = threading.Event()
        self._flushes.append(done)
        self._wake.set()
        return done.wait(timeout_millis / 1000)

    def shutdown(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._wake.set()
        self._worker.join(timeout=30)
        self._exporter.shutdown()


def otlp_grpc_processor(**kwargs: Any) -> SpanProcessor:
    """The span processor for OTLP/gRPC export: :class:`EncodingBatchProcessor` over
    the fast exporter, or the SDK's BatchSpanProcessor if only the stock one works."""
    exporter = otlp_grpc_exporter(**kwargs)
    if getattr(exporter, "fast", False):
        return EncodingBatchProcessor(exporter)
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    return BatchSpanProcessor(exporter)
