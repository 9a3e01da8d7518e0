"""An OTLP/gRPC trace receiver for tests: the collector's TraceService, nothing else.

It implements ``opentelemetry.proto.collector.trace.v1.TraceService`` from the
opentelemetry-proto package on a plain gRPC server on 127.0.0.1, so services under
test export to it exactly as they would to an OpenTelemetry Collector. Every
``ExportTraceServiceRequest`` is kept twice: flattened into :class:`ReceivedSpan`
objects for assertions, and as the serialized bytes that came over the wire, so a
test can search everything that was exported.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as tpb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as tgrpc
from opentelemetry.proto.common.v1 import common_pb2

T = TypeVar("T")

# opentelemetry.proto.trace.v1.Span.SpanKind
KIND_INTERNAL = 1
KIND_SERVER = 2
KIND_CLIENT = 3
# opentelemetry.proto.trace.v1.Status.StatusCode
STATUS_ERROR = 2


def any_value(v: common_pb2.AnyValue) -> Any:
    which = v.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, which)


def attributes(kvs: Any) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in kvs}


@dataclass(frozen=True)
class ReceivedSpan:
    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits
    parent_span_id: str  # "" for a root span
    name: str
    kind: int
    attributes: dict[str, Any]
    events: list[tuple[str, dict[str, Any]]]
    status_code: int
    status_message: str
    resource: dict[str, Any]
    start_ns: int
    end_ns: int
    links: list[tuple[str, str]] = field(default_factory=list)

    @property
    def service(self) -> str:
        return str(self.resource.get("service.name", ""))


class _Servicer(tgrpc.TraceServiceServicer):
    def __init__(self, owner: OtlpReceiver) -> None:
        self.owner = owner

    def Export(
        self, request: tpb.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> tpb.ExportTraceServiceResponse:
        self.owner._add(request)
        return tpb.ExportTraceServiceResponse()


class OtlpReceiver:
    """``with OtlpReceiver() as r: ... r.endpoint ... r.wait_for(...)``."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._spans: list[ReceivedSpan] = []
        self._raw: list[bytes] = []
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        tgrpc.add_TraceServiceServicer_to_server(_Servicer(self), self._server)  # type: ignore[no-untyped-call]
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self.endpoint = f"127.0.0.1:{self.port}"

    def start(self) -> OtlpReceiver:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=1).wait()

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _add(self, request: tpb.ExportTraceServiceRequest) -> None:
        spans: list[ReceivedSpan] = []
        for rs in request.resource_spans:
            resource = attributes(rs.resource.attributes)
            for ss in rs.scope_spans:
                for s in ss.spans:
                    spans.append(
                        ReceivedSpan(
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_span_id=s.parent_span_id.hex(),
                            name=s.name,
                            kind=s.kind,
                            attributes=attributes(s.attributes),
                            events=[(e.name, attributes(e.attributes)) for e in s.events],
                            status_code=s.status.code,
                            status_message=s.status.message,
                            resource=resource,
                            start_ns=s.start_time_unix_nano,
                            end_ns=s.end_time_unix_nano,
                            links=[(ln.trace_id.hex(), ln.span_id.hex()) for ln in s.links],
                        )
                    )
        with self._lock:
            self._raw.append(request.SerializeToString())
            self._spans.extend(spans)
            self._lock.notify_all()

    # -- reading ---------------------------------------------------------------------

    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self._spans)

    def raw(self) -> list[bytes]:
        """Every ExportTraceServiceRequest received, serialized."""
        with self._lock:
            return list(self._raw)

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        return [s for s in self.spans() if s.trace_id == trace_id]

    def wait_for(self, found: Callable[[list[ReceivedSpan]], T | None], timeout: float = 20.0) -> T:
        """Wait until ``found(all spans so far)`` returns something other than None."""
        end = time.monotonic() + timeout
        with self._lock:
            while True:
                result = found(list(self._spans))
                if result is not None:
                    return result
                left = end - time.monotonic()
                if left <= 0:
                    names = sorted({(s.service, s.name) for s in self._spans})
                    raise TimeoutError(
                        f"spans not received within {timeout}s; "
                        f"have {len(self._spans)}: {names}"
                    )
                self._lock.wait(min(left, 0.5))
