"""Encoding and decoding of single keyless packets (no I/O, no buffering).

A packet is an 8-byte header (major, minor, uint16 body length, uint32 request
ID; big-endian) followed by a body of TLV items (tag, uint16 length, data).

The encoder reproduces gokeyless's ``Operation.MarshalBinary`` byte for byte
(item order, omission rules and the pad-to-1024 rule), because the edge and
gokeyless's own tests only ever saw that layout. The decoder follows
gokeyless's ``UnmarshalBinary`` but is stricter in a few documented places;
every rejection is a :class:`ProtocolError`, never another exception type,
which is what lets the connection layer answer a bad packet instead of dying.

Only syntax lives here. Whether an opcode is known, whether a request needs an
SKI, and what to answer are the dispatcher's decisions.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from gateway.protocol.constants import ErrorCode, Op, Tag

__all__ = [
    "HEADER_SIZE",
    "MAX_BODY_LENGTH",
    "MAX_ITEM_LENGTH",
    "PADDED_LENGTH",
    "Operation",
    "ProtocolError",
    "decode_body",
    "decode_packet",
    "encode_error",
    "encode_packet",
    "encode_pong",
    "encode_response",
]

HEADER_SIZE = 8
# gokeyless pads every packet shorter than this up to exactly this many bytes.
PADDED_LENGTH = 1024
# The header's length field is a uint16.
MAX_BODY_LENGTH = 0xFFFF
# gokeyless refuses (panics on) longer item data: with its 3-byte item header
# the item alone would already overflow the uint16 body length.
MAX_ITEM_LENGTH = MAX_BODY_LENGTH - 3

_HEADER = struct.Struct(">BBHI")
_ITEM = struct.Struct(">BH")
# Header + opcode item + payload item header, for the one-shot response builders.
_REPLY_PREFIX = struct.Struct(">BBHIBHBBH")

_SKI_LEN = 20
_DIGEST_LEN = 32
_V4_MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"


class ProtocolError(Exception):
    """A packet body (or header) that is not valid keyless syntax.

    ``code`` is the error to answer with (normally ``ErrorCode.FORMAT``);
    ``reason`` is short text for logs. The reason names tags and lengths only,
    never data bytes: bodies carry digests, ciphertexts and client IPs, none of
    which belong in a log line.
    """

    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.reason} (error 0x{int(self.code):02x})"


@dataclass(slots=True)
class Operation:
    """The content of one packet body.

    Absent items are empty bytes (``compliance_region`` 0). IPs are the raw 4
    or 16 wire bytes. A decoded SKI or digest is kept exactly as received, so an
    all-zero SKI is still 20 zero bytes here; treating it as missing is policy.

    ``has_payload``/``has_opcode`` record whether those items were on the wire.
    They exist for the C server's rule that a request without a payload item is
    malformed. They are excluded from ``==``: the gokeyless encoder never writes
    an empty payload item, so equality has to be about content for
    ``decode(encode(op)) == op`` to hold. The encoder ignores both flags.
    """

    opcode: int
    payload: bytes = b""
    extra: bytes = b""
    ski: bytes = b""
    digest: bytes = b""
    client_ip: bytes = b""
    server_ip: bytes = b""
    sni: bytes = b""
    cert_id: bytes = b""
    custom_func_name: bytes = b""
    jaeger_span: bytes = b""
    req_context: bytes = b""
    compliance_region: int = 0
    has_payload: bool = field(default=True, compare=False)
    has_opcode: bool = field(default=True, compare=False)


# --------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------


def _append_item(out: bytearray, tag: int, data: bytes) -> None:
    n = len(data)
    if n > MAX_ITEM_LENGTH:
        raise ValueError(f"item 0x{tag:02x} has {n} data bytes; the maximum is {MAX_ITEM_LENGTH}")
    out += _ITEM.pack(tag, n)
    out += data


def _wire_ip(name: str, ip: bytes) -> bytes:
    n = len(ip)
    if n == 16:
        # Go's net.IP.To4(): an IPv4-mapped IPv6 address goes out as 4 bytes.
        return ip[12:] if ip[:12] == _V4_MAPPED_PREFIX else ip
    if n == 4:
        return ip
    raise ValueError(f"{name} must be 4 or 16 bytes, not {n}")


_pad_cache: dict[int, bytes] = {}


def _padding_item(left: int) -> bytes:
    # Padding items are mostly the same few sizes (one per signature length),
    # so building each once keeps the zero-fill off the per-response path. The
    # cache is bounded: `left` is at most 1024 - 8 - 4 - 3.
    item = _pad_cache.get(left)
    if item is None:
        item = _pad_cache[left] = _ITEM.pack(Tag.PADDING, left) + bytes(left)
    return item


def _pad(items_len: int) -> bytes:
    """The padding item gokeyless appends after `items_len` bytes of items."""
    if items_len + HEADER_SIZE >= PADDED_LENGTH:
        return b""
    # Fill to exactly 1024 bytes; when only 1 or 2 bytes are missing the item
    # header alone overshoots, and gokeyless then writes an empty padding item
    # (1025 or 1026 bytes in total) rather than none.
    return _padding_item(max(0, PADDED_LENGTH - (items_len + HEADER_SIZE + 3)))


def _pack_header(request_id: int, body_len: int, major: int = 1, minor: int = 0) -> bytes:
    try:
        return _HEADER.pack(major, minor, body_len, request_id)
    except struct.error:
        raise ValueError(
            f"header out of range: version {major}.{minor}, request ID {request_id}"
        ) from None


def encode_packet(request_id: int, op: Operation, *, version: tuple[int, int] = (1, 0)) -> bytes:
    """Serialise ``op`` exactly as gokeyless's encoder would.

    Order: opcode, payload, extra, SKI, digest, client IP, server IP, SNI, cert
    ID, custom function name, Jaeger span, request context, compliance region,
    padding. Empty payload/extra/strings, an empty or all-zero SKI/digest, empty
    IPs and a zero compliance region are omitted.

    Raises ``ValueError`` for an item over 65532 bytes, a body over 65535, or a
    field that has no wire form (opcode not a byte, SKI not 20 bytes, ...).
    """
    if not 0 <= op.opcode <= 0xFF:
        raise ValueError(f"opcode {op.opcode} is not a byte")
    out = bytearray(_ITEM.pack(Tag.OPCODE, 1))
    out.append(op.opcode)
    if op.payload:
        _append_item(out, Tag.PAYLOAD, op.payload)
    if op.extra:
        _append_item(out, Tag.EXTRA, op.extra)
    # Go keeps SKI/digest in fixed-size arrays and treats all-zero as "not set".
    if op.ski:
        if len(op.ski) != _SKI_LEN:
            raise ValueError(f"SKI must be {_SKI_LEN} bytes, not {len(op.ski)}")
        if any(op.ski):
            _append_item(out, Tag.SUBJECT_KEY_IDENTIFIER, op.ski)
    if op.digest:
        if len(op.digest) != _DIGEST_LEN:
            raise ValueError(f"digest must be {_DIGEST_LEN} bytes, not {len(op.digest)}")
        if any(op.digest):
            _append_item(out, Tag.CERTIFICATE_DIGEST, op.digest)
    if op.client_ip:
        _append_item(out, Tag.CLIENT_IP, _wire_ip("client_ip", op.client_ip))
    if op.server_ip:
        _append_item(out, Tag.SERVER_IP, _wire_ip("server_ip", op.server_ip))
    if op.sni:
        _append_item(out, Tag.SERVER_NAME, op.sni)
    if op.cert_id:
        _append_item(out, Tag.CERT_ID, op.cert_id)
    if op.custom_func_name:
        _append_item(out, Tag.CUSTOM_FUNC_NAME, op.custom_func_name)
    if op.jaeger_span:
        _append_item(out, Tag.JAEGER_SPAN, op.jaeger_span)
    if op.req_context:
        _append_item(out, Tag.REQ_CONTEXT, op.req_context)
    if op.compliance_region:
        if not 0 <= op.compliance_region <= 0xFF:
            raise ValueError(f"compliance region {op.compliance_region} is not a byte")
        out += _ITEM.pack(Tag.COMPLIANCE_REGION, 1)
        out.append(op.compliance_region)
    out += _pad(len(out))
    if len(out) > MAX_BODY_LENGTH:
        raise ValueError(f"body is {len(out)} bytes; the maximum is {MAX_BODY_LENGTH}")
    major, minor = version
    return _pack_header(request_id, len(out), major, minor) + out


# The three reply builders below are the gateway's per-request path. They lay
# out the same bytes as encode_packet(Operation(opcode, payload)) without
# building an Operation or a bytearray: one struct.pack and two concatenations
# (measured faster than b"".join here).

# For a reply of opcode + payload item, 1024 - 8 - (4 + 3 + n) - 3 = 1006 - n.
_REPLY_PAD_BASE = PADDED_LENGTH - HEADER_SIZE - 4 - 3 - 3
_REPLY_BODY_PADDED = PADDED_LENGTH - HEADER_SIZE
_MAX_REPLY_PAYLOAD = MAX_BODY_LENGTH - 4 - 3
# Plain ints: struct.pack goes through __index__ for IntEnum members, which is
# measurably slower on this path.
_T_OPCODE = int(Tag.OPCODE)
_T_PAYLOAD = int(Tag.PAYLOAD)
_OP_RESPONSE = int(Op.RESPONSE)
_OP_PONG = int(Op.PONG)
_pack_reply_prefix = _REPLY_PREFIX.pack


def _encode_reply(request_id: int, opcode: int, payload: bytes) -> bytes:
    n = len(payload)
    if n == 0:
        # No payload item at all (gokeyless omits empty payloads; an empty
        # pong carries none).
        return _pack_header(request_id, PADDED_LENGTH - HEADER_SIZE) + _EMPTY_REPLY_BODY[opcode]
    if n <= _REPLY_PAD_BASE:
        # The common case (every signature): padded to exactly 1024 bytes.
        pad = _pad_cache.get(_REPLY_PAD_BASE - n) or _padding_item(_REPLY_PAD_BASE - n)
        body_len = _REPLY_BODY_PADDED
    elif n > _MAX_REPLY_PAYLOAD:
        raise ValueError(f"reply payload is {n} bytes; the maximum is {_MAX_REPLY_PAYLOAD}")
    else:
        pad = _pad(7 + n)
        body_len = 7 + n + len(pad)
    try:
        prefix = _pack_reply_prefix(1, 0, body_len, request_id, _T_OPCODE, 1, opcode, _T_PAYLOAD, n)
    except struct.error:
        raise ValueError(f"request ID {request_id} is not a uint32") from None
    return prefix + payload + pad


def _empty_reply_body(opcode: int) -> bytes:
    return _ITEM.pack(Tag.OPCODE, 1) + bytes((opcode,)) + _pad(4)


_EMPTY_REPLY_BODY = {
    int(Op.RESPONSE): _empty_reply_body(Op.RESPONSE),
    int(Op.PONG): _empty_reply_body(Op.PONG),
}


def encode_response(request_id: int, payload: bytes) -> bytes:
    """A success reply (``OpResponse``, 0xF0) carrying ``payload``."""
    return _encode_reply(request_id, _OP_RESPONSE, payload)


def encode_pong(request_id: int, payload: bytes = b"") -> bytes:
    """The reply to a ping (``OpPong``, 0xF2); no payload item when empty."""
    return _encode_reply(request_id, _OP_PONG, payload)


_error_bodies: dict[int, bytes] = {}


def encode_error(request_id: int, code: int) -> bytes:
    """An error reply (``OpError``, 0xFF) whose 1-byte payload is ``code``."""
    body = _error_bodies.get(code)
    if body is None:
        if not 0 <= code <= 0xFF:
            raise ValueError(f"error code {code} is not a byte")
        # Bounded: at most 256 distinct bodies.
        body = _error_bodies[code] = (
            _ITEM.pack(Tag.OPCODE, 1)
            + bytes((Op.ERROR,))
            + _ITEM.pack(Tag.PAYLOAD, 1)
            + bytes((code,))
            + _pad(8)
        )
    return _pack_header(request_id, len(body)) + body


# --------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------

# Slot of each known tag in the decoder's scratch list. Padding is handled
# before this lookup. Anything absent from the map is an unknown tag and is
# skipped without a duplicate check, as gokeyless does since 2020 so that new
# tags can be rolled out before every server knows them.
_I_OPCODE = 0
_I_PAYLOAD = 1
_I_EXTRA = 2
_I_SKI = 3
_I_DIGEST = 4
_I_CLIENT_IP = 5
_I_SERVER_IP = 6
_I_SNI = 7
_I_CERT_ID = 8
_I_CUSTOM = 9
_I_JAEGER = 10
_I_REQ_CONTEXT = 11
_I_REGION = 12
_N_SLOTS = 13
_SLOT_OF_TAG: dict[int, int] = {
    int(Tag.OPCODE): _I_OPCODE,
    int(Tag.PAYLOAD): _I_PAYLOAD,
    int(Tag.EXTRA): _I_EXTRA,
    int(Tag.SUBJECT_KEY_IDENTIFIER): _I_SKI,
    int(Tag.CERTIFICATE_DIGEST): _I_DIGEST,
    int(Tag.CLIENT_IP): _I_CLIENT_IP,
    int(Tag.SERVER_IP): _I_SERVER_IP,
    int(Tag.SERVER_NAME): _I_SNI,
    int(Tag.CERT_ID): _I_CERT_ID,
    int(Tag.CUSTOM_FUNC_NAME): _I_CUSTOM,
    int(Tag.JAEGER_SPAN): _I_JAEGER,
    int(Tag.REQ_CONTEXT): _I_REQ_CONTEXT,
    int(Tag.COMPLIANCE_REGION): _I_REGION,
}
_PADDING_TAG = int(Tag.PADDING)
_FORMAT = ErrorCode.FORMAT


def _decode_items(data: bytes, pos: int, end: int) -> Operation:
    """Decode the items in ``data[pos:end]``.

    Works on offsets into the caller's buffer so a connection can decode many
    pipelined packets from one received chunk without slicing each body out.
    ``data`` must be ``bytes`` so that item slices are ``bytes`` already.
    """
    vals: list[bytes | None] = [None] * _N_SLOTS
    seen_padding = False
    unpack = _ITEM.unpack_from
    slot_of = _SLOT_OF_TAG.get
    # Like Go, read items while a whole item header fits; 1 or 2 stray bytes
    # at the end are ignored (Go has always accepted them, so a peer that
    # sends them is interoperable today).
    while end - pos >= 3:
        tag, length = unpack(data, pos)
        start = pos + 3
        pos = start + length
        if pos > end:
            raise ProtocolError(
                _FORMAT, f"item 0x{tag:02x} of {length} bytes runs {pos - end} bytes past the body"
            )
        if tag == _PADDING_TAG:
            # Contents are not checked: both peers write zeros, but nothing
            # depends on them and neither peer's parser looks. Padding is a
            # known tag, so a second one is a duplicate, as in gokeyless.
            if seen_padding:
                raise ProtocolError(_FORMAT, "duplicate padding item")
            seen_padding = True
            continue
        slot = slot_of(tag)
        if slot is None:
            continue
        if vals[slot] is not None:
            raise ProtocolError(_FORMAT, f"duplicate item 0x{tag:02x}")
        vals[slot] = data[start:pos]

    (
        opcode_b,
        payload,
        extra,
        ski,
        digest,
        client_ip,
        server_ip,
        sni,
        cert_id,
        custom,
        jaeger,
        req_context,
        region_b,
    ) = vals

    # gokeyless would carry on with opcode 0 and answer "bad opcode"; without
    # an opcode there is no request to speak of, so it is a format error (as
    # in the C server).
    if opcode_b is None:
        raise ProtocolError(_FORMAT, "missing opcode item")
    if len(opcode_b) != 1:
        raise ProtocolError(_FORMAT, f"opcode item is {len(opcode_b)} bytes, not 1")
    # Go silently drops an SKI or digest of the wrong length, which then looks
    # like a request without a key and is answered "internal error". A client
    # sending 19 or 21 bytes has a bug; saying "malformed" points at it
    # instead of at the key store.
    if ski is None:
        ski = b""
    elif len(ski) != _SKI_LEN:
        raise ProtocolError(_FORMAT, f"SKI item is {len(ski)} bytes, not {_SKI_LEN}")
    if digest is None:
        digest = b""
    elif len(digest) != _DIGEST_LEN:
        raise ProtocolError(_FORMAT, f"digest item is {len(digest)} bytes, not {_DIGEST_LEN}")
    if client_ip is None:
        client_ip = b""
    elif len(client_ip) != 4 and len(client_ip) != 16:
        raise ProtocolError(_FORMAT, f"client IP item is {len(client_ip)} bytes, not 4 or 16")
    if server_ip is None:
        server_ip = b""
    elif len(server_ip) != 4 and len(server_ip) != 16:
        raise ProtocolError(_FORMAT, f"server IP item is {len(server_ip)} bytes, not 4 or 16")
    if region_b is None:
        region = 0
    elif len(region_b) != 1:
        raise ProtocolError(_FORMAT, f"compliance region item is {len(region_b)} bytes, not 1")
    else:
        region = region_b[0]

    # Positional: noticeably cheaper than keywords for a 15-field dataclass.
    return Operation(
        opcode_b[0],
        payload if payload is not None else b"",
        extra or b"",
        ski,
        digest,
        client_ip,
        server_ip,
        sni or b"",
        cert_id or b"",
        custom or b"",
        jaeger or b"",
        req_context or b"",
        region,
        payload is not None,
        True,
    )


def decode_body(body: bytes | bytearray | memoryview) -> Operation:
    """Decode a packet body (the bytes after the 8-byte header).

    Raises :class:`ProtocolError` (code ``FORMAT``) for: an item running past
    the end, a duplicate known tag, a missing opcode, an opcode or compliance
    region that is not 1 byte, an IP that is not 4 or 16 bytes, an SKI that is
    not 20 bytes, a digest that is not 32 bytes. Unknown tags and padding are
    skipped; 1 or 2 trailing bytes are ignored.
    """
    if type(body) is not bytes:
        body = bytes(body)
    return _decode_items(body, 0, len(body))


def decode_packet(packet: bytes | bytearray | memoryview) -> tuple[int, Operation]:
    """Decode one complete packet; returns ``(request_id, operation)``.

    For tools and tests; a server reads a stream through ``KeylessConnection``.
    Raises :class:`ProtocolError` with ``VERSION_MISMATCH`` for a major version
    other than 1 and ``FORMAT`` when the length field disagrees with the data.
    """
    if type(packet) is not bytes:
        packet = bytes(packet)
    if len(packet) < HEADER_SIZE:
        raise ProtocolError(_FORMAT, f"packet is {len(packet)} bytes, shorter than a header")
    major, _minor, length, request_id = _HEADER.unpack_from(packet)
    if major != 1:
        raise ProtocolError(ErrorCode.VERSION_MISMATCH, f"unsupported major version {major}")
    if HEADER_SIZE + length != len(packet):
        raise ProtocolError(
            _FORMAT, f"header says {length} body bytes, packet has {len(packet) - HEADER_SIZE}"
        )
    return request_id, _decode_items(packet, HEADER_SIZE, len(packet))
