"""The packet vectors of the keyless protocol notes (section 14), byte for byte.

Each vector is written out as hex from the notes' description ("pad N" is a
0x20 item followed by N zero bytes) and checked both ways: our encoder must
produce exactly these bytes, and our decoder must read them back.
"""

from __future__ import annotations

import pytest

from gateway.protocol import (
    BadRequest,
    ConnectionClosed,
    ErrorCode,
    KeylessConnection,
    Op,
    Operation,
    Request,
    Response,
    decode_body,
    decode_packet,
    encode_error,
    encode_packet,
    encode_pong,
    encode_response,
)


def h(*parts: str) -> bytes:
    return bytes.fromhex("".join(parts).replace(" ", ""))


def pad(n: int) -> str:
    return f"20 {n:04x}" + "00" * n


# Test-key SKIs and the hashes of "Hello!" (section 14 tables).
SKI_RSA = "406550d87609ecae021a83ef2c1f372c08f42699"
SKI_ECDSA = "d9c69b8e23abba7c26fd5d0e282f3dd679741036"
SKI_ED25519 = "1b5e422431d15e92e88312c04807591d62c2b687"
DIGEST_RSA = "077c4b2c6209fbbbe17535cae7962a7d04d317edd50918814c05e0e02d23284e"
HELLO = "48656c6c6f21"
SHA256_HELLO = "334d016f755cd6dc58c53a86e183882f8ec14f52fb05345887c8a5edd42c87b7"
MD5_HELLO = "952d2c56d0485958336747bcdd98590d"
SHA1_HELLO = "69342c5c39e5ae5f0077aecc32c0f81811fb8193"
MD5SHA1_HELLO = MD5_HELLO + SHA1_HELLO

# 1. Ping, ID 0, payload "Hello!"; the reply differs only in the opcode.
V1_PING = h("01 00 03f8 00000000", "11 0001 f1", f"12 0006 {HELLO}", pad(1000))
V1_PONG = h("01 00 03f8 00000000", "11 0001 f2", f"12 0006 {HELLO}", pad(1000))
# 2. Ping without payload, ID 7; the pong has no payload item either.
V2_PING = h("01 00 03f8 00000007", "11 0001 f1", pad(1009))
V2_PONG = h("01 00 03f8 00000007", "11 0001 f2", pad(1009))
# 3. ECDSA-SHA256 sign, ID 1, P-256 test key.
V3 = h(
    "01 00 03f8 00000001", "11 0001 15", f"12 0020 {SHA256_HELLO}", f"04 0014 {SKI_ECDSA}", pad(951)
)
# 4. RSA MD5SHA1 sign, ID 2, server IP 127.0.0.1, SNI "localhost".
V4 = h(
    "01 00 03f8 00000002",
    "11 0001 02",
    f"12 0024 {MD5SHA1_HELLO}",
    f"04 0014 {SKI_RSA}",
    "05 0004 7f000001",
    "02 0009 6c6f63616c686f7374",
    pad(928),
)
# 8. Error reply, key not found, ID 0x12345678.
V8 = h("01 00 03f8 12345678", "11 0001 ff", "12 0001 02", pad(1005))
# 10. Vector 3 plus compliance region 1: still 1024 bytes, padding 947.
V10 = h(
    "01 00 03f8 00000001",
    "11 0001 15",
    f"12 0020 {SHA256_HELLO}",
    f"04 0014 {SKI_ECDSA}",
    "17 0001 01",
    pad(947),
)


def test_vector_lengths_are_as_documented() -> None:
    # Guards the hex above against typos: every padded vector is 1024 bytes
    # with header length 0x03f8.
    for vec in (V1_PING, V1_PONG, V2_PING, V2_PONG, V3, V4, V8, V10):
        assert len(vec) == 1024
        assert vec[2:4] == b"\x03\xf8"


# ---------------------------------------------------------------- 1 and 2


def test_vector1_ping_encode() -> None:
    assert encode_packet(0, Operation(Op.PING, h(HELLO))) == V1_PING


def test_vector1_pong_encode_both_ways() -> None:
    assert encode_pong(0, b"Hello!") == V1_PONG
    assert encode_packet(0, Operation(Op.PONG, b"Hello!")) == V1_PONG


def test_vector1_decode() -> None:
    rid, op = decode_packet(V1_PING)
    assert rid == 0
    assert op == Operation(Op.PING, b"Hello!")
    assert op.has_payload is True
    assert op.has_opcode is True


def test_vector2_ping_without_payload() -> None:
    assert encode_packet(7, Operation(Op.PING)) == V2_PING
    rid, op = decode_packet(V2_PING)
    assert rid == 7
    assert op.opcode == Op.PING
    assert op.payload == b""
    # No payload item on the wire (the Go health checker's ping).
    assert op.has_payload is False


