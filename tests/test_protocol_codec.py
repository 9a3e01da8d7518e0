"""Unit and property tests of the sans-I/O keyless codec and connection."""

from __future__ import annotations

import dataclasses
import itertools
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.protocol import (
    MAX_ITEM_LENGTH,
    BadRequest,
    BadResponse,
    ConnectionClosed,
    ErrorCode,
    Event,
    KeylessConnection,
    Op,
    Operation,
    ProtocolError,
    Request,
    Response,
    Tag,
    decode_body,
    decode_packet,
    encode_error,
    encode_packet,
    encode_pong,
    encode_response,
    error_name,
    op_name,
    op_type,
)

SKI = bytes(range(1, 21))
DIGEST = bytes(range(100, 132))


def item(tag: int, data: bytes) -> bytes:
    return struct.pack(">BH", tag, len(data)) + data


def packet(request_id: int, body: bytes, *, major: int = 1, minor: int = 0) -> bytes:
    return struct.pack(">BBHI", major, minor, len(body), request_id) + body


OPCODE_ITEM = item(Tag.OPCODE, bytes([Op.ECDSA_SIGN_SHA256]))


def format_error(body: bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode_body(body)
    assert info.value.code == ErrorCode.FORMAT
    return info.value


def items_of(pkt: bytes) -> list[tuple[int, bytes]]:
    """Independent TLV walk of an encoded packet (checks the header length too)."""
    (length,) = struct.unpack_from(">H", pkt, 2)
    assert len(pkt) == 8 + length
    out = []
    pos = 8
    while pos < len(pkt):
        tag, n = struct.unpack_from(">BH", pkt, pos)
        out.append((tag, pkt[pos + 3 : pos + 3 + n]))
        pos += 3 + n
    assert pos == len(pkt)
    return out


# ============================================================== constants


def test_tags_are_exactly_the_documented_set() -> None:
    assert {int(t) for t in Tag} == {
        0x01, 0x02, 0x03, 0x04, 0x05, 0x06,
        0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x20,
    }  # fmt: skip


def test_opcodes_are_exactly_the_documented_set() -> None:
    expected = set(range(0x01, 0x09)) | set(range(0x12, 0x19)) | {0x21, 0x22, 0x23, 0x24}
    expected |= {0x35, 0x36, 0x37, 0xF0, 0xF1, 0xF2, 0xFF}
    assert {int(o) for o in Op} == expected


def test_error_codes_are_0_to_0x0b() -> None:
    assert [int(e) for e in ErrorCode] == list(range(0x0C))


@pytest.mark.parametrize(
    ("op", "name"),
    [
        (0x01, "OpRSADecrypt"),
        (0x02, "OpRSASignMD5SHA1"),
        (0x07, "OpRSASignSHA512"),
        (0x08, "OpRSADecryptRaw"),
        (0x12, "OpECDSASignMD5SHA1"),
        (0x15, "OpECDSASignSHA256"),
        (0x18, "OpEd25519Sign"),
        (0x21, "OpSeal"),
        (0x22, "OpUnseal"),
        (0x23, "OpRPC"),
        (0x24, "OpCustom"),
        (0x35, "OpRSAPSSSignSHA256"),
        (0x37, "OpRSAPSSSignSHA512"),
        (0xF0, "OpResponse"),
        (0xF1, "OpPing"),
        (0xF2, "OpPong"),
        (0xFF, "OpError"),
        (0xBB, "OpUnknown(0xbb)"),
        (0x00, "OpUnknown(0x00)"),
        (0x20, "OpUnknown(0x20)"),  # the removed OpGetCertificate
    ],
)
def test_op_name(op: int, name: str) -> None:
    assert op_name(op) == name


def test_every_opcode_has_a_distinct_gokeyless_style_name() -> None:
    names = [op_name(o) for o in Op]
    assert len(set(names)) == len(names)
    assert all(n.startswith("Op") and "Unknown" not in n for n in names)


@pytest.mark.parametrize(
    ("op", "kind"),
    [
        *[(o, "rsa") for o in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x35, 0x36, 0x37)],
        *[(o, "ecdsa") for o in range(0x12, 0x18)],
        (0x18, "ed25519"),
        (0x24, "custom"),
        (0x23, "rpc"),
        *[(o, "other") for o in (0x21, 0x22, 0xF0, 0xF1, 0xF2, 0xFF)],
        *[(o, "unknown") for o in (0x00, 0x09, 0x11, 0x19, 0x20, 0x25, 0xBB, 0xFE)],
    ],
)
def test_op_type(op: int, kind: str) -> None:
    assert op_type(op) == kind


def test_op_type_covers_every_opcode() -> None:
    assert all(op_type(o) != "unknown" for o in Op)


