"""The keyless listener: a thin asyncio adapter over the sans-I/O protocol core.

Each TLS connection is an ``asyncio.Protocol`` (measured faster than streams here)
that feeds bytes to a ``KeylessConnection`` and acts on its events. Requests are
pipelined: each is handed to the router at once and answered whenever its signer
answers, in any order, with its id echoed. Answers produced in one event-loop
iteration are written together, which makes fewer, larger TLS records.

Backpressure: a connection with ``max_conn_pending_requests`` requests in flight, or
any connection while the whole gateway has ``max_pending_requests``, stops reading
until answers drain; TCP then pushes back on the client, as gokeyless does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from gateway.dispatch import (
    DECRYPT_OPCODES,
    RESPONSE_OPCODES,
    SIGN_ALGORITHMS,
    keyless_error,
    request_id_of,
)
from gateway.metrics import NO_ERROR, GatewayMetrics
from gateway.protocol import (
    BadRequest,
    ConnectionClosed,
    ErrorCode,
    KeylessConnection,
    Op,
    Operation,
    Request,
    encode_error,
    encode_pong,
    encode_response,
    error_name,
    op_name,
    op_type,
)
from gateway.router import Route, Router
from gateway.tls_transport import TLSServerProtocol
from gateway.tracing import end_request_span, start_request_span
from signer.common.spans import span_ids
from signer.common.telemetry import DISABLED, Telemetry
from signer.common.tls import peer_identity
from signer.encoding import decrypt_body, sign_body
from signer.v1 import signer_pb2 as pb

log = logging.getLogger("keyward.gateway")

_NAMES: dict[int, tuple[str, str]] = {}


def _names(opcode: int) -> tuple[str, str]:
    """gokeyless's opcode name and metric type for ``opcode``, cached."""
    names = _NAMES.get(opcode)
    if names is None:
        names = (op_name(opcode), op_type(opcode))
        if len(_NAMES) < 256:
            _NAMES[opcode] = names
    return names


@dataclass(slots=True)
class Limits:
    max_conn_pending: int = 1024
    max_pending: int = 65536
    idle_timeout: float = 30.0
    drain_timeout: float = 5.0
    handshake_timeout: float = 10.0


@dataclass(slots=True)
class Stats:
    connections: int = 0
    requests: int = 0
    in_flight: int = 0
    errors_sent: int = 0
    handshake_failures: int = 0
    paused: set[KeylessProtocol] = field(default_factory=set)