def test_vector2_pong_has_no_payload_item() -> None:
    assert encode_pong(7, b"") == V2_PONG
    assert encode_pong(7) == V2_PONG
    assert encode_packet(7, Operation(Op.PONG)) == V2_PONG


# ---------------------------------------------------------------- 3 and 4


def test_vector3_ecdsa_sign_request() -> None:
    op = Operation(Op.ECDSA_SIGN_SHA256, h(SHA256_HELLO), ski=h(SKI_ECDSA))
    assert encode_packet(1, op) == V3
    assert decode_packet(V3) == (1, op)


def test_vector4_rsa_md5sha1_with_server_ip_and_sni() -> None:
    op = Operation(
        Op.RSA_SIGN_MD5SHA1,
        h(MD5SHA1_HELLO),
        ski=h(SKI_RSA),
        server_ip=bytes([127, 0, 0, 1]),
        sni=b"localhost",
    )
    assert len(op.payload) == 36
    assert encode_packet(2, op) == V4
    rid, decoded = decode_packet(V4)
    assert rid == 2
    assert decoded == op
    assert decoded.server_ip == b"\x7f\x00\x00\x01"
    assert decoded.sni == b"localhost"


def test_vector4_server_ip_given_as_v4_mapped_ipv6_is_written_as_4_bytes() -> None:
    # Go's net.IP is often the 16-byte form; To4() makes it 4 bytes on the wire.
    mapped = bytes(10) + b"\xff\xff" + bytes([127, 0, 0, 1])
    op = Operation(
        Op.RSA_SIGN_MD5SHA1, h(MD5SHA1_HELLO), ski=h(SKI_RSA), server_ip=mapped, sni=b"localhost"
    )
    assert encode_packet(2, op) == V4


# ---------------------------------------------------------------- 8


def test_vector8_error_reply() -> None:
    assert encode_error(0x12345678, ErrorCode.KEY_NOT_FOUND) == V8
    assert encode_packet(0x12345678, Operation(Op.ERROR, b"\x02")) == V8


def test_vector8_client_side_decode() -> None:
    conn = KeylessConnection(role="client")
    [event] = conn.receive_data(V8)
    assert event == Response(0x12345678, Op.ERROR, b"\x02")
    assert isinstance(event, Response)
    assert event.error_code == ErrorCode.KEY_NOT_FOUND


def test_vector1_client_side_decode_of_the_pong() -> None:
    conn = KeylessConnection(role="client")
    assert conn.receive_data(V1_PONG) == [Response(0, Op.PONG, b"Hello!")]


# ---------------------------------------------------------------- 9 size edges


def test_vector9_response_1000_bytes_is_1024_with_pad_6() -> None:
    pkt = encode_response(5, bytes(1000))
    assert len(pkt) == 1024
    assert pkt[2:4] == (1016).to_bytes(2, "big")
    assert pkt[8:15] == h("11 0001 f0", "12 03e8")
    assert pkt[-9:] == h(pad(6))
    assert pkt == encode_packet(5, Operation(Op.RESPONSE, bytes(1000)))


def test_vector9_response_2000_bytes_is_2015_without_padding() -> None:
    payload = bytes(range(256)) * 7 + bytes(208)
    pkt = encode_response(5, payload)
    assert len(pkt) == 2015
    assert pkt[2:4] == h("07d7")
    assert pkt[8:15] == h("11 0001 f0", "12 07d0")
    assert pkt[15:] == payload  # nothing after the payload: no padding item
    assert pkt == encode_packet(5, Operation(Op.RESPONSE, payload))


def test_vector9_response_1007_bytes_gets_empty_padding_item() -> None:
    pkt = encode_response(5, bytes(1007))
    assert len(pkt) == 1025
    assert pkt[-3:] == h("20 0000")
    assert pkt == encode_packet(5, Operation(Op.RESPONSE, bytes(1007)))
    assert decode_body(pkt[8:]).payload == bytes(1007)


# ---------------------------------------------------------------- 10


def test_vector10_compliance_region() -> None:
    op = Operation(Op.ECDSA_SIGN_SHA256, h(SHA256_HELLO), ski=h(SKI_ECDSA), compliance_region=1)
    assert encode_packet(1, op) == V10
    rid, decoded = decode_packet(V10)
    assert rid == 1
    assert decoded.compliance_region == 1
    assert decoded == op


def test_vector10_region_adds_4_bytes_once_over_1024() -> None:
    base = Operation(Op.RESPONSE, bytes(2000))
    with_region = Operation(Op.RESPONSE, bytes(2000), compliance_region=1)
    assert len(encode_packet(0, with_region)) - len(encode_packet(0, base)) == 4


# ---------------------------------------------------------------- 12 round trip