@pytest.mark.parametrize(
    ("code", "text"),
    [
        (0x00, "no error"),
        (0x01, "cryptography error"),
        (0x02, "key not found due to no matching SKI/SNI/ServerIP"),
        (0x03, "read failure"),
        (0x04, "version mismatch"),
        (0x05, "bad opcode"),
        (0x06, "unexpected opcode"),
        (0x07, "malformed message"),
        (0x08, "internal error"),
        (0x09, "certificate not found"),
        (0x0A, "sealing key expired"),
        (0x0C, "unknown error"),
        (0xFF, "unknown error"),
    ],
)
def test_error_name(code: int, text: str) -> None:
    assert error_name(code) == text


def test_every_error_code_has_its_own_name() -> None:
    names = [error_name(c) for c in ErrorCode]
    assert len(set(names)) == len(names)
    assert "unknown error" not in names


# ============================================================== decode rules


def test_decode_minimal_body() -> None:
    op = decode_body(OPCODE_ITEM)
    assert op == Operation(Op.ECDSA_SIGN_SHA256)
    assert op.has_payload is False
    assert op.has_opcode is True


def test_decode_returns_plain_bytes_fields_for_any_buffer_type() -> None:
    body = OPCODE_ITEM + item(Tag.PAYLOAD, b"abc") + item(Tag.SERVER_NAME, b"x.test")
    for buf in (body, bytearray(body), memoryview(body)):
        op = decode_body(buf)
        assert type(op.payload) is bytes
        assert type(op.sni) is bytes
        assert (op.payload, op.sni) == (b"abc", b"x.test")


def test_decode_every_field() -> None:
    body = b"".join(
        [
            item(Tag.REQ_CONTEXT, b"{}"),  # order on the wire does not matter
            item(Tag.PADDING, bytes(5)),
            item(Tag.COMPLIANCE_REGION, b"\x01"),
            item(Tag.PAYLOAD, b"pay"),
            item(Tag.EXTRA, b"ext"),
            item(Tag.SUBJECT_KEY_IDENTIFIER, SKI),
            item(Tag.CERTIFICATE_DIGEST, DIGEST),
            item(Tag.CLIENT_IP, bytes(16)),
            item(Tag.SERVER_IP, b"\x0a\x00\x00\x01"),
            item(Tag.SERVER_NAME, b"sni"),
            item(Tag.CERT_ID, b"cid"),
            item(Tag.CUSTOM_FUNC_NAME, b"fn"),
            item(Tag.JAEGER_SPAN, b"span"),
            OPCODE_ITEM,
        ]
    )
    assert decode_body(body) == Operation(
        Op.ECDSA_SIGN_SHA256,
        payload=b"pay",
        extra=b"ext",
        ski=SKI,
        digest=DIGEST,
        client_ip=bytes(16),
        server_ip=b"\x0a\x00\x00\x01",
        sni=b"sni",
        cert_id=b"cid",
        custom_func_name=b"fn",
        jaeger_span=b"span",
        req_context=b"{}",
        compliance_region=1,
    )


@pytest.mark.parametrize("trailer", [b"\x12", b"\x12\x00", b"\xff\xff"])
def test_one_or_two_trailing_bytes_are_ignored(trailer: bytes) -> None:
    assert decode_body(OPCODE_ITEM + item(Tag.PAYLOAD, b"p") + trailer) == Operation(
        Op.ECDSA_SIGN_SHA256, b"p"
    )


def test_three_trailing_bytes_are_an_item_header() -> None:
    # Exactly 3 bytes left is a (zero-length) item and is parsed as one.
    op = decode_body(OPCODE_ITEM + b"\x12\x00\x00")
    assert op.has_payload is True
    format_error(OPCODE_ITEM + b"\x12\x00\x01")


@pytest.mark.parametrize("overrun", [1, 2, 100, 0xFFFF])
def test_item_running_past_the_end_is_an_error(overrun: int) -> None:
    data = b"secret-digest-bytes"
    declared = min(len(data) + overrun, 0xFFFF)
    body = OPCODE_ITEM + struct.pack(">BH", Tag.PAYLOAD, declared) + data
    err = format_error(body)
    assert "0x12" in err.reason
    assert "past" in err.reason


def test_item_running_past_the_end_even_if_unknown_or_padding() -> None:
    format_error(OPCODE_ITEM + b"\x99\x00\x05abc")
    format_error(OPCODE_ITEM + b"\x20\x00\x05\x00")


def test_unknown_tags_are_skipped_and_may_repeat() -> None:
    body = (
        item(0x99, b"future")
        + OPCODE_ITEM
        + item(0x99, b"again")
        + item(0x07, b"")
        + item(0x00, b"\x01\x02")
        + item(0xFF, bytes(300))
        + item(Tag.PAYLOAD, b"p")
    )
    assert decode_body(body) == Operation(Op.ECDSA_SIGN_SHA256, b"p")


