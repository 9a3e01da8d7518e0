"""A keyless-protocol client: async, pipelined, mutual TLS.

It speaks to any key server (Keyward's gateway or gokeyless) the way Cloudflare's edge
does: many requests in flight on one connection, answers matched by id. The tests,
``keyward ping``, ``keyward test-keyserver`` and ``keyward bench`` use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from types import TracebackType
from typing import Self, cast

from gateway.protocol import (
    ConnectionClosed,
    ErrorCode,
    KeylessConnection,
    Op,
    Operation,
    Response,
    encode_packet,
)


class KeylessError(Exception):
    """The key server answered with OpError; ``code`` is the keyless error code."""

    def __init__(self, code: int, message: str = "") -> None:
        try:
            name = ErrorCode(code).name
        except ValueError:
            name = f"0x{code:02x}"
        super().__init__(message or f"key server error {name} (0x{code:02x})")
        self.code = code


class KeylessClosed(ConnectionError):
    """The connection closed before the answer came."""


ResponseCallback = Callable[[Response | None], None]


class _ClientProtocol(asyncio.Protocol):
    def __init__(self, owner: KeylessClient) -> None:
        self.owner = owner
        self.conn = KeylessConnection(role="client")
        self.transport: asyncio.Transport | None = None
        # Packets submitted in one event-loop iteration leave in one write: one TLS
        # record and one send for a burst (a pipelining client answering a read full
        # of responses with as many new requests), which halves the work per request
        # at both ends compared with a write per packet.
        self.outbox: list[bytes] = []
        self.flush_scheduled = False

    def write(self, packet: bytes, *, alone: bool = False) -> None:
        """Queue ``packet``; ``alone`` (nothing else in flight on the connection, so
        nothing to coalesce it with) sends it at once instead."""
        if alone and not self.outbox and self.transport is not None:
            if not self.transport.is_closing():
                self.transport.write(packet)
            return
        self.outbox.append(packet)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self.flush_scheduled = False
        out = self.outbox
        if not out:
            return
        data = b"".join(out) if len(out) > 1 else out[0]
        out.clear()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; both have its methods.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        pending = self.owner._pending
        for event in self.conn.receive_data(data):
            if isinstance(event, Response):
                cb = pending.pop(event.request_id, None)
                if cb is not None:
                    cb(event)
            else:
                self.owner.protocol_errors += 1

    def eof_received(self) -> bool | None:
        for event in self.conn.receive_eof():
            if isinstance(event, ConnectionClosed):
                break
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner._lost(exc)


class KeylessClient:
    def __init__(self) -> None:
        self._proto: _ClientProtocol | None = None
        self._pending: dict[int, ResponseCallback] = {}
        self._next_id = 0
        self.closed = asyncio.Event()
        self.protocol_errors = 0

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext,
        *,
        server_hostname: str | None = None,
        timeout: float = 10.0,
    ) -> KeylessClient:
        self = cls()
        loop = asyncio.get_running_loop()
        _, proto = await asyncio.wait_for(
            loop.create_connection(
                lambda: _ClientProtocol(self),
                host,
                port,
                ssl=ssl_context,
                server_hostname=server_hostname or host,
            ),
            timeout,
        )
        self._proto = proto
        return self

    @classmethod
    async def connect_unix(
        cls, path: str, ssl_context: ssl.SSLContext, *, server_hostname: str, timeout: float = 10.0
    ) -> KeylessClient:
        self = cls()
        loop = asyncio.get_running_loop()
        _, proto = await asyncio.wait_for(
            loop.create_unix_connection(
                lambda: _ClientProtocol(self),
                path,
                ssl=ssl_context,
                server_hostname=server_hostname,
            ),
            timeout,
        )
        self._proto = proto
        return self

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def new_id(self) -> int:
        rid = self._next_id
        self._next_id = (rid + 1) & 0xFFFF_FFFF
        return rid

    def send_raw(self, data: bytes) -> None:
        """Write bytes as they are, now (tests use this for malformed packets)."""
        proto = self._proto
        if proto is None or proto.transport is None:
            raise KeylessClosed("not connected")
        proto.flush()  # whatever was submitted before goes first
        proto.transport.write(data)

    def submit(self, request_id: int, packet: bytes, callback: ResponseCallback) -> None:
        """Send an encoded packet; ``callback`` gets its Response, or None if the
        connection closes first. The low-level path the benchmark uses."""
        if self.closed.is_set():
            callback(None)
            return
        if request_id in self._pending:
            raise ValueError(f"request id {request_id} is already in flight")
        proto = self._proto
        if proto is None or proto.transport is None:
            raise KeylessClosed("not connected")
        alone = not self._pending
        self._pending[request_id] = callback
        proto.write(packet, alone=alone)

    async def request(self, op: Operation, *, timeout: float = 10.0) -> Response:
        """Send one operation and wait for its answer (OpError included)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Response | None] = loop.create_future()
        rid = self.new_id()

        def done(resp: Response | None) -> None:
            if not fut.done():
                fut.set_result(resp)

        self.submit(rid, encode_packet(rid, op), done)
        try:
            resp = await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            self._pending.pop(rid, None)
            raise
        if resp is None:
            raise KeylessClosed("connection closed before the answer")
        return resp

    async def call(self, op: Operation, *, timeout: float = 10.0) -> bytes:
        """Like request, but returns the payload and raises KeylessError on OpError."""
        resp = await self.request(op, timeout=timeout)
        if resp.opcode == Op.ERROR:
            raise KeylessError(resp.payload[0] if resp.payload else ErrorCode.FORMAT)
        return resp.payload

    async def ping(self, payload: bytes = b"", *, timeout: float = 10.0) -> bytes:
        resp = await self.request(Operation(opcode=Op.PING, payload=payload), timeout=timeout)
        if resp.opcode != Op.PONG:
            raise KeylessError(resp.payload[0] if resp.payload else ErrorCode.FORMAT)
        return resp.payload

    async def sign(self, opcode: int, ski: bytes, data: bytes, *, timeout: float = 10.0) -> bytes:
        return await self.call(Operation(opcode=opcode, ski=ski, payload=data), timeout=timeout)

    async def decrypt(
        self, ski: bytes, ciphertext: bytes, *, opcode: int = Op.RSA_DECRYPT, timeout: float = 10.0
    ) -> bytes:
        return await self.call(
            Operation(opcode=opcode, ski=ski, payload=ciphertext), timeout=timeout
        )

    def _lost(self, exc: Exception | None) -> None:
        self.closed.set()
        pending, self._pending = self._pending, {}
        for cb in pending.values():
            cb(None)

    async def close(self) -> None:
        if self._proto is not None and self._proto.transport is not None:
            self._proto.flush()
            self._proto.transport.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.closed.wait(), 5.0)
