"""The whole path through real processes: keyless client → mutual TLS → gateway →
gRPC over mutual TLS → two signers → SoftHSM2.

The shared PROTOCOL.md test keys are imported into the token so the deterministic
vectors of section 14 can be checked byte for byte on the wire.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from harness import Cluster, Pki, eventually, http_get, make_pki, split
from softhsm import SoftHsmToken

from gateway.client import KeylessClient, KeylessError
from gateway.protocol import ErrorCode, Op, Operation, encode_packet
from gateway.selfcheck import check_key, load_key_dir, verify
from signer.common.process import Service
from signer.common.runtime import uvloop_installed
from signer.common.tls import keyless_client_context
from signer.hsm import admin
from signer.hsm.pool import Token

RSA_SKI = bytes.fromhex("406550d87609ecae021a83ef2c1f372c08f42699")
ECDSA_SKI = bytes.fromhex("d9c69b8e23abba7c26fd5d0e282f3dd679741036")
ED25519_SKI = bytes.fromhex("1b5e422431d15e92e88312c04807591d62c2b687")
HELLO = b"Hello!"


def pad(n: int) -> str:
    return "20" + f"{n:04x}" + "00" * n


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def token(softhsm: SoftHsmToken, shared_vectors: Path) -> SoftHsmToken:
    with Token(softhsm.uri(), sessions=1) as tok:
        for name in ("rsa", "ecdsa", "ed25519"):
            admin.import_pem(tok, (shared_vectors / f"{name}.key").read_bytes(), f"vec-{name}")
        for kind in ("p384", "rsa3072"):
            admin.generate_key(tok, kind, f"gen-{kind}")
    return softhsm


@pytest.fixture(scope="module")
def cluster(token: SoftHsmToken, pki: Pki,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("cluster"), pki, token)
    a = c.start_signer(sessions=2)
    b = c.start_signer(sessions=2)
    c.start_gateway([a.address, b.address], max_conn_pending_requests=64)
    yield c
    c.stop_all()


def gateway_address(cluster: Cluster) -> tuple[str, int]:
    return split(next(s for s in cluster.services if s.name.startswith("gateway")).address)


def client_ctx(pki: Pki, issued: object | None = None) -> ssl.SSLContext:
    who = issued or pki.client
    return keyless_client_context(pki.ca_pem, who.cert, who.key)  # type: ignore[attr-defined]


async def connect(cluster: Cluster, issued: object | None = None) -> KeylessClient:
    host, port = gateway_address(cluster)
    return await KeylessClient.connect(host, port, client_ctx(cluster.pki, issued),
                                       server_hostname="localhost")


class RawConn:
    """A blocking TLS socket for byte-exact exchanges."""

    def __init__(self, cluster: Cluster, issued: object | None = None) -> None:
        host, port = gateway_address(cluster)
        raw = socket.create_connection((host, port), timeout=10)
        self.sock = client_ctx(cluster.pki, issued).wrap_socket(raw, server_hostname="localhost")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_packet(self) -> bytes:
        header = self._exact(8)
        length = int.from_bytes(header[2:4], "big")
        return header + self._exact(length)

    def _exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        return buf

    def closed_by_peer(self, timeout: float) -> bool:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except TimeoutError:
            return False
        except (ssl.SSLError, ConnectionError):
            return True

    def close(self) -> None:
        self.sock.close()


# -- PROTOCOL.md section 14, byte for byte ------------------------------------------


def test_vector_1_ping_echo(cluster: Cluster) -> None:
    req = bytes.fromhex("0100 03f8 00000000 110001f1 120006 48656c6c6f21".replace(" ", "") + pad(1000))
    conn = RawConn(cluster)
    conn.send(req)
    assert conn.recv_packet() == req[:11] + b"\xf2" + req[12:]
    conn.close()


def test_vector_2_empty_ping(cluster: Cluster) -> None:
    req = bytes.fromhex("010003f800000007110001f1" + pad(1009))
    conn = RawConn(cluster)
    conn.send(req)
    assert conn.recv_packet() == bytes.fromhex("010003f800000007110001f2" + pad(1009))
    conn.close()


def test_vector_4_rsa_md5sha1_exact_signature(cluster: Cluster) -> None:
    digest = hashlib.md5(HELLO).digest() + hashlib.sha1(HELLO).digest()
    req = bytes.fromhex(
        "010003f800000002" "11000102" "120024" + digest.hex() + "040014" + RSA_SKI.hex()
        + "0500047f000001" "0200096c6f63616c686f7374" + pad(928)
    )
    expected_sig = bytes.fromhex(
        "0264b35021ced7ba444ef1321b1ed71b52402199c3c81ebf38f392d7e8d9999899de45a8d68440dc2a3d68e2bc4ced32eb890223b1629e23226ee69e199c47bbfd7e1c57ca4b128693da371bb883fcf2f1da34a288f9e9a03ad21fe7ef0796c84a082afca1c16d454018ad362dde6fa6a977c7cadea6fa7085b31c8362d3905ddb5e0dd7f23b4021709709734acd0a76e53d1bb95b83f68694ec629634d3907cbaa38829b96eb6bc04975475340c494d19fe9b3e9b0fd6663f144f422f2e764a56b09f298694f6f7796b5d3502718a1f16d2f21a8d1f5f07756f7224caeae00f06466dcbf212f80be5f7308839e009b97da47841809074a72e971714429c9413"
    )
    conn = RawConn(cluster)
    conn.send(req)
    resp = conn.recv_packet()
    # Response: header (id 2), opcode f0, the 256-byte signature, padded to 1024.
    assert resp == bytes.fromhex("010003f800000002" "110001f0" "120100") + expected_sig + bytes.fromhex(pad(1024 - 8 - 4 - 259 - 3))
    conn.close()


def test_vectors_5_6_7_deterministic_results(cluster: Cluster) -> None:
    async def go() -> None:
        async with await connect(cluster) as c:
            sig = await c.sign(Op.RSA_SIGN_SHA256, RSA_SKI, hashlib.sha256(HELLO).digest())
            assert sig.hex() == (
                "4901b1afce8ce5b3ad3d801299630fe06497450581547d0dca6e83db7ee72728a3fa00a8a511f11a427ecdc87e2c243dd331a06fea54b73d946ac6f04ab76e7b6983b33bcd9e181516aafbde74bc3ec2356ea4aceaeb4589fd2f6e4cce5985680b4756c97ed63cf082648e191ef6ecd87698c08418b4e83251906f950c47ffd3cf452572807d3170523708bfddb297fefe87314900d390d0088baf94a9e6936e5a4202d9da96739baf484c5af77a1b3df71053424974aa3e6891239e8e565b089cb49a06eff4151b021f599934025e3019fa116ee734ab7fa988573d9880738b8c765d678bada79df8f883161935410312b6d68ebeb83fee8f6b06447eec0179"
            )
            msg = b"\x20" * 64 + b"TLS 1.3, server CertificateVerify" + b"\x00" + b"\x01" * 32
            assert (await c.sign(Op.ED25519_SIGN, ED25519_SKI, msg)).hex() == (
                "3d1b88a781991e0661fae5c4415592bc32fa8d466dcfb0e3cd40e722207da3f3f239a5399fd7b37ec0ed5d97895a3f1322c1c0ed457c92ec1de0bc35f06e9f0c"
            )
            assert (await c.sign(Op.ED25519_SIGN, ED25519_SKI, HELLO)).hex() == (
                "fce36cc1b64f51e04dd8e95dfb9f52242e41e5e06fcc686aaf8cde167cd67eeab522904b381f4848c4925264442124a9e6de1ad34d900e15f4125ce8a41d7705"
            )
            ct = bytes.fromhex(
                "116238f959bfacc7d37a7aa13df9cf9c1d4070d43f254e574e60d13bd14199bde4a3fb50690cce837eb466c4c6db72ffe0196d73c33d01e59220c4c66eba395365f63a16c01a3812e8b0d63e36b3bba02f218e7121327a0579f923d663f6d9c006cfc64cd93dcefc48b3892eb0f77c6b301bcea317342ec321bae234f8de274ad9ac31e2da2f952364ea08ccd304d7867879fb2f0f41d35cb2a21cf9a2dd7da5741c7a48a2522575a14e740c5e12a56f4a5d26fdccbaad54ee282785026cbcd0f30f8f213758cd51ab7f355be545ae324d0ec9c1f6b00acae80315d9843861aa8e73afc1f9c7a855d8ec5695e32fa54240e95a74c14a4c6372666877f7cecf14"
            )
            em = b"\x00\x02" + b"\x5a" * 247 + b"\x00" + HELLO
            # Raw for 0x01 (as gokeyless with software keys, for every key kind here)
            # and for 0x08 (the C server's raw opcode).
            assert await c.decrypt(RSA_SKI, ct, opcode=Op.RSA_DECRYPT) == em
            assert await c.decrypt(RSA_SKI, ct, opcode=Op.RSA_DECRYPT_RAW) == em

    asyncio.run(go())


def test_vector_3_ecdsa_verifies_and_vector_8_error_bytes(cluster: Cluster, shared_vectors: Path) -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, utils

    digest = hashlib.sha256(HELLO).digest()
    req = bytes.fromhex("010003f800000001" "11000115" "120020" + digest.hex()
                        + "040014" + ECDSA_SKI.hex() + pad(951))
    conn = RawConn(cluster)
    conn.send(req)
    resp = conn.recv_packet()
    assert resp[:8] == bytes.fromhex("010003f800000001") and resp[8:12] == bytes.fromhex("110001f0")
    sig_len = int.from_bytes(resp[13:15], "big")
    pub = serialization.load_pem_public_key((shared_vectors / "ecdsa.pubkey").read_bytes())
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    pub.verify(resp[15:15 + sig_len], digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    # Vector 8: key not found, id 0x12345678.
    conn.send(encode_packet(0x12345678, Operation(opcode=Op.ECDSA_SIGN_SHA256, ski=b"\x01" * 20,
                                                  payload=digest)))
    assert conn.recv_packet() == bytes.fromhex("010003f812345678" "110001ff" "12000102" + pad(1005))
    conn.close()


def test_negative_cases_of_14_11(cluster: Cluster) -> None:
    conn = RawConn(cluster)

    def ask(packet: bytes) -> bytes:
        conn.send(packet)
        resp = conn.recv_packet()
        return resp

    def err(rid: int, code: int) -> bytes:
        return bytes.fromhex(f"010003f8{rid:08x}110001ff120001{code:02x}" + pad(1005))

    assert ask(encode_packet(0x12345678, Operation(opcode=0xBB, payload=b"x"))) == err(0x12345678, 0x05)
    assert ask(encode_packet(0x1234567A, Operation(opcode=0xF2))) == err(0x1234567A, 0x06)
    assert ask(encode_packet(3, Operation(opcode=0xFF))) == err(3, 0x06)
    assert ask(encode_packet(4, Operation(opcode=0xF0))) == err(4, 0x06)
    for op in (Op.SEAL, Op.UNSEAL, Op.RPC, Op.CUSTOM):
        assert ask(encode_packet(5, Operation(opcode=op, payload=b"x"))) == err(5, 0x05)
    # Major version 2: 0x04, and the connection stays.
    assert ask(encode_packet(6, Operation(opcode=Op.PING, payload=b"v2"), version=(2, 0))) == err(6, 0x04)
    # A sign with no payload item: 0x07; a sign without SKI: 0x07 (gokeyless: 0x08).
    no_payload = encode_packet(7, Operation(opcode=Op.ECDSA_SIGN_SHA256, ski=ECDSA_SKI))
    assert ask(no_payload) == err(7, 0x07)
    assert ask(encode_packet(8, Operation(opcode=Op.ECDSA_SIGN_SHA256, payload=b"x" * 32))) == err(8, 0x07)
    # ECDSA opcode on the RSA key: 0x01, without a signer round trip.
    assert ask(encode_packet(9, Operation(opcode=Op.ECDSA_SIGN_SHA256, ski=RSA_SKI,
                                          payload=b"x" * 32))) == err(9, 0x01)
    # Wrong digest length for the key's algorithm: the signer says INVALID_ARGUMENT → 0x01.
    assert ask(encode_packet(10, Operation(opcode=Op.RSA_SIGN_SHA256, ski=RSA_SKI,
                                           payload=b"x" * 31))) == err(10, 0x01)
    # Ping "Hello, World!" still echoed on the same connection after all that.
    ping = encode_packet(11, Operation(opcode=Op.PING, payload=b"Hello, World!"))
    assert ask(ping) == ping[:11] + b"\xf2" + ping[12:]
    conn.close()


# -- every operation, verified ---------------------------------------------------------


def test_every_operation_of_every_key_verified(cluster: Cluster) -> None:
    keys = load_key_dir_from(cluster)
    assert len(keys) == 5

    async def go() -> dict[str, int]:
        counts: dict[str, int] = {}
        async with await connect(cluster) as c:
            for kf in keys:
                results = await check_key(c, kf)
                failed = [r for r in results if not r.ok]
                assert not failed, failed
                counts[kf.name] = len(results)
        return counts

    counts = asyncio.run(go())
    # RSA: MD5SHA1 + 5 PKCS#1 + 3 PSS + 2 decrypt opcodes; EC: 6; Ed25519: 1.
    assert counts == {"vec-rsa": 11, "gen-rsa3072": 11, "vec-ecdsa": 6, "gen-p384": 6,
                      "vec-ed25519": 1}


def test_slow_rsa_is_overtaken_by_fast_ecdsa_on_one_connection(cluster: Cluster) -> None:
    async def go() -> list[str]:
        order: list[str] = []
        async with await connect(cluster) as c:
            rsa_ski = next(k.ski for k in load_key_dir_from(cluster) if k.name == "gen-rsa3072")
            digest = hashlib.sha256(HELLO).digest()

            async def one(name: str, opcode: int, ski: bytes) -> None:
                await c.sign(opcode, ski, digest)
                order.append(name)

            tasks = [asyncio.create_task(one("rsa", Op.RSA_SIGN_SHA256, rsa_ski))]
            await asyncio.sleep(0)
            tasks += [asyncio.create_task(one(f"ec{i}", Op.ECDSA_SIGN_SHA256, ECDSA_SKI))
                      for i in range(20)]
            await asyncio.gather(*tasks)
        return order

    order = asyncio.run(go())
    assert len(order) == 21
    assert order.index("rsa") > 0, f"no ECDSA answer overtook the RSA-3072 one: {order}"


_KEYS: list = []


def load_key_dir_from(cluster: Cluster) -> list:
    """The cluster's keys as KeyFiles (via ListKeys of one signer), cached."""
    if not _KEYS:
        import tempfile

        from signer.client import SyncSignerClient

        pki = cluster.pki
        signer = next(s for s in cluster.services if s.name.startswith("signer"))
        d = Path(tempfile.mkdtemp())
        with SyncSignerClient(signer.address, ca=pki.ca_pem, cert=pki.gateway_signer_client.cert,
                              key=pki.gateway_signer_client.key, server_name="localhost") as sc:
            for k in sc.list_keys().keys:
                pem = serialization.load_der_public_key(k.public_key).public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
                (d / f"{k.label}.pubkey").write_bytes(pem)
        _KEYS.extend(load_key_dir(d))
    return _KEYS