KNOWN_TAG_SAMPLES = [
    (Tag.CERTIFICATE_DIGEST, DIGEST),
    (Tag.SERVER_NAME, b"a"),
    (Tag.CLIENT_IP, b"\x01\x02\x03\x04"),
    (Tag.SUBJECT_KEY_IDENTIFIER, SKI),
    (Tag.SERVER_IP, bytes(16)),
    (Tag.CERT_ID, b"c"),
    (Tag.OPCODE, b"\x15"),
    (Tag.PAYLOAD, b"p"),
    (Tag.CUSTOM_FUNC_NAME, b"f"),
    (Tag.EXTRA, b"e"),
    (Tag.JAEGER_SPAN, b"j"),
    (Tag.REQ_CONTEXT, b"{}"),
    (Tag.COMPLIANCE_REGION, b"\x01"),
    (Tag.PADDING, b"\x00"),
]


def test_known_tag_samples_cover_every_tag() -> None:
    assert {t for t, _ in KNOWN_TAG_SAMPLES} == set(Tag)


@pytest.mark.parametrize(("tag", "data"), KNOWN_TAG_SAMPLES)
def test_each_known_tag_alone_is_fine(tag: Tag, data: bytes) -> None:
    base = b"" if tag == Tag.OPCODE else OPCODE_ITEM
    decode_body(base + item(tag, data))


@pytest.mark.parametrize(("tag", "data"), KNOWN_TAG_SAMPLES)
def test_duplicate_known_tag_is_an_error(tag: Tag, data: bytes) -> None:
    base = b"" if tag == Tag.OPCODE else OPCODE_ITEM
    err = format_error(
        base
        + item(tag, data)
        + item(Tag.PAYLOAD if tag != Tag.PAYLOAD else 0x99, b"z")
        + item(tag, data)
    )
    assert "duplicate" in err.reason


def test_duplicate_payload_even_when_empty() -> None:
    format_error(OPCODE_ITEM + item(Tag.PAYLOAD, b"") + item(Tag.PAYLOAD, b""))


def test_missing_opcode_is_an_error() -> None:
    assert "opcode" in format_error(item(Tag.PAYLOAD, b"p") + item(Tag.PADDING, bytes(10))).reason
    format_error(b"")
    format_error(b"\x11\x00")  # only a stray 2-byte tail


@pytest.mark.parametrize("n", [0, 2, 3])
def test_opcode_must_be_one_byte(n: int) -> None:
    assert "opcode" in format_error(item(Tag.OPCODE, bytes(n))).reason


@pytest.mark.parametrize("n", [0, 2])
def test_compliance_region_must_be_one_byte(n: int) -> None:
    format_error(OPCODE_ITEM + item(Tag.COMPLIANCE_REGION, bytes(n)))


@pytest.mark.parametrize("tag", [Tag.CLIENT_IP, Tag.SERVER_IP])
@pytest.mark.parametrize("n", [0, 1, 3, 5, 6, 15, 17, 32])
def test_ip_must_be_4_or_16_bytes(tag: Tag, n: int) -> None:
    format_error(OPCODE_ITEM + item(tag, bytes(range(n))))


@pytest.mark.parametrize("tag", [Tag.CLIENT_IP, Tag.SERVER_IP])
@pytest.mark.parametrize("n", [4, 16])
def test_ip_of_4_or_16_bytes_is_kept_verbatim(tag: Tag, n: int) -> None:
    ip = bytes(range(1, n + 1))
    op = decode_body(OPCODE_ITEM + item(tag, ip))
    assert (op.client_ip if tag == Tag.CLIENT_IP else op.server_ip) == ip


@pytest.mark.parametrize("n", [0, 1, 19, 21, 32])
def test_ski_must_be_20_bytes(n: int) -> None:
    # Stricter than Go (which silently drops it): see the decoder's comment.
    assert "SKI" in format_error(OPCODE_ITEM + item(Tag.SUBJECT_KEY_IDENTIFIER, bytes(n))).reason


def test_all_zero_ski_is_kept_for_the_dispatcher() -> None:
    assert decode_body(OPCODE_ITEM + item(Tag.SUBJECT_KEY_IDENTIFIER, bytes(20))).ski == bytes(20)


@pytest.mark.parametrize("n", [0, 20, 31, 33])
def test_digest_must_be_32_bytes(n: int) -> None:
    assert "digest" in format_error(OPCODE_ITEM + item(Tag.CERTIFICATE_DIGEST, bytes(n))).reason


def test_padding_contents_are_not_checked() -> None:
    body = OPCODE_ITEM + item(Tag.PADDING, b"\xff" * 50) + item(Tag.PAYLOAD, b"after")
    assert decode_body(body) == Operation(Op.ECDSA_SIGN_SHA256, b"after")


def test_padding_can_be_empty_or_first() -> None:
    assert decode_body(item(Tag.PADDING, b"") + OPCODE_ITEM).opcode == Op.ECDSA_SIGN_SHA256


def test_variable_items_may_be_empty_or_large() -> None:
    big = bytes(range(256)) * 200
    body = OPCODE_ITEM + item(Tag.SERVER_NAME, b"") + item(Tag.PAYLOAD, big)
    op = decode_body(body)
    assert op.sni == b""
    assert op.payload == big