class KeylessProtocol(asyncio.Protocol):
    __slots__ = (
        "_closing",
        "_conn",
        "_flush_scheduled",
        "_in_flight",
        "_last_activity",
        "_out",
        "_paused",
        "_server",
        "_transport",
        "peer",
    )

    def __init__(self, server: KeylessServer) -> None:
        self._server = server
        self._conn = KeylessConnection()
        self._transport: asyncio.Transport | None = None
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._in_flight = 0
        self._paused = False
        self._closing = False
        self._last_activity = time.monotonic()
        self.peer = "-"

    # -- asyncio callbacks -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; both have its methods.
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        ssl_obj = transport.get_extra_info("ssl_object")
        if isinstance(ssl_obj, ssl.SSLObject):
            der = ssl_obj.getpeercert(binary_form=True)
            self.peer = peer_identity(der)
            self._server.metrics.peer_certificate(der)
        self._server.connections.add(self)
        self._server.stats.connections += 1
        log.debug(
            "connection from %s",
            self.peer,
            extra={"peer": self.peer, "addr": str(transport.get_extra_info("peername"))},
        )

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self._server.metrics.failed_connection.inc()
        self._server.connections.discard(self)
        self._server.stats.paused.discard(self)
        self._transport = None
        log.debug("connection closed", extra={"peer": self.peer, "error": str(exc or "")})

    def eof_received(self) -> bool | None:
        for event in self._conn.receive_eof():
            if isinstance(event, ConnectionClosed) and not event.clean:
                log.debug("peer closed mid-packet", extra={"peer": self.peer})
        if self._in_flight:
            # Half-closed by the client: finish what it asked, then close.
            self._closing = True
            return True
        return None

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        self._last_activity = now
        server = self._server
        for event in self._conn.receive_data(data):
            if isinstance(event, Request):
                server.stats.requests += 1
                self._handle(event, now)
            elif isinstance(event, BadRequest):
                server.stats.requests += 1
                log.debug(
                    "bad request",
                    extra={"peer": self.peer, "reason": event.reason, "code": int(event.code)},
                )
                server.metrics.requests.inc(("OpBadRequest",))
                self._send_error(event.request_id, event.code)
                self._observe("unknown", self._server.metrics.error_label(event.code), now, now)

    # -- requests --------------------------------------------------------------------

    def _observe(self, op_kind: str, error: str, started: float, executed: float) -> None:
        m = self._server.metrics
        end = time.perf_counter()
        labels = (op_kind, error)
        m.exec_duration.observe(labels, end - executed)
        m.total_duration.observe(labels, end - started)

    def _handle(self, req: Request, now: float) -> None:
        op = req.operation
        opcode = op.opcode
        rid = req.request_id
        name, kind = _names(opcode)
        metrics = self._server.metrics
        metrics.requests.inc((name,))
        if opcode == Op.PING:
            self._write(encode_pong(rid, op.payload))
            self._observe(kind, NO_ERROR, now, now)
            return
        prepared = self._prepare(op, opcode)
        if isinstance(prepared, int):
            self._send_error(rid, prepared)
            self._observe(kind, metrics.error_label(prepared), now, now)
            return
        route, body = prepared
        self._begin()
        router = self._server.router
        if not self._server.telemetry.enabled:
            router.execute(route, body, self._completion(rid, op, kind, now, None))
            return
        span, parent = start_request_span(self._server.telemetry, op, name, rid, self.peer)
        router.execute(
            route,
            body,
            self._completion(rid, op, kind, now, span),
            parent,
            span_ids(span) if span is not None else None,
        )

    def _prepare(self, op: Operation, opcode: int) -> int | tuple[Route, bytes]:
        """The route and encoded Signer operation for a request, or the keyless error
        to send."""
        algorithm = SIGN_ALGORITHMS.get(opcode)
        decrypt = opcode in DECRYPT_OPCODES
        if algorithm is None and not decrypt:
            return (
                ErrorCode.UNEXPECTED_OPCODE if opcode in RESPONSE_OPCODES else ErrorCode.BAD_OPCODE
            )
        if not op.ski or not op.has_payload:
            # Without an SKI there is no key to use, and a sign or decrypt without a
            # payload item has nothing to work on: the request is malformed.
            return ErrorCode.FORMAT
        route = self._server.router.route(op.ski)
        if route is None:
            return ErrorCode.KEY_NOT_FOUND
        if decrypt:
            if not route.decrypt:
                return ErrorCode.CRYPTO
            return route, decrypt_body(op.ski, pb.DECRYPT_MODE_RAW, op.payload)
        if algorithm not in route.algorithms:
            return ErrorCode.CRYPTO
        return route, sign_body(op.ski, algorithm, op.payload)

    def _completion(
        self, rid: int, op: Operation, kind: str, started: float, span: Any
    ) -> Callable[[pb.OperationResult], None]:
        executed = time.perf_counter()

        def done(result: pb.OperationResult) -> None:
            self._end()
            metrics = self._server.metrics
            if result.WhichOneof("result") == "output":
                self._answer(encode_response(rid, result.output))
                self._observe(kind, NO_ERROR, started, executed)
                if span is not None:
                    end_request_span(span, None)
                return
            code = keyless_error(result.error.code)
            self._observe(kind, metrics.error_label(code), started, executed)
            if span is not None:
                end_request_span(span, code, result.error.message)
            # Identify the request for the operator: its id and key, the edge's
            # request_id (tag 0x16) and the peer certificate; never the payload.
            log.info(
                "request failed",
                extra={
                    "peer": self.peer,
                    "id": rid,
                    "opcode": op_name(op.opcode),
                    "ski": op.ski.hex(),
                    "request_id": request_id_of(op.req_context),
                    "sni": op.sni.decode(errors="replace"),
                    "code": error_name(code),
                    "status": result.error.code,
                    "detail": result.error.message,
                    "span": span,  # logged as trace_id and span_id when traced
                },
            )
            self._send_error(rid, code, answer=True)

        return done

    def _send_error(self, rid: int, code: int, *, answer: bool = False) -> None:
        """An error reply; ``answer``: a signer's (see :meth:`_answer`)."""
        self._server.stats.errors_sent += 1
        packet = encode_error(rid, code)
        if answer:
            self._answer(packet)
        else:
            self._write(packet)

    # -- flow control ------------------------------------------------------------------

    def _begin(self) -> None:
        self._in_flight += 1
        stats = self._server.stats
        stats.in_flight += 1
        limits = self._server.limits
        if not self._paused and (
            self._in_flight >= limits.max_conn_pending or stats.in_flight >= limits.max_pending
        ):
            self._pause()

    def _end(self) -> None:
        self._in_flight -= 1
        stats = self._server.stats
        stats.in_flight -= 1
        if stats.paused and stats.in_flight < self._server.limits.max_pending:
            for proto in list(stats.paused):
                if proto._in_flight < self._server.limits.max_conn_pending:
                    proto._resume()
        if self._closing and self._in_flight == 0:
            self._schedule_flush()

    def _pause(self) -> None:
        if self._transport is not None:
            log.debug(
                "reads paused",
                extra={
                    "peer": self.peer,
                    "in_flight": self._in_flight,
                    "total_in_flight": self._server.stats.in_flight,
                },
            )
            self._paused = True
            self._server.stats.paused.add(self)
            self._transport.pause_reading()

    def _resume(self) -> None:
        self._paused = False
        self._server.stats.paused.discard(self)
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    # -- output ------------------------------------------------------------------------

    def _write(self, packet: bytes) -> None:
        self._out.append(packet)
        self._schedule_flush()

    def _answer(self, packet: bytes) -> None:
        """A signer's answer: written at once when no other answer on this connection
        is due (nothing to coalesce it with: a lone request gets its answer a loop
        iteration sooner), coalesced with the others otherwise."""
        if self._in_flight or self._out or self._closing:
            self._write(packet)
            return
        t = self._transport
        if t is not None and not t.is_closing():
            t.write(packet)

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._server.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        t = self._transport
        if t is None or t.is_closing():
            self._out.clear()
            return
        if self._out:
            data = b"".join(self._out) if len(self._out) > 1 else self._out[0]
            self._out.clear()
            t.write(data)
        if self._closing and self._in_flight == 0:
            t.close()

    def close_when_idle(self, now: float) -> None:
        """Called by the server's sweeper: close after idle_timeout with nothing pending."""
        t = self._transport
        if t is None:
            return
        if self._in_flight == 0 and now - self._last_activity >= self._server.limits.idle_timeout:
            log.debug("closing idle connection", extra={"peer": self.peer})
            self._closing = True
            self._schedule_flush()

    def drain_and_close(self) -> None:
        self._closing = True
        if self._transport is not None:
            self._transport.pause_reading()
        self._schedule_flush()


