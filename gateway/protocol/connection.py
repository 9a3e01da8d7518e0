"""The keyless connection state machine: bytes in, events out.

Sans-I/O in the h11 sense: the caller owns the socket, feeds whatever bytes it
read to :meth:`KeylessConnection.receive_data` and acts on the returned events;
replies are built with the ``encode_*`` functions and written by the caller.

Framing never depends on the body: the header's length field says where the
next packet starts whatever the body contains, so a malformed body (or an
unsupported major version) becomes a ``BadRequest``/``BadResponse`` event and
the stream carries on. That is the main behavioural departure from gokeyless,
which closes the connection on any parse error and so drops every other
request in flight on it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Literal, TypeAlias

from gateway.protocol.constants import ErrorCode, Op
from gateway.protocol.packet import HEADER_SIZE, Operation, ProtocolError, _decode_items

__all__ = [
    "BadRequest",
    "BadResponse",
    "ConnectionClosed",
    "Event",
    "KeylessConnection",
    "Request",
    "Response",
]


@dataclass(slots=True)
class Request:
    """A well-formed request packet (server role)."""

    request_id: int
    operation: Operation


@dataclass(slots=True)
class BadRequest:
    """A correctly framed packet that cannot be a request (server role).

    ``code`` is what to answer with: ``VERSION_MISMATCH`` for a major version
    other than 1 (as the C server does), otherwise ``FORMAT``. The connection
    stays usable.
    """

    request_id: int
    code: ErrorCode
    reason: str


@dataclass(slots=True)
class Response:
    """A well-formed reply packet (client role).

    For ``Op.ERROR`` the payload is guaranteed to be exactly the 1-byte code.
    """

    request_id: int
    opcode: int
    payload: bytes

    @property
    def error_code(self) -> int | None:
        """The error code of an ``Op.ERROR`` reply, else ``None``."""
        if self.opcode == Op.ERROR and len(self.payload) == 1:
            return self.payload[0]
        return None


@dataclass(slots=True)
class BadResponse:
    """A correctly framed reply that is malformed (client role)."""

    request_id: int
    code: ErrorCode
    reason: str


@dataclass(slots=True)
class ConnectionClosed:
    """The peer closed its side. ``clean`` is False if it stopped mid-packet."""

    clean: bool


Event: TypeAlias = Request | BadRequest | Response | BadResponse | ConnectionClosed

_unpack_header = struct.Struct(">BBHI").unpack_from
_VERSION_MISMATCH = ErrorCode.VERSION_MISMATCH
_FORMAT = ErrorCode.FORMAT
_OP_ERROR = int(Op.ERROR)


class KeylessConnection:
    """Incremental parser for one keyless byte stream.

    ``role="server"`` (default) parses requests into ``Request``/``BadRequest``;
    ``role="client"`` parses replies into ``Response``/``BadResponse``.

    ``receive_data`` never raises for any input bytes, and the events it
    returns depend only on the concatenated stream, not on how it was split.
    There is no body-size limit beyond the protocol's own (65535): the buffer
    can never hold more than one incomplete packet plus the last chunk.
    """

    __slots__ = ("_buf", "_client", "_closed", "_need")

    def __init__(self, role: Literal["server", "client"] = "server") -> None:
        if role not in ("server", "client"):
            raise ValueError(f"role must be 'server' or 'client', not {role!r}")
        self._client = role == "client"
        # Bytes of an incomplete packet carried over between calls.
        self._buf = bytearray()
        # How many buffered bytes the next packet needs before it is worth
        # parsing: 8 for a header, then header + body length. Checking this
        # first keeps a large packet trickling in byte by byte linear.
        self._need = HEADER_SIZE
        self._closed = False

    @property
    def role(self) -> Literal["server", "client"]:
        return "client" if self._client else "server"

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete packet."""
        return len(self._buf)

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Feed bytes read from the peer; return the events they complete.

        Data after :meth:`receive_eof` is ignored.
        """
        if self._closed or not data:
            return []
        buf = self._buf
        if buf:
            buf += data
            if len(buf) < self._need:
                return []
            # One copy per call (not per packet) so that every item slice
            # below is already `bytes`; the carried-over tail is re-added at
            # the end, which is the once-per-call compaction.
            data = bytes(buf)
            buf.clear()
        elif type(data) is not bytes:
            data = bytes(data)

        n = len(data)
        pos = 0
        events: list[Event] = []
        append = events.append
        client = self._client
        while n - pos >= HEADER_SIZE:
            major, _minor, length, request_id = _unpack_header(data, pos)
            end = pos + HEADER_SIZE + length
            if end > n:
                break
            body = pos + HEADER_SIZE
            pos = end
            if major != 1:
                # Like the C server: answer 0x04 under the packet's ID without
                # looking at the body. The minor version is ignored by both
                # peers, so it is here too.
                reason = f"unsupported major version {major}"
                append(
                    BadResponse(request_id, _VERSION_MISMATCH, reason)
                    if client
                    else BadRequest(request_id, _VERSION_MISMATCH, reason)
                )
                continue
            try:
                op = _decode_items(data, body, end)
            except ProtocolError as exc:
                append(
                    BadResponse(request_id, exc.code, exc.reason)
                    if client
                    else BadRequest(request_id, exc.code, exc.reason)
                )
                continue
            if not client:
                append(Request(request_id, op))
            elif op.opcode == _OP_ERROR and len(op.payload) != 1:
                # gokeyless's ErrorVal() would index an empty payload and
                # panic; an error reply without exactly one code byte says
                # nothing usable, so report it as malformed.
                append(
                    BadResponse(
                        request_id,
                        _FORMAT,
                        f"error reply has {len(op.payload)} payload bytes, not 1",
                    )
                )
            else:
                append(Response(request_id, op.opcode, op.payload))

        left = n - pos
        if left:
            buf += memoryview(data)[pos:]
            if left >= HEADER_SIZE:
                self._need = HEADER_SIZE + int.from_bytes(data[pos + 2 : pos + 4], "big")
            else:
                self._need = HEADER_SIZE
        else:
            self._need = HEADER_SIZE
        return events

    def receive_eof(self) -> list[Event]:
        """The peer closed the stream. Returns ``[ConnectionClosed]`` once."""
        if self._closed:
            return []
        self._closed = True
        clean = not self._buf
        self._buf = bytearray()
        return [ConnectionClosed(clean)]