def test_compliance_region_byte_value_is_returned_as_int() -> None:
    assert decode_body(OPCODE_ITEM + item(Tag.COMPLIANCE_REGION, b"\xfe")).compliance_region == 0xFE


def test_protocol_error_shape() -> None:
    err = ProtocolError(ErrorCode.FORMAT, "bad thing")
    assert isinstance(err, Exception)
    assert err.code is ErrorCode.FORMAT
    assert err.reason == "bad thing"
    assert "bad thing" in str(err)
    assert "0x07" in str(err)


MARKER = b"TOPSECRET-DIGEST!"  # 17 bytes: no fixed-size field accepts it

ERROR_BODIES = [
    item(Tag.PAYLOAD, MARKER) + struct.pack(">BH", Tag.EXTRA, 99) + MARKER,
    item(Tag.PAYLOAD, MARKER) + OPCODE_ITEM + item(Tag.PAYLOAD, MARKER),
    item(Tag.PAYLOAD, MARKER) + item(Tag.OPCODE, MARKER),
    item(Tag.PAYLOAD, MARKER),
    OPCODE_ITEM + item(Tag.SUBJECT_KEY_IDENTIFIER, MARKER),
    OPCODE_ITEM + item(Tag.CERTIFICATE_DIGEST, MARKER),
    OPCODE_ITEM + item(Tag.CLIENT_IP, MARKER),
    OPCODE_ITEM + item(Tag.SERVER_IP, MARKER),
    OPCODE_ITEM + item(Tag.COMPLIANCE_REGION, MARKER),
]


@pytest.mark.parametrize("body", ERROR_BODIES)
def test_error_reasons_never_contain_data(body: bytes) -> None:
    reason = format_error(body).reason
    assert 0 < len(reason) < 100
    for leak in (MARKER.decode(), MARKER.hex(), repr(MARKER), "TOPSECRET"):
        assert leak not in reason


def test_decode_packet() -> None:
    pkt = packet(9, OPCODE_ITEM)
    assert decode_packet(pkt) == (9, Operation(Op.ECDSA_SIGN_SHA256))
    with pytest.raises(ProtocolError) as info:
        decode_packet(packet(9, OPCODE_ITEM, major=2))
    assert info.value.code == ErrorCode.VERSION_MISMATCH
    for bad in (pkt[:-1], pkt + b"\x00", pkt[:7]):
        with pytest.raises(ProtocolError) as info:
            decode_packet(bad)
        assert info.value.code == ErrorCode.FORMAT


# ============================================================== encode rules


def test_encoder_item_order_is_gokeyless_order() -> None:
    op = Operation(
        opcode=Op.RSA_SIGN_SHA256,
        payload=b"p",
        extra=b"e",
        ski=SKI,
        digest=DIGEST,
        client_ip=b"\x01\x02\x03\x04",
        server_ip=bytes(range(16)),
        sni=b"s",
        cert_id=b"c",
        custom_func_name=b"f",
        jaeger_span=b"j",
        req_context=b"r",
        compliance_region=1,
    )
    tags = [t for t, _ in items_of(encode_packet(0, op))]
    assert tags == [
        Tag.OPCODE,
        Tag.PAYLOAD,
        Tag.EXTRA,
        Tag.SUBJECT_KEY_IDENTIFIER,
        Tag.CERTIFICATE_DIGEST,
        Tag.CLIENT_IP,
        Tag.SERVER_IP,
        Tag.SERVER_NAME,
        Tag.CERT_ID,
        Tag.CUSTOM_FUNC_NAME,
        Tag.JAEGER_SPAN,
        Tag.REQ_CONTEXT,
        Tag.COMPLIANCE_REGION,
        Tag.PADDING,
    ]


def test_encoder_omits_empty_and_zero_fields() -> None:
    op = Operation(Op.PING, b"", ski=bytes(20), digest=bytes(32), compliance_region=0)
    assert items_of(encode_packet(0, op)) == [(0x11, b"\xf1"), (0x20, bytes(1009))]


def test_encoder_keeps_a_nonzero_ski_with_zero_bytes_in_it() -> None:
    ski = bytes(19) + b"\x01"
    assert (0x04, ski) in items_of(encode_packet(0, Operation(Op.PING, ski=ski)))


@pytest.mark.parametrize(
    ("given_ip", "wire"),
    [
        (b"\x7f\x00\x00\x01", b"\x7f\x00\x00\x01"),
        (bytes(10) + b"\xff\xff\x0a\x01\x02\x03", b"\x0a\x01\x02\x03"),  # v4-mapped
        (b"\x20\x01\x0d\xb8" + bytes(11) + b"\x01", b"\x20\x01\x0d\xb8" + bytes(11) + b"\x01"),
        (bytes(16), bytes(16)),  # "::" is not v4-mapped
        (bytes(10) + b"\xff\xfe" + bytes(4), bytes(10) + b"\xff\xfe" + bytes(4)),
    ],
)
def test_encoder_writes_ipv4_as_4_bytes(given_ip: bytes, wire: bytes) -> None:
    pkt = encode_packet(0, Operation(Op.PING, client_ip=given_ip, server_ip=given_ip))
    found = dict(items_of(pkt))
    assert found[Tag.CLIENT_IP] == wire
    assert found[Tag.SERVER_IP] == wire