class KeylessServer:
    def __init__(
        self,
        router: Router,
        ssl_context: ssl.SSLContext,
        limits: Limits,
        *,
        metrics: GatewayMetrics | None = None,
        telemetry: Telemetry = DISABLED,
    ) -> None:
        self.router = router
        self.metrics = metrics or GatewayMetrics()
        self.telemetry = telemetry
        self.ssl_context = ssl_context
        self.limits = limits
        self.stats = Stats()
        self.connections: set[KeylessProtocol] = set()
        self.loop = asyncio.get_running_loop()
        self._servers: list[asyncio.Server] = []
        self._sweeper: asyncio.Task[None] | None = None

    def _tls_protocol(self) -> TLSServerProtocol:
        return TLSServerProtocol(
            self.ssl_context,
            lambda: KeylessProtocol(self),
            self._handshake_failed,
            self.limits.handshake_timeout,
        )

    def _handshake_failed(self, reason: str) -> None:
        # A refused client certificate, a scanner, or a load balancer's TCP probe:
        # routine, so counted by reason and logged at debug level, not as an error.
        self.stats.handshake_failures += 1
        self.metrics.handshake_failures.inc((reason,))

    async def listen_tcp(self, host: str, port: int) -> int:
        srv = await self.loop.create_server(
            self._tls_protocol, host, port, backlog=1024, reuse_address=True
        )
        self._servers.append(srv)
        self._start_sweeper()
        return int(srv.sockets[0].getsockname()[1])

    async def listen_unix(self, path: str) -> None:
        srv = await self.loop.create_unix_server(self._tls_protocol, path)
        self._servers.append(srv)
        self._start_sweeper()

    def _start_sweeper(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_idle(), name="idle connections")

    async def _sweep_idle(self) -> None:
        interval = min(1.0, self.limits.idle_timeout / 4)
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for proto in list(self.connections):
                proto.close_when_idle(now)

    async def close(self) -> None:
        """Stop accepting, let in-flight requests finish (bounded), then close."""
        for srv in self._servers:
            srv.close()
        for proto in list(self.connections):
            proto.drain_and_close()
        end = time.monotonic() + self.limits.drain_timeout
        while self.connections and time.monotonic() < end:
            await asyncio.sleep(0.02)
        for proto in list(self.connections):
            if proto._transport is not None:
                proto._transport.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()

    def describe(self) -> str:
        return json.dumps({"connections": len(self.connections), "in_flight": self.stats.in_flight})