def test_vector12_round_trip_of_every_field() -> None:
    op = Operation(
        opcode=Op.ECDSA_SIGN_SHA256,
        payload=bytes((i * 7) & 0xFF for i in range(1000)),
        extra=bytes((i * 3 + 1) & 0xFF for i in range(100)),
        ski=h(SKI_ED25519),
        digest=h(DIGEST_RSA),
        client_ip=bytes(range(16)),
        server_ip=bytes([192, 0, 2, 1]),
        sni=b"example.com",
        cert_id=b"cert-id-1",
        custom_func_name=b"my_custom_op",
        jaeger_span=b"4bf92f3577b34da6:00f067aa0ba902b7:0:1",
        req_context=b'{"request_id":"' + b"x" * 83 + b'"}',
        compliance_region=1,
    )
    assert len(op.req_context) == 100
    pkt = encode_packet(0xDEADBEEF, op)
    rid, decoded = decode_packet(pkt)
    assert rid == 0xDEADBEEF
    assert decoded == op
    # Over 1024 bytes, so no padding: the body is exactly the 13 items.
    fields = (op.payload, op.extra, op.ski, op.digest, op.client_ip, op.server_ip, op.sni,
              op.cert_id, op.custom_func_name, op.jaeger_span, op.req_context)  # fmt: skip
    assert len(pkt) == 8 + 4 + 4 + sum(3 + len(f) for f in fields)


# ---------------------------------------------------------------- 11 negatives


def _c_ping(request_id: int, payload: bytes, *, major: int = 1, opcode: int = Op.PING) -> bytes:
    pkt = bytearray(encode_packet(request_id, Operation(opcode, payload)))
    pkt[0] = major
    return bytes(pkt)


@pytest.mark.parametrize("opcode", [0xBB, Op.PONG, Op.ERROR, Op.RESPONSE, 0x20, 0x00])
def test_vector11_unknown_or_response_opcode_is_not_a_codec_error(opcode: int) -> None:
    # 0x05/0x06 are the dispatcher's answers; the codec just reports the byte.
    conn = KeylessConnection()
    [event] = conn.receive_data(_c_ping(0x12345678, b"x", opcode=opcode))
    assert event == Request(0x12345678, Operation(opcode, b"x"))


def test_vector11_major_version_2_is_bad_request_and_next_packet_parses() -> None:
    stream = _c_ping(0x12345678, b"Hello, World!", major=2) + _c_ping(0x1234567A, b"Hello, World!")
    conn = KeylessConnection()
    events = conn.receive_data(stream)
    assert len(events) == 2
    bad, good = events
    assert isinstance(bad, BadRequest)
    assert bad.request_id == 0x12345678
    assert bad.code == ErrorCode.VERSION_MISMATCH
    assert good == Request(0x1234567A, Operation(Op.PING, b"Hello, World!"))


def test_vector11_minor_version_is_ignored() -> None:
    pkt = bytearray(_c_ping(0x12345678, b"hi"))
    pkt[1] = 7
    conn = KeylessConnection()
    assert conn.receive_data(bytes(pkt)) == [Request(0x12345678, Operation(Op.PING, b"hi"))]


def test_vector11_version_mismatch_answer() -> None:
    # The reply the adapter sends for the BadRequest above.
    assert encode_error(0x12345678, ErrorCode.VERSION_MISMATCH) == h(
        "01 00 03f8 12345678", "11 0001 ff", "12 0001 04", pad(1005)
    )


def test_vector11_missing_payload_item_decodes_with_has_payload_false() -> None:
    body = h("11 0001 05", f"04 0014 {SKI_RSA}", pad(0))
    op = decode_body(body)
    assert op.opcode == Op.RSA_SIGN_SHA256
    assert op.payload == b""
    assert op.has_payload is False
    # An explicitly empty payload item is different, and visible.
    op2 = decode_body(h("11 0001 05", "12 0000", f"04 0014 {SKI_RSA}"))
    assert op2.payload == b""
    assert op2.has_payload is True


def test_vector11_ping_hello_world_is_echoed() -> None:
    conn = KeylessConnection()
    [event] = conn.receive_data(_c_ping(0x12345678, b"Hello, World!"))
    assert isinstance(event, Request)
    reply = encode_pong(event.request_id, event.operation.payload)
    client = KeylessConnection(role="client")
    assert client.receive_data(reply) == [Response(0x12345678, Op.PONG, b"Hello, World!")]
    assert client.receive_eof() == [ConnectionClosed(clean=True)]


def test_vector11_c_server_style_1027_byte_packets_decode() -> None:
    # The C server pads the data to 1024 and puts the item header on top.
    pkt = h("01 00 03fb 12345678", "11 0001 ff", "12 0001 07", pad(1008))
    assert len(pkt) == 1027
    rid, op = decode_packet(pkt)
    assert rid == 0x12345678
    assert op == Operation(Op.ERROR, b"\x07")