def test_encoder_header_fields() -> None:
    pkt = encode_packet(0xFFFFFFFF, Operation(Op.PING), version=(2, 3))
    assert pkt[:8] == b"\x02\x03\x03\xf8\xff\xff\xff\xff"


def _op_with_items_len(items_len: int) -> Operation:
    # opcode item (4) + payload item (3 + n)
    return Operation(Op.RESPONSE, b"\xaa" * (items_len - 7))


@pytest.mark.parametrize(
    ("items_len", "total", "pad_len"),
    [
        (11, 1024, 1002),
        (1012, 1024, 1),
        (1013, 1024, 0),  # 8 + 1013 + 3 = 1024: a padding item of zero data
        (1014, 1025, 0),  # 1022: the item header alone overshoots
        (1015, 1026, 0),  # 1023
        (1016, 1024, None),  # exactly 1024: no padding item
        (1017, 1025, None),
        (5000, 5008, None),
    ],
)
def test_padding_rule(items_len: int, total: int, pad_len: int | None) -> None:
    pkt = encode_packet(1, _op_with_items_len(items_len))
    assert len(pkt) == total
    found = items_of(pkt)
    if pad_len is None:
        assert [t for t, _ in found] == [0x11, 0x12]
    else:
        assert found[-1] == (0x20, bytes(pad_len))


def test_item_size_limit() -> None:
    with pytest.raises(ValueError, match="65532"):
        encode_packet(0, Operation(Op.RESPONSE, bytes(MAX_ITEM_LENGTH + 1)))
    with pytest.raises(ValueError, match="65532"):
        encode_packet(0, Operation(Op.RESPONSE, sni=bytes(MAX_ITEM_LENGTH + 1)))


def test_body_size_limit() -> None:
    # The largest single payload: 65535 - 4 (opcode) - 3 (payload header).
    pkt = encode_packet(0, Operation(Op.RESPONSE, bytes(65528)))
    assert pkt[2:4] == b"\xff\xff"
    assert len(pkt) == 8 + 65535
    with pytest.raises(ValueError, match="65535"):
        encode_packet(0, Operation(Op.RESPONSE, bytes(65529)))
    # Each item fits, the sum does not.
    with pytest.raises(ValueError, match="65535"):
        encode_packet(0, Operation(Op.RESPONSE, bytes(40000), extra=bytes(40000)))


@pytest.mark.parametrize(
    "op",
    [
        Operation(256),
        Operation(-1),
        Operation(Op.PING, ski=b"\x01" * 19),
        Operation(Op.PING, ski=bytes(21)),
        Operation(Op.PING, digest=b"\x01" * 20),
        Operation(Op.PING, client_ip=b"\x01\x02\x03"),
        Operation(Op.PING, server_ip=bytes(5)),
        Operation(Op.PING, compliance_region=256),
        Operation(Op.PING, compliance_region=-1),
    ],
)
def test_encoder_rejects_fields_without_a_wire_form(op: Operation) -> None:
    with pytest.raises(ValueError):
        encode_packet(0, op)


@pytest.mark.parametrize("rid", [-1, 2**32])
def test_request_id_must_be_uint32(rid: int) -> None:
    with pytest.raises(ValueError):
        encode_packet(rid, Operation(Op.PING))
    with pytest.raises(ValueError):
        encode_response(rid, b"x")
    with pytest.raises(ValueError):
        encode_response(rid, b"")
    with pytest.raises(ValueError):
        encode_pong(rid, b"x")
    with pytest.raises(ValueError):
        encode_error(rid, 1)


@pytest.mark.parametrize("version", [(256, 0), (1, -1)])
def test_version_must_be_bytes(version: tuple[int, int]) -> None:
    with pytest.raises(ValueError):
        encode_packet(0, Operation(Op.PING), version=version)


REPLY_SIZES = [0, 1, 6, 64, 72, 256, 512, 1000, 1005, 1006, 1007, 1008, 1009, 1010, 2000, 65528]


@pytest.mark.parametrize("n", REPLY_SIZES)
@pytest.mark.parametrize("rid", [0, 1, 0x12345678, 0xFFFFFFFF])
def test_fast_reply_builders_match_encode_packet(n: int, rid: int) -> None:
    payload = bytes((i * 31 + 7) & 0xFF for i in range(n))
    assert encode_response(rid, payload) == encode_packet(rid, Operation(Op.RESPONSE, payload))
    assert encode_pong(rid, payload) == encode_packet(rid, Operation(Op.PONG, payload))


def test_fast_builders_accept_buffer_payloads() -> None:
    sig = bytes(range(72))
    expected = encode_response(3, sig)
    assert encode_response(3, bytearray(sig)) == expected  # type: ignore[arg-type]
    assert encode_response(3, memoryview(sig)) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("code", range(256))
