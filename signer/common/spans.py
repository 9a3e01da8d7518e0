"""Keyward's own spans: the OpenTelemetry tracing API at a fraction of the SDK's cost.

The SDK's ``Tracer.start_span`` validates every attribute through a locked
``BoundedAttributes``, builds bounded lists for events and links and runs the sampler
and processors through several layers: some 25 µs a span here, three spans a keyless
request at full sampling. :class:`LeanTracer` implements the same ``Tracer`` and
``Span`` interfaces directly: parent-based sampling (a sampled parent is followed, an
unsampled one gives a non-recording span, a root is recorded: the root *ratio* is
decided by ``Telemetry.sample_root`` before any span is asked for), W3C ids and flags
as the SDK makes them, attributes in a plain dict (values of the types OpenTelemetry
allows; anything else is dropped, as the SDK drops it), at most 128 attributes, events
and links per span. Ended spans are handed to the SDK's own ``BatchSpanProcessor`` as
``ReadableSpan`` objects, so batching, the ``OTEL_BSP_*`` settings and every exporter
work unchanged.
"""

from __future__ import annotations

import random
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)
from opentelemetry.util import types
from opentelemetry.util._decorator import _agnosticcontextmanager

LIMIT = 128
_PRIMITIVE = frozenset((str, bool, int, float, bytes))
_UNSET = Status(StatusCode.UNSET)
_EMPTY_STATE = TraceState()
# Sampled. (The SDK also sets W3C level 2's "random trace id" bit; traceparent values
# Keyward sends carry the sampled bit only, which every level 1 reader understands.)
_ROOT_FLAGS = TraceFlags(0x01)


def _valid(value: object) -> bool:
    if type(value) in _PRIMITIVE:
        return True
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        kinds = {type(v) for v in value if v is not None}
        return len(kinds) <= 1 and kinds <= _PRIMITIVE
    return False


