"""The gateway's span per keyless request.

The span continues the edge's trace when the request carries a Jaeger span context
(tag 0x15, binary or ``trace:span:parent:flags``), and is a root otherwise, sampled
at the configured ratio. Its W3C traceparent rides on the Signer Stream operation, so
the signer's spans join the same trace. Attributes identify the request (opcode, SKI,
SNI, IPs, peer certificate, the edge's request id); payloads are never recorded.

A request that is not traced still carries a traceparent, flagged "not sampled", so the
signer follows the gateway's decision instead of sampling the operation as a root of
its own (which would make orphan signer traces, and more of them than configured).
"""

from __future__ import annotations

import ipaddress
import random
from typing import Any

from opentelemetry.trace import SpanKind, Status, StatusCode

from gateway.dispatch import request_id_of
from gateway.protocol import Operation, error_name
from signer.common.spans import start_child
from signer.common.telemetry import Telemetry, parse_jaeger, traceparent


def _ip(raw: bytes) -> str:
    try:
        return str(ipaddress.ip_address(raw))
    except ValueError:
        return ""


def start_request_span(
    tel: Telemetry, op: Operation, name: str, rid: int, peer: str
) -> tuple[Any, str]:
    """A recording span and its traceparent, or (None, a "not sampled" traceparent)."""
    parent = parse_jaeger(op.jaeger_span) if op.jaeger_span else None
    if parent is not None:
        if not parent[2] & 1:
            return None, f"00-{parent[0]:032x}-{parent[1]:016x}-00"
    elif not tel.sample_root():
        return None, unsampled_traceparent()
    attributes: dict[str, str | int] = {
        "keyless.opcode": name,
        "keyless.request.id": rid,
        "keyless.ski": op.ski.hex(),
        "tls.client.identity": peer,
    }
    if op.sni:
        attributes["keyless.sni"] = op.sni.decode(errors="replace")
    if op.client_ip:
        attributes["keyless.client_ip"] = _ip(op.client_ip)
    if op.server_ip:
        attributes["keyless.server_ip"] = _ip(op.server_ip)
    if op.req_context:
        attributes["keyless.request_id"] = request_id_of(op.req_context)
    span = start_child(tel.tracer, f"keyless {name}", parent, SpanKind.SERVER, attributes)
    return span, traceparent(span)


def unsampled_traceparent() -> str:
    """A fresh trace context that says "not sampled" (ids random, never zero)."""
    bits = random.getrandbits
    return f"00-{bits(128) | 1:032x}-{bits(64) | 1:016x}-00"


def end_request_span(span: Any, error_code: int | None, detail: str = "") -> None:
    if error_code is None:
        span.set_attribute("keyless.result", "ok")
    else:
        span.set_attribute("keyless.result", error_name(error_code))
        span.set_attribute("keyless.error_code", error_code)
        span.set_status(Status(StatusCode.ERROR, detail or error_name(error_code)))
    span.end()