def test_encode_error_matches_encode_packet(code: int) -> None:
    for rid in (0, 0xFFFFFFFF):
        assert encode_error(rid, code) == encode_packet(rid, Operation(Op.ERROR, bytes([code])))


@pytest.mark.parametrize("code", [-1, 256])
def test_encode_error_rejects_non_byte_codes(code: int) -> None:
    with pytest.raises(ValueError):
        encode_error(0, code)


def test_fast_reply_payload_limit() -> None:
    assert len(encode_response(0, bytes(65528))) == 8 + 65535
    with pytest.raises(ValueError):
        encode_response(0, bytes(65529))
    with pytest.raises(ValueError):
        encode_pong(0, bytes(65529))


def test_operation_equality_ignores_presence_flags_only() -> None:
    a = Operation(Op.PING, b"x")
    assert a == dataclasses.replace(a, has_payload=False, has_opcode=False)
    assert a != dataclasses.replace(a, payload=b"y")
    assert a != dataclasses.replace(a, compliance_region=1)


# ============================================================== connection


def req_pkt(rid: int, op: Operation) -> bytes:
    return encode_packet(rid, op)


def test_connection_rejects_unknown_role() -> None:
    with pytest.raises(ValueError):
        KeylessConnection(role="proxy")  # type: ignore[arg-type]
    assert KeylessConnection().role == "server"
    assert KeylessConnection(role="client").role == "client"


def test_connection_many_packets_in_one_chunk() -> None:
    ops = [Operation(Op.PING, bytes([i]) * i) for i in range(10)]
    conn = KeylessConnection()
    events = conn.receive_data(b"".join(req_pkt(i, op) for i, op in enumerate(ops)))
    assert events == [Request(i, op) for i, op in enumerate(ops)]
    assert conn.buffered == 0


def test_connection_byte_at_a_time() -> None:
    pkt = req_pkt(42, Operation(Op.ECDSA_SIGN_SHA256, b"d" * 32, ski=SKI))
    conn = KeylessConnection()
    for i, b in enumerate(pkt[:-1]):
        assert conn.receive_data(bytes([b])) == []
        assert conn.buffered == i + 1
    assert conn.receive_data(pkt[-1:]) == [
        Request(42, Operation(Op.ECDSA_SIGN_SHA256, b"d" * 32, ski=SKI))
    ]
    assert conn.buffered == 0


def test_connection_packet_split_across_header() -> None:
    pkt = req_pkt(1, Operation(Op.PING, b"a"))
    conn = KeylessConnection()
    assert conn.receive_data(pkt[:5]) == []
    assert conn.receive_data(pkt[5:9]) == []
    assert conn.receive_data(pkt[9:] + pkt[:3]) == [Request(1, Operation(Op.PING, b"a"))]
    assert conn.receive_data(pkt[3:]) == [Request(1, Operation(Op.PING, b"a"))]


def test_connection_accepts_bytearray_and_memoryview() -> None:
    pkt = req_pkt(1, Operation(Op.PING, b"a"))
    conn = KeylessConnection()
    assert conn.receive_data(bytearray(pkt[:100])) == []
    [event] = conn.receive_data(memoryview(pkt)[100:])
    assert isinstance(event, Request)
    assert type(event.operation.payload) is bytes
    [event2] = KeylessConnection().receive_data(bytearray(pkt))
    assert isinstance(event2, Request)
    assert type(event2.operation.payload) is bytes


def test_connection_malformed_body_is_bad_request_and_stream_continues() -> None:
    bad = packet(5, OPCODE_ITEM + item(Tag.SUBJECT_KEY_IDENTIFIER, bytes(19)))
    good = req_pkt(6, Operation(Op.PING))
    conn = KeylessConnection()
    events = conn.receive_data(bad + good + bad)
    assert len(events) == 3
    assert isinstance(events[0], BadRequest)
    assert events[0].request_id == 5
    assert events[0].code == ErrorCode.FORMAT
    assert "SKI" in events[0].reason
    assert events[1] == Request(6, Operation(Op.PING))
    assert events[2] == events[0]


def test_connection_empty_body_is_bad_request() -> None:
    conn = KeylessConnection()
    [event] = conn.receive_data(packet(3, b""))
    assert isinstance(event, BadRequest)
    assert (event.request_id, event.code) == (3, ErrorCode.FORMAT)


def test_connection_version_mismatch_does_not_look_at_the_body() -> None:
    conn = KeylessConnection()
    events = conn.receive_data(packet(77, b"\xff\xff", major=0) + packet(78, b"", major=0xFF))
    assert events == [
        BadRequest(77, ErrorCode.VERSION_MISMATCH, "unsupported major version 0"),
        BadRequest(78, ErrorCode.VERSION_MISMATCH, "unsupported major version 255"),
    ]