class LeanSpan(trace.Span, ReadableSpan):
    """A recording span; a ``ReadableSpan`` once it has ended."""

    __slots__ = (
        "_attributes",
        "_context",
        "_end_time",
        "_events",
        "_ids",
        "_instrumentation_info",
        "_instrumentation_scope",
        "_kind",
        "_lean_attributes",
        "_lean_context",
        "_links",
        "_name",
        "_parent",
        "_resource",
        "_start_time",
        "_state",
        "_status",
        "_tracer",
    )

    def __init__(
        self,
        tracer: LeanTracer,
        name: str,
        context: SpanContext | None,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: dict[str, Any],
        links: Sequence[Link],
        start_time: int,
        ids: tuple[int, int, int | None, bool],
        state: TraceState = _EMPTY_STATE,
    ) -> None:
        # ReadableSpan.__init__ is bypassed: it would build a Resource per span.
        self._tracer = tracer
        # (trace id, span id, parent span id, parent is remote), for the encoder and
        # for contexts made only when asked for (start_child makes none).
        self._ids = ids
        self._state = state if context is None else context.trace_state
        self._lean_context = context
        self._lean_attributes = attributes
        self._name = name
        self._context = context
        self._parent = parent
        self._kind = kind
        self._attributes = attributes
        self._events: list[Event] = []
        self._links = links
        self._start_time = start_time
        self._end_time: int | None = None
        self._status = _UNSET
        self._resource = tracer.resource
        self._instrumentation_scope = tracer.scope
        self._instrumentation_info = None

    # -- the tracing API -----------------------------------------------------------

    def get_span_context(self) -> SpanContext:
        ctx = self._lean_context
        if ctx is None:
            trace_id, span_id, _, _ = self._ids
            ctx = SpanContext(trace_id, span_id, False, _ROOT_FLAGS, self._state)
            self._lean_context = self._context = ctx
        return ctx

    @property
    def context(self) -> SpanContext:  # ReadableSpan's, for exporters
        return self.get_span_context()

    @property
    def parent(self) -> SpanContext | None:
        trace_id, _, parent_id, remote = self._ids
        if self._parent is None and parent_id is not None:
            self._parent = SpanContext(trace_id, parent_id, remote, _ROOT_FLAGS, self._state)
        return self._parent

    def is_recording(self) -> bool:
        return self._end_time is None

    def set_attribute(self, key: str, value: types.AttributeValue) -> None:
        attributes = self._lean_attributes
        if (
            self._end_time is None
            and (len(attributes) < LIMIT or key in attributes)
            and (type(value) in _PRIMITIVE or _valid(value))
        ):
            attributes[key] = value if type(value) in _PRIMITIVE else tuple(value)  # type: ignore[arg-type]

    def set_attributes(self, attributes: Mapping[str, types.AttributeValue]) -> None:
        for key, value in attributes.items():
            self.set_attribute(key, value)

    def add_event(
        self, name: str, attributes: types.Attributes = None, timestamp: int | None = None
    ) -> None:
        if self._end_time is None and len(self._events) < LIMIT:
            clean = {k: v for k, v in (attributes or {}).items() if _valid(v)}
            self._events.append(Event(name, clean, timestamp or time.time_ns()))

    def add_link(self, context: SpanContext, attributes: types.Attributes = None) -> None:
        if self._end_time is None and context.is_valid and len(self._links) < LIMIT:
            self._links = (*self._links, Link(context, attributes))

    def update_name(self, name: str) -> None:
        if self._end_time is None:
            self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        if self._end_time is not None or self._status.status_code is StatusCode.OK:
            return  # OK is final, as in the SDK
        if isinstance(status, Status):
            self._status = status
        else:
            self._status = Status(status, description)

    def record_exception(
        self,
        exception: BaseException,
        attributes: types.Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        fields: dict[str, Any] = {
            "exception.type": type(exception).__name__,
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        fields.update(attributes or {})
        self.add_event("exception", fields, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self._end_time is not None:
            return
        self._end_time = end_time or time.time_ns()
        self._tracer.processor.on_end(self)

    # -- ReadableSpan, read by the exporters once the span has ended ----------------

    @property
    def events(self) -> Sequence[Event]:
        return tuple(self._events)

    def __repr__(self) -> str:
        return f"LeanSpan({self._name!r}, {self._context!r})"


class LeanTracer(trace.Tracer):
    def __init__(self, resource: Resource, scope: InstrumentationScope, processor: Any) -> None:
        self.resource = resource
        self.scope = scope
        self.processor = processor  # a SpanProcessor: on_end(ReadableSpan)

    def start_span(
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: types.Attributes = None,
        links: Sequence[Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> trace.Span:
        parent = trace.get_current_span(context).get_span_context()
        bits = random.getrandbits
        span_id = bits(64) or 1
        if parent.is_valid:
            trace_id = parent.trace_id
            if not parent.trace_flags.sampled:
                # Parent-based: not sampled upstream, not recorded here either.
                return NonRecordingSpan(
                    SpanContext(trace_id, span_id, False, parent.trace_flags, parent.trace_state)
                )
            ctx = SpanContext(trace_id, span_id, False, parent.trace_flags, parent.trace_state)
            parent_ctx: SpanContext | None = parent
            ids: tuple[int, int, int | None, bool] = (
                trace_id,
                span_id,
                parent.span_id,
                parent.is_remote,
            )
        else:
            trace_id = bits(128) or 1
            ctx = SpanContext(trace_id, span_id, False, _ROOT_FLAGS, _EMPTY_STATE)
            parent_ctx = None
            ids = (trace_id, span_id, None, False)
        clean: dict[str, Any] = {}
        if attributes:
            primitive = _PRIMITIVE
            for key, value in attributes.items():
                if type(value) in primitive:
                    clean[key] = value
                elif _valid(value):
                    clean[key] = tuple(value)  # type: ignore[arg-type]  # a sequence
        return LeanSpan(
            self,
            name,
            ctx,
            parent_ctx,
            kind,
            clean,
            tuple(x for x in links or () if x.context.is_valid) if links else (),
            start_time or time.time_ns(),
            ids,
        )

    @_agnosticcontextmanager  # what the API's Tracer declares
    def start_as_current_span(
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: types.Attributes = None,
        links: Sequence[Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
        end_on_exit: bool = True,
    ) -> Iterator[trace.Span]:
        span = self.start_span(name, context, kind, attributes, links, start_time)
        with trace.use_span(
            span,
            end_on_exit=end_on_exit,
            record_exception=record_exception,
            set_status_on_exception=set_status_on_exception,
        ) as current:
            yield current


# (trace id, span id, trace flags, is remote): a parent as Keyward's own code knows it,
# parsed from a traceparent or a Jaeger context, or taken from a span it just made.
ParentIds = tuple[int, int, int, bool]


def span_ids(span: Any) -> ParentIds:
    """``span`` as a parent for :func:`start_child`."""
    if type(span) is LeanSpan:
        trace_id, span_id, _, _ = span._ids
        return trace_id, span_id, 1, False
    ctx = span.get_span_context()
    return ctx.trace_id, ctx.span_id, int(ctx.trace_flags), ctx.is_remote


def start_child(
    tracer: trace.Tracer,
    name: str,
    parent: ParentIds | None,
    kind: SpanKind,
    attributes: dict[str, Any],
) -> trace.Span | None:
    """Keyward's hot path for a span: a child of ``parent`` (a root if None), or None
    when the parent is not sampled (parent-based: not recorded here either).

    ``attributes`` must hold allowed values only (Keyward's own: str, int, bool,
    float); the dict becomes the span's. With a :class:`LeanTracer` no context object
    is made at all; any other tracer (the SDK's, in tests) gets the same span through
    the tracing API.
    """
    if parent is not None and not parent[2] & 1:
        return None
    if type(tracer) is LeanTracer:
        span_id = random.getrandbits(64) or 1
        if parent is None:
            trace_id = random.getrandbits(128) or 1
            ids: tuple[int, int, int | None, bool] = (trace_id, span_id, None, False)
        else:
            trace_id = parent[0]
            ids = (trace_id, span_id, parent[1], parent[3])
        return LeanSpan(tracer, name, None, None, kind, attributes, (), time.time_ns(), ids)
    context = context_from_ids(parent) if parent is not None else Context()
    return tracer.start_span(name, context=context, kind=kind, attributes=attributes)


def context_from_ids(parent: ParentIds) -> Context:
    """A fresh context holding only ``parent`` (not a copy of the current context), for
    the tracing API's ``context=`` arguments."""
    trace_id, span_id, flags, remote = parent
    span_ctx = SpanContext(trace_id, span_id, remote, TraceFlags(flags & 1))
    return trace.set_span_in_context(NonRecordingSpan(span_ctx), Context())
