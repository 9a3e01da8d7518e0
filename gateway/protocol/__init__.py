"""Keyless protocol core: a sans-I/O codec and connection state machine.

Nothing here touches sockets, threads or asyncio; the gateway's network code
feeds bytes in and writes the bytes it gets back. See ``packet`` for the wire
format and ``connection`` for stream handling.
"""

from gateway.protocol.connection import (
    BadRequest,
    BadResponse,
    ConnectionClosed,
    Event,
    KeylessConnection,
    Request,
    Response,
)
from gateway.protocol.constants import ErrorCode, Op, Tag, error_name, op_name, op_type
from gateway.protocol.packet import (
    HEADER_SIZE,
    MAX_BODY_LENGTH,
    MAX_ITEM_LENGTH,
    PADDED_LENGTH,
    Operation,
    ProtocolError,
    decode_body,
    decode_packet,
    encode_error,
    encode_packet,
    encode_pong,
    encode_response,
)

__all__ = [
    "HEADER_SIZE",
    "MAX_BODY_LENGTH",
    "MAX_ITEM_LENGTH",
    "PADDED_LENGTH",
    "BadRequest",
    "BadResponse",
    "ConnectionClosed",
    "ErrorCode",
    "Event",
    "KeylessConnection",
    "Op",
    "Operation",
    "ProtocolError",
    "Request",
    "Response",
    "Tag",
    "decode_body",
    "decode_packet",
    "encode_error",
    "encode_packet",
    "encode_pong",
    "encode_response",
    "error_name",
    "op_name",
    "op_type",
]