def test_connection_max_size_packet_in_chunks() -> None:
    op = Operation(Op.RESPONSE, bytes(range(256)) * 255 + bytes(248))
    pkt = req_pkt(1, op)
    assert len(pkt) == 8 + 65535
    chunks = [pkt[i : i + 1000] for i in range(0, len(pkt), 1000)]
    conn = KeylessConnection()
    for c in chunks[:-1]:
        assert conn.receive_data(c) == []
    assert conn.buffered == len(pkt) - len(chunks[-1])
    assert conn.receive_data(chunks[-1] + pkt[:10]) == [Request(1, op)]
    assert conn.buffered == 10


def test_connection_eof_clean_and_unclean() -> None:
    pkt = req_pkt(1, Operation(Op.PING))
    conn = KeylessConnection()
    conn.receive_data(pkt)
    assert conn.receive_eof() == [ConnectionClosed(clean=True)]
    assert conn.receive_eof() == []
    # Data after EOF is ignored rather than raising.
    assert conn.receive_data(pkt) == []

    for cut in (1, 7, 8, 9, len(pkt) - 1):
        conn = KeylessConnection()
        assert conn.receive_data(pkt + pkt[:cut]) == [Request(1, Operation(Op.PING))]
        assert conn.receive_eof() == [ConnectionClosed(clean=False)]
        assert conn.buffered == 0


def test_connection_empty_data_is_a_no_op() -> None:
    conn = KeylessConnection()
    assert conn.receive_data(b"") == []
    assert conn.receive_eof() == [ConnectionClosed(clean=True)]


def test_client_role_responses() -> None:
    conn = KeylessConnection(role="client")
    stream = (
        encode_response(1, b"sig")
        + encode_pong(2)
        + encode_error(3, ErrorCode.CRYPTO)
        + encode_packet(4, Operation(Op.ECDSA_SIGN_SHA256, b"odd but syntactic"))
    )
    events = conn.receive_data(stream)
    assert events == [
        Response(1, Op.RESPONSE, b"sig"),
        Response(2, Op.PONG, b""),
        Response(3, Op.ERROR, b"\x01"),
        Response(4, Op.ECDSA_SIGN_SHA256, b"odd but syntactic"),
    ]
    assert [e.error_code for e in events if isinstance(e, Response)] == [None, None, 1, None]


@pytest.mark.parametrize("payload", [b"", b"\x01\x02"])
def test_client_role_error_without_a_single_code_byte_is_bad_response(payload: bytes) -> None:
    conn = KeylessConnection(role="client")
    events = conn.receive_data(
        encode_packet(9, Operation(Op.ERROR, payload)) + encode_response(10, b"ok")
    )
    assert len(events) == 2
    assert isinstance(events[0], BadResponse)
    assert (events[0].request_id, events[0].code) == (9, ErrorCode.FORMAT)
    assert events[1] == Response(10, Op.RESPONSE, b"ok")


def test_client_role_malformed_and_version_mismatch() -> None:
    conn = KeylessConnection(role="client")
    events = conn.receive_data(packet(1, b"") + packet(2, OPCODE_ITEM, major=3))
    assert events == [
        BadResponse(1, ErrorCode.FORMAT, "missing opcode item"),
        BadResponse(2, ErrorCode.VERSION_MISMATCH, "unsupported major version 3"),
    ]


# ============================================================== properties

small_bytes = st.binary(max_size=64)
ip_bytes = st.one_of(
    st.just(b""), st.binary(min_size=4, max_size=4), st.binary(min_size=16, max_size=16)
)

operations = st.builds(
    Operation,
    opcode=st.integers(0, 255),
    payload=st.binary(max_size=1100),
    extra=small_bytes,
    ski=st.one_of(st.just(b""), st.binary(min_size=20, max_size=20)),
    digest=st.one_of(st.just(b""), st.binary(min_size=32, max_size=32)),
    client_ip=ip_bytes,
    server_ip=ip_bytes,
    sni=small_bytes,
    cert_id=small_bytes,
    custom_func_name=small_bytes,
    jaeger_span=small_bytes,
    req_context=small_bytes,
    compliance_region=st.integers(0, 255),
)


def normalised(op: Operation) -> Operation:
    """What the encoder can represent: zero SKI/digest dropped, v4-mapped IPs shortened."""

    def ip(b: bytes) -> bytes:
        return b[12:] if len(b) == 16 and b[:12] == bytes(10) + b"\xff\xff" else b

    return dataclasses.replace(
        op,
        ski=op.ski if any(op.ski) else b"",
        digest=op.digest if any(op.digest) else b"",
        client_ip=ip(op.client_ip),
        server_ip=ip(op.server_ip),
    )


@given(operations, st.integers(0, 2**32 - 1))
def test_property_round_trip(op: Operation, rid: int) -> None:
    got_rid, got = decode_packet(encode_packet(rid, op))
    assert got_rid == rid
    assert got == normalised(op)
    assert got.has_payload == bool(op.payload)
    # And through the connection as well.
    assert KeylessConnection().receive_data(encode_packet(rid, op)) == [Request(rid, got)]