def test_pipelined_requests_with_reused_ids_all_answered(cluster: Cluster) -> None:
    """gokeyless's bench sends every request with id 0; the answers must all come."""
    digest = hashlib.sha256(HELLO).digest()
    packet = encode_packet(0, Operation(opcode=Op.ECDSA_SIGN_SHA256, ski=ECDSA_SKI, payload=digest))
    conn = RawConn(cluster)
    conn.send(packet * 200)
    answers = [conn.recv_packet() for _ in range(200)]
    assert all(a[4:8] == b"\x00\x00\x00\x00" and a[11] == 0xF0 for a in answers)
    conn.close()


# -- connections, TLS, malformed input ----------------------------------------------------


def handshake_failures(gateway: Service) -> dict[str, float]:
    """keyward_tls_handshake_failures by reason, from the gateway's /metrics."""
    _, text = http_get(gateway.fields["metrics"], "/metrics")
    prefix = 'keyward_tls_handshake_failures{reason="'
    return {line[len(prefix):].split('"')[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line.startswith(prefix)}


def refuse_strangers(cluster: Cluster, address: str) -> None:
    """A client without a certificate and one from another CA both fail the
    handshake; each is counted by reason; the gateway serves on."""
    host, port = split(address)
    gateway = next(s for s in cluster.services if s.address == address)
    before = sum(handshake_failures(gateway).values())
    no_cert = keyless_client_context(cluster.pki.ca_pem, None, None)
    for ctx in (no_cert, client_ctx(cluster.pki, cluster.pki.stranger)):
        raw = socket.create_connection((host, port), timeout=10)
        with pytest.raises((ssl.SSLError, ConnectionError)):
            s = ctx.wrap_socket(raw, server_hostname="localhost")
            # TLS 1.3 reports the refused certificate on the first read.
            s.sendall(encode_packet(1, Operation(opcode=Op.PING)))
            if not s.recv(1):
                raise ConnectionError("closed")
        raw.close()
    def both_counted() -> dict[str, float] | None:
        failures = handshake_failures(gateway)
        return failures if sum(failures.values()) >= before + 2 else None

    counted = eventually(both_counted, "both refused handshakes in keyward_tls_handshake_failures")
    assert any("certificate" in reason for reason in counted), counted
    # The gateway is unharmed.
    asyncio.run(_ping_ok(address, cluster.pki))


def test_client_without_certificate_or_from_another_ca_is_refused(cluster: Cluster) -> None:
    host, port = gateway_address(cluster)
    refuse_strangers(cluster, f"{host}:{port}")


async def _ping_ok(address: str, pki: Pki) -> None:
    host, port = split(address)
    async with await KeylessClient.connect(host, port, client_ctx(pki),
                                           server_hostname="localhost") as c:
        assert await c.ping(b"still here") == b"still here"


@pytest.mark.parametrize("event_loop", ["asyncio", "uvloop"])
def test_the_gateway_serves_on_either_event_loop(cluster: Cluster, event_loop: str) -> None:
    """``event_loop: auto`` picks uvloop where it is installed; both loops must serve
    the whole path: mutual TLS, pipelined signing, refused handshakes counted."""
    if event_loop == "uvloop" and not uvloop_installed():
        pytest.skip("uvloop is not installed")
    signers = [s.address for s in cluster.services if s.name.startswith("signer")]
    gw = cluster.start_gateway(signers, event_loop=event_loop)
    try:
        host, port = split(gw.address)
        key = next(k for k in load_key_dir_from(cluster) if k.name == "vec-ecdsa")

        async def go() -> None:
            async with await KeylessClient.connect(host, port, client_ctx(cluster.pki),
                                                   server_hostname="localhost") as c:
                digest = hashlib.sha256(b"either loop").digest()
                sigs = await asyncio.gather(*(c.sign(Op.ECDSA_SIGN_SHA256, key.ski, digest)
                                              for _ in range(50)))
            for sig in sigs:
                verify(key.public_key, "ecdsa-sha256", b"either loop", sig, digest)

        asyncio.run(go())
        refuse_strangers(cluster, gw.address)
    finally:
        gw.stop()
        cluster.services.remove(gw)


def test_tls12_with_the_edge_cipher_suites(cluster: Cluster) -> None:
    host, port = gateway_address(cluster)
    for cipher in ("ECDHE-ECDSA-AES256-GCM-SHA384",):
        ctx = client_ctx(cluster.pki)
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers(cipher)
        with socket.create_connection((host, port), timeout=10) as raw, \
                ctx.wrap_socket(raw, server_hostname="localhost") as s:
            assert s.version() == "TLSv1.2" and s.cipher()[0] == cipher
    ctx = client_ctx(cluster.pki)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256")  # not one the edge uses: refused
    with socket.create_connection((host, port), timeout=10) as raw, pytest.raises(ssl.SSLError):
        ctx.wrap_socket(raw, server_hostname="localhost")


def test_malformed_and_truncated_packets(cluster: Cluster) -> None:
    conn = RawConn(cluster)
    other = RawConn(cluster)
    # An item that runs past the end of the body: 0x07 under the packet's id.
    bad = bytes.fromhex("0100000700000021" "110001f1" "1200ff")
    conn.send(bad)
    assert conn.recv_packet() == bytes.fromhex("010003f800000021110001ff12000107" + pad(1005))
    # Duplicate opcode item.
    dup = bytes.fromhex("0100000800000022" "110001f1" "110001f1")
    conn.send(dup)
    assert conn.recv_packet()[8:16] == bytes.fromhex("110001ff12000107")
    # The connection still works.
    ping = encode_packet(23, Operation(opcode=Op.PING, payload=b"ok"))
    conn.send(ping)
    assert conn.recv_packet() == ping[:11] + b"\xf2" + ping[12:]
    # A truncated packet, then the client goes away: the server just closes.
    conn.send(ping[:100])
    conn.close()
    # Other connections are unharmed.
    other.send(ping)
    assert other.recv_packet() == ping[:11] + b"\xf2" + ping[12:]
    other.close()


def test_idle_connection_closed_and_unix_socket(cluster: Cluster, tmp_path: Path) -> None:
    signers = [s.address for s in cluster.services if s.name.startswith("signer")]
    sock = tmp_path / "keyless.sock"
    gw = cluster.start_gateway(signers, tcp_timeout="1s", unix_socket=str(sock))
    try:
        host, port = split(gw.address)
        raw = socket.create_connection((host, port), timeout=10)
        s = client_ctx(cluster.pki).wrap_socket(raw, server_hostname="localhost")
        s.sendall(encode_packet(1, Operation(opcode=Op.PING)))
        assert len(s.recv(2048)) > 0
        t0 = time.monotonic()
        s.settimeout(10)
        try:
            closed = s.recv(1) == b""
        except (ssl.SSLError, ConnectionError):
            closed = True
        assert closed and time.monotonic() - t0 < 8
        s.close()

        async def over_unix() -> bytes:
            c = await KeylessClient.connect_unix(str(sock), client_ctx(cluster.pki),
                                                 server_hostname="localhost")
            async with c:
                return await c.sign(Op.ECDSA_SIGN_SHA256, ECDSA_SKI, hashlib.sha256(HELLO).digest())

        assert len(asyncio.run(over_unix())) > 60
    finally:
        gw.stop()
        cluster.services.remove(gw)


def test_backpressure_at_the_connection_cap(cluster: Cluster, tmp_path: Path) -> None:
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps({"delay_ms": 20, "calls": ["sign"]}))
    slow = cluster.start_signer(sessions=1, test_fault_file=str(faults))
    gw = cluster.start_gateway([slow.address], max_conn_pending_requests=4)
    try:
        host, port = split(gw.address)

        async def go() -> int:
            ctx = client_ctx(cluster.pki)
            async with await KeylessClient.connect(host, port, ctx, server_hostname="localhost") as c:
                digest = hashlib.sha256(HELLO).digest()
                sigs = await asyncio.gather(*(c.sign(Op.ECDSA_SIGN_SHA256, ECDSA_SKI, digest)
                                              for _ in range(40)))
                return len([s for s in sigs if s])

        assert asyncio.run(go()) == 40
        assert "reads paused" in gw.log.read_text()
    finally:
        for svc in (gw, slow):
            svc.stop()
            cluster.services.remove(svc)


def test_unknown_key_and_all_signers_gone(cluster: Cluster) -> None:
    async def unknown() -> None:
        async with await connect(cluster) as c:
            with pytest.raises(KeylessError) as e:
                await c.sign(Op.ECDSA_SIGN_SHA256, b"\x42" * 20, b"x" * 32)
            assert e.value.code == ErrorCode.KEY_NOT_FOUND

    asyncio.run(unknown())
    lone = cluster.start_signer(sessions=1)
    gw = cluster.start_gateway([lone.address])
    try:
        lone.kill()
        host, port = split(gw.address)

        async def gone() -> float:
            ctx = client_ctx(cluster.pki)
            async with await KeylessClient.connect(host, port, ctx, server_hostname="localhost") as c:
                t0 = time.monotonic()
                with pytest.raises(KeylessError) as e:
                    await c.sign(Op.ECDSA_SIGN_SHA256, ECDSA_SKI, hashlib.sha256(HELLO).digest())
                assert e.value.code == ErrorCode.INTERNAL
                return time.monotonic() - t0

        # Answered at once, not after the 5 s request budget.
        assert asyncio.run(gone()) < 3.0
    finally:
        for svc in (gw, lone):
            svc.stop()
            cluster.services.remove(svc)