@given(operations)
def test_property_packet_size(op: Operation) -> None:
    n = normalised(op)
    byte_fields = (
        n.payload, n.extra, n.ski, n.digest, n.client_ip, n.server_ip, n.sni,
        n.cert_id, n.custom_func_name, n.jaeger_span, n.req_context,
    )  # fmt: skip
    items_len = 4 + sum(3 + len(f) for f in byte_fields if f)
    items_len += 4 if n.compliance_region else 0
    size = len(encode_packet(0, op))
    if items_len + 8 < 1022:
        assert size == 1024
    elif items_len + 8 < 1024:
        assert size == items_len + 8 + 3  # empty padding item: 1025 or 1026
    else:
        assert size == items_len + 8


@given(st.binary(max_size=1200), st.integers(0, 2**32 - 1))
def test_property_fast_builders_equal_encode_packet(payload: bytes, rid: int) -> None:
    assert encode_response(rid, payload) == encode_packet(rid, Operation(Op.RESPONSE, payload))
    assert encode_pong(rid, payload) == encode_packet(rid, Operation(Op.PONG, payload))


@given(st.binary(max_size=2000))
def test_property_random_bodies_only_raise_protocol_error(body: bytes) -> None:
    try:
        op = decode_body(body)
    except ProtocolError as exc:
        assert exc.code == ErrorCode.FORMAT
        assert exc.reason
        return
    assert 0 <= op.opcode <= 255
    assert len(op.ski) in (0, 20)
    assert len(op.digest) in (0, 32)
    assert len(op.client_ip) in (0, 4, 16)
    assert len(op.server_ip) in (0, 4, 16)


# Bodies built from plausible items so the decoder's deeper paths get exercised
# far more often than with uniform random bytes.
tag_values = st.sampled_from([int(t) for t in Tag] + [0x00, 0x07, 0x99, 0xFF])
items = st.builds(
    item,
    tag_values,
    st.one_of(
        st.binary(max_size=3),
        st.binary(min_size=4, max_size=4),
        st.binary(min_size=16, max_size=33),
    ),
)
structured_bodies = st.builds(
    lambda parts, tail: b"".join(parts) + tail,
    st.lists(items, max_size=8),
    st.binary(max_size=4),
)


@given(structured_bodies)
def test_property_structured_bodies_only_raise_protocol_error(body: bytes) -> None:
    try:
        decode_body(body)
    except ProtocolError as exc:
        assert exc.code == ErrorCode.FORMAT


def _frame(major: int, rid: int, body: bytes) -> bytes:
    return packet(rid, body[:0xFFFF], major=major)


packets = st.one_of(
    st.builds(encode_packet, st.integers(0, 2**32 - 1), operations),
    st.builds(
        _frame, st.sampled_from([1, 1, 1, 2, 0]), st.integers(0, 2**32 - 1), structured_bodies
    ),
    st.builds(_frame, st.just(1), st.integers(0, 2**32 - 1), st.binary(max_size=50)),
)


@st.composite
def chunked(draw: st.DrawFn, stream: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    bounds = [0, *cuts, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds)]


def run(role: str, chunks: list[bytes]) -> list[Event]:
    conn = KeylessConnection(role=role)  # type: ignore[arg-type]
    events: list[Event] = []
    for c in chunks:
        events.extend(conn.receive_data(c))
    events.extend(conn.receive_eof())
    return events


@st.composite
def truncated_packet(draw: st.DrawFn) -> bytes:
    """A strict prefix of a packet (possibly empty): never a complete packet."""
    pkt = draw(packets)
    return pkt[: draw(st.integers(0, len(pkt) - 1))]


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=200)
@given(
    st.lists(packets, max_size=6),
    truncated_packet(),
    st.sampled_from(["server", "client"]),
    st.data(),
)
def test_property_chunking_invariance(
    pkts: list[bytes], tail: bytes, role: str, data: st.DataObject
) -> None:
    stream = b"".join(pkts) + tail
    whole = run(role, [stream])
    split = run(role, data.draw(chunked(stream)))
    # repr as well as ==, so the presence flags (not part of ==) must match too.
    assert split == whole
    assert [repr(e) for e in split] == [repr(e) for e in whole]
    # Every framed packet yields exactly one event, then exactly one close.
    assert len(whole) == len(pkts) + 1
    assert whole[-1] == ConnectionClosed(clean=not tail)
    bytewise = run(role, [stream[i : i + 1] for i in range(len(stream))])
    assert [repr(e) for e in bytewise] == [repr(e) for e in whole]


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=300), max_size=10), st.sampled_from(["server", "client"]))
def test_property_arbitrary_bytes_never_raise(chunks: list[bytes], role: str) -> None:
    events = run(role, chunks)
    whole = run(role, [b"".join(chunks)])
    assert [repr(e) for e in events] == [repr(e) for e in whole]
    assert isinstance(events[-1], ConnectionClosed)
    for e in events[:-1]:
        assert isinstance(e, (Request, BadRequest) if role == "server" else (Response, BadResponse))
