"""The Signer API end to end: a real signer process, SoftHSM2, gRPC over mutual TLS."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils
from grpc_health.v1 import health_pb2
from harness import Cluster, Pki, make_pki
from softhsm import SoftHsmToken

from signer.client import SignerClient, SignerError, SyncSignerClient
from signer.hsm import admin
from signer.hsm.pool import Token
from signer.v1 import signer_pb2 as pb

MSG = b"Hello!"
HASHES = {
    "SHA1": hashes.SHA1, "SHA224": hashes.SHA224, "SHA256": hashes.SHA256,
    "SHA384": hashes.SHA384, "SHA512": hashes.SHA512,
}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def keyed_token(softhsm: SoftHsmToken) -> SoftHsmToken:
    with Token(softhsm.uri(), sessions=1) as token:
        for kind in ("rsa2048", "p256", "p384", "ed25519"):
            admin.generate_key(token, kind, f"k-{kind}")
    return softhsm


@pytest.fixture(scope="module")
def cluster(keyed_token: SoftHsmToken, pki: Pki,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("cluster"), pki, keyed_token)
    c.start_signer(sessions=2, allowed_clients=["keyward-gateway", "keyless-client"])
    yield c
    c.stop_all()


def client(cluster: Cluster, issued: object | None = None, *, wait: bool = True) -> SignerClient:
    who = issued or cluster.pki.gateway_signer_client
    return SignerClient(cluster.services[0].address, ca=cluster.pki.ca_pem,
                        cert=who.cert, key=who.key, server_name="localhost",  # type: ignore[attr-defined]
                        wait_for_ready=wait)


def digest(name: str, message: bytes = MSG) -> bytes:
    if name == "MD5SHA1":
        return hashlib.md5(message).digest() + hashlib.sha1(message).digest()
    return hashlib.new(name.lower(), message).digest()


def verify(key: pb.Key, algorithm: int, sig: bytes) -> None:
    pub = serialization.load_der_public_key(key.public_key)
    name = pb.Algorithm.Name(algorithm)
    h = name.rsplit("_", 1)[-1]
    if name == "ED25519":
        assert isinstance(pub, ed25519.Ed25519PublicKey)
        pub.verify(sig, MSG)
    elif name.startswith("RSA_PSS"):
        assert isinstance(pub, rsa.RSAPublicKey)
        alg = HASHES[h]()
        pub.verify(sig, digest(h), padding.PSS(padding.MGF1(alg), alg.digest_size),
                   utils.Prehashed(alg))
    elif name == "RSA_PKCS1V15_MD5SHA1":
        assert isinstance(pub, rsa.RSAPublicKey)
        nums = pub.public_numbers()
        k = (pub.key_size + 7) // 8
        em = pow(int.from_bytes(sig, "big"), nums.e, nums.n).to_bytes(k, "big")
        d = digest("MD5SHA1")
        assert em == b"\x00\x01" + b"\xff" * (k - 3 - len(d)) + b"\x00" + d
    elif name.startswith("RSA"):
        assert isinstance(pub, rsa.RSAPublicKey)
        pub.verify(sig, digest(h), padding.PKCS1v15(), utils.Prehashed(HASHES[h]()))
    else:
        assert isinstance(pub, ec.EllipticCurvePublicKey)
        r, s = utils.decode_dss_signature(sig)  # DER, as the keyless protocol wants
        assert r > 0 and s > 0
        if h == "MD5SHA1":
            class MD5SHA1(hashes.HashAlgorithm):
                name = "md5-sha1"
                digest_size = 36
                block_size = 64
            pub.verify(sig, digest(h), ec.ECDSA(utils.Prehashed(MD5SHA1())))
        else:
            pub.verify(sig, digest(h), ec.ECDSA(utils.Prehashed(HASHES[h]())))


def test_list_keys_describes_every_key(cluster: Cluster) -> None:
    async def go() -> pb.ListKeysResponse:
        async with client(cluster) as c:
            return await c.list_keys()

    resp = asyncio.run(go())
    by_label = {k.label: k for k in resp.keys}
    assert set(by_label) == {"k-rsa2048", "k-p256", "k-p384", "k-ed25519"}
    rsa_key = by_label["k-rsa2048"]
    assert rsa_key.type == pb.KEY_TYPE_RSA and rsa_key.bits == 2048 and rsa_key.curve == ""
    assert pb.DECRYPT_MODE_RAW in rsa_key.decrypt_modes
    assert by_label["k-p256"].curve == "secp256r1" and by_label["k-p384"].bits == 384
    assert by_label["k-ed25519"].type == pb.KEY_TYPE_ED25519
    assert list(by_label["k-ed25519"].algorithms) == [pb.ED25519]
    for k in resp.keys:
        pub = serialization.load_der_public_key(k.public_key)
        from cryptography import x509
        assert k.ski == x509.SubjectKeyIdentifier.from_public_key(pub).digest  # type: ignore[arg-type]
        assert k.id == k.ski  # Keyward sets CKA_ID to the SKI
    assert resp.signer_id and resp.generation >= 1


def test_every_algorithm_signs_and_verifies(cluster: Cluster) -> None:
    async def go() -> int:
        n = 0
        async with client(cluster) as c:
            keys = (await c.list_keys()).keys
            for key in keys:
                assert key.algorithms
                for alg in key.algorithms:
                    name = pb.Algorithm.Name(alg)
                    data = MSG if name == "ED25519" else digest(name.rsplit("_", 1)[1])
                    verify(key, alg, await c.sign(key.ski, alg, data))
                    n += 1
                # By label as well as by SKI.
                alg = key.algorithms[-1]
                name = pb.Algorithm.Name(alg)
                data = MSG if name == "ED25519" else digest(name.rsplit("_", 1)[1])
                verify(key, alg, await c.sign(key.label, alg, data))
        return n

    # RSA: 6 PKCS#1 + 3 PSS; each EC key: 6 ECDSA; Ed25519: 1.
    assert asyncio.run(go()) == 9 + 6 + 6 + 1


def test_decrypt_raw_and_pkcs1(cluster: Cluster) -> None:
    async def go() -> None:
        async with client(cluster) as c:
            key = next(k for k in (await c.list_keys()).keys if k.label == "k-rsa2048")
            pub = serialization.load_der_public_key(key.public_key)
            assert isinstance(pub, rsa.RSAPublicKey)
            ct = pub.encrypt(b"premaster secret", padding.PKCS1v15())
            raw = await c.decrypt(key.ski, ct, mode=pb.DECRYPT_MODE_RAW)
            assert len(raw) == 256 and raw[:2] == b"\x00\x02"
            assert raw.endswith(b"\x00premaster secret")
            assert await c.decrypt(key.ski, ct, mode=pb.DECRYPT_MODE_PKCS1V15) == b"premaster secret"
            with pytest.raises(SignerError) as e:
                await c.decrypt(key.ski, b"\x01" * 255)
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT

    asyncio.run(go())


def test_error_table(cluster: Cluster) -> None:
    async def go() -> dict[str, grpc.StatusCode]:
        out: dict[str, grpc.StatusCode] = {}
        async with client(cluster) as c:
            keys = {k.label: k for k in (await c.list_keys()).keys}
            cases = {
                "unknown ski": (b"\x00" * 20, pb.ECDSA_SHA256, b"\x00" * 32),
                "unknown label": ("nope", pb.ECDSA_SHA256, b"\x00" * 32),
                "short ski": (b"\x01" * 19, pb.ECDSA_SHA256, b"\x00" * 32),
                "wrong digest length": (keys["k-rsa2048"].ski, pb.RSA_PKCS1V15_SHA256, b"x" * 31),
                "ecdsa on rsa": (keys["k-rsa2048"].ski, pb.ECDSA_SHA256, b"x" * 32),
                "rsa on ec": (keys["k-p256"].ski, pb.RSA_PSS_SHA256, b"x" * 32),
                "no algorithm": (keys["k-p256"].ski, pb.ALGORITHM_UNSPECIFIED, b"x" * 32),
            }
            for name, (key, alg, data) in cases.items():
                with pytest.raises(SignerError) as e:
                    await c.sign(key, alg, data)
                out[name] = e.value.code
        return out

    codes = asyncio.run(go())
    assert codes == {
        "unknown ski": grpc.StatusCode.NOT_FOUND,
        "unknown label": grpc.StatusCode.NOT_FOUND,
        "short ski": grpc.StatusCode.INVALID_ARGUMENT,
        "wrong digest length": grpc.StatusCode.INVALID_ARGUMENT,
        "ecdsa on rsa": grpc.StatusCode.INVALID_ARGUMENT,
        "rsa on ec": grpc.StatusCode.INVALID_ARGUMENT,
        "no algorithm": grpc.StatusCode.INVALID_ARGUMENT,
    }


def test_stream_answers_many_operations_each_verified(cluster: Cluster) -> None:
    async def go() -> tuple[int, int]:
        async with client(cluster) as c:
            keys = {k.label: k for k in (await c.list_keys()).keys}
            ec_key, rsa_key = keys["k-p256"], keys["k-rsa2048"]
            stream = c.stream()
            await stream.start()
            loop = asyncio.get_running_loop()
            futures = []
            for i in range(600):
                key, alg = (rsa_key, pb.RSA_PKCS1V15_SHA256) if i % 10 == 0 else (ec_key, pb.ECDSA_SHA256)
                fut: asyncio.Future[pb.OperationResult] = loop.create_future()
                op = pb.Operation(sign=pb.SignRequest(key=pb.KeySelector(ski=key.ski),
                                                      algorithm=alg, data=digest("SHA256")))
                if i == 7:  # one bad operation fails alone
                    op.sign.data = b"short"
                stream.submit(op, fut.set_result)
                futures.append((key, alg, i, fut))
                if i % 50 == 0:
                    await asyncio.sleep(0)
            ok = failed = 0
            for key, alg, i, fut in futures:
                result = await asyncio.wait_for(fut, 30)
                if i == 7:
                    assert result.WhichOneof("result") == "error"
                    assert result.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
                    failed += 1
                else:
                    verify(key, alg, result.output)
                    ok += 1
            await stream.close()
            return ok, failed

    assert asyncio.run(go()) == (599, 1)


def test_stream_batches_what_arrives_while_the_signer_is_busy(
    cluster: Cluster, tmp_path: Path
) -> None:
    """OperationStream's refill policy, seen from outside: an operation goes out at
    once while the signer has at most ``low_water`` (4) of the stream's operations left
    to answer; beyond that, new ones wait and leave together in one message."""
    faults = tmp_path / "slow.json"
    faults.write_text(json.dumps({"delay_ms": 500, "calls": ["sign"]}))
    slow = cluster.start_signer(sessions=2, test_fault_file=str(faults))

    async def go() -> None:
        async with SignerClient(slow.address, ca=cluster.pki.ca_pem,
                                cert=cluster.pki.gateway_signer_client.cert,
                                key=cluster.pki.gateway_signer_client.key,
                                server_name="localhost") as c:
            key = next(k for k in (await c.list_keys()).keys if k.label == "k-p256")
            stream = c.stream()
            await stream.start()
            loop = asyncio.get_running_loop()
            futures: list[asyncio.Future[pb.OperationResult]] = []

            def submit(n: int) -> None:
                for _ in range(n):
                    fut: asyncio.Future[pb.OperationResult] = loop.create_future()
                    stream.submit(pb.Operation(sign=pb.SignRequest(
                        key=pb.KeySelector(ski=key.ski), algorithm=pb.ECDSA_SHA256,
                        data=digest("SHA256"))), fut.set_result)
                    futures.append(fut)

            async def settle() -> None:  # let the stream's writer and gRPC run
                for _ in range(3):
                    await asyncio.sleep(0.01)

            submit(3)  # one message
            await settle()
            assert stream.messages_sent == 1
            submit(1)  # 3 unanswered <= 4: goes at once, in a message of its own
            await settle()
            assert stream.messages_sent == 2
            submit(2)  # 4 unanswered: still at once
            await settle()
            assert stream.messages_sent == 3
            submit(5)  # 6 unanswered: these wait...
            await settle()
            submit(5)  # ...with these, for answers
            await settle()
            assert stream.messages_sent == 3
            assert not any(f.done() for f in futures)  # nothing answered yet (500 ms a sign)
            results = await asyncio.wait_for(asyncio.gather(*futures), 30)
            # The ten that waited left together, in one message.
            assert stream.messages_sent == 4
            assert stream.operations_sent == 16
            assert all(r.WhichOneof("result") == "output" for r in results)
            await stream.close()

    try:
        asyncio.run(go())
    finally:
        slow.stop()


def test_concurrent_unary_calls(cluster: Cluster) -> None:
    async def go() -> int:
        async with client(cluster) as c:
            key = next(k for k in (await c.list_keys()).keys if k.label == "k-p384")

            async def one() -> None:
                verify(key, pb.ECDSA_SHA384, await c.sign(key.ski, pb.ECDSA_SHA384, digest("SHA384")))

            await asyncio.gather(*(one() for _ in range(200)))
            return 200

    assert asyncio.run(go()) == 200


def test_health_and_reflection(cluster: Cluster) -> None:
    async def go() -> tuple[int, int, list[str]]:
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        async with client(cluster) as c:
            overall = await c.health("")
            named = await c.health("keyward.signer.v1.Signer")
            stub = reflection_pb2_grpc.ServerReflectionStub(c.channel)
            names: list[str] = []
            async for resp in stub.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            ):
                names = [s.name for s in resp.list_services_response.service]
            return overall, named, names

    overall, named, names = asyncio.run(go())
    assert overall == named == health_pb2.HealthCheckResponse.SERVING
    assert "keyward.signer.v1.Signer" in names and "grpc.health.v1.Health" in names


def test_client_in_another_process(cluster: Cluster, tmp_path: Path) -> None:
    pki = cluster.pki
    script = f"""
import json, hashlib
from signer.client import SyncSignerClient
from signer.v1 import signer_pb2 as pb
with SyncSignerClient({cluster.services[0].address!r}, ca={str(pki.ca_pem)!r},
        cert={str(pki.client.cert)!r}, key={str(pki.client.key)!r},
        server_name="localhost") as c:
    keys = c.list_keys().keys
    key = next(k for k in keys if k.label == "k-p256")
    sig = c.sign("k-p256", pb.ECDSA_SHA256, hashlib.sha256(b"Hello!").digest())
    print(json.dumps({{"ski": key.ski.hex(), "sig": sig.hex(), "health": c.health()}}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["health"] == health_pb2.HealthCheckResponse.SERVING
    with SyncSignerClient(cluster.services[0].address, ca=pki.ca_pem, cert=pki.client.cert,
                          key=pki.client.key, server_name="localhost") as c:
        key = next(k for k in c.list_keys().keys if k.label == "k-p256")
    assert data["ski"] == key.ski.hex()
    verify(key, pb.ECDSA_SHA256, bytes.fromhex(data["sig"]))


def test_callers_need_an_allowed_certificate(cluster: Cluster) -> None:
    pki = cluster.pki
    # A certificate from our CA but not in allowed_clients: PERMISSION_DENIED.
    intruder = pki.ca.issue(pki.directory, "intruder", common_name="intruder", client=True)

    async def denied() -> grpc.StatusCode:
        async with client(cluster, intruder) as c:
            with pytest.raises(SignerError) as e:
                await c.list_keys()
            return e.value.code

    assert asyncio.run(denied()) == grpc.StatusCode.PERMISSION_DENIED

    # A certificate from another CA does not get through the TLS handshake at all.
    async def stranger() -> grpc.StatusCode:
        async with client(cluster, pki.stranger, wait=False) as c:
            with pytest.raises(SignerError) as e:
                await c.list_keys(timeout=3)
            return e.value.code

    assert asyncio.run(stranger()) == grpc.StatusCode.UNAVAILABLE


def test_bad_config_fails_at_start_naming_the_field(cluster: Cluster, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("pkcs11_uri: 'pkcs11:token=x?module-path=/nope.so'\nsessions: many\n")
    proc = subprocess.run([sys.executable, "-m", "signer.common.cli", "signer", "--config", str(bad)],
                          capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 2
    assert "signer.sessions: expected an integer" in proc.stderr
    bad.write_text("pkcs11_uri: 'pkcs11:token=x?module-path=/nope.so'\nlisten: 12345\n")
    proc = subprocess.run([sys.executable, "-m", "signer.common.cli", "signer", "--config", str(bad)],
                          capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 2 and "signer.listen: expected host:port" in proc.stderr
    bad.write_text("pkcs11_uri: 'pkcs11:token=x?module-path=/nope.so'\nsesions: 2\n")
    proc = subprocess.run([sys.executable, "-m", "signer.common.cli", "signer", "--config", str(bad)],
                          capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 2 and "did you mean signer.sessions" in proc.stderr


def test_unix_socket(cluster: Cluster, tmp_path: Path) -> None:
    sock = tmp_path / "signer.sock"
    cluster.start_signer(sessions=1, unix_socket=str(sock))

    async def go() -> int:
        async with SignerClient(f"unix:{sock}", insecure=True) as c:
            return len((await c.list_keys()).keys)

    try:
        assert asyncio.run(go()) == 4
    finally:
        svc = cluster.services.pop()
        svc.stop()


def test_hsm_fault_makes_the_signer_unhealthy_until_the_token_is_back(
    cluster: Cluster, tmp_path: Path
) -> None:
    faults = tmp_path / "faults.json"
    faults.write_text("")
    svc = cluster.start_signer(sessions=1, test_fault_file=str(faults))
    pki = cluster.pki

    async def go() -> None:
        async with SignerClient(svc.address, ca=pki.ca_pem, cert=pki.client.cert,
                                key=pki.client.key, server_name="localhost") as c:
            data = digest("SHA256")
            await c.sign("k-p256", pb.ECDSA_SHA256, data)
            assert await c.health() == health_pb2.HealthCheckResponse.SERVING
            # The HSM "breaks": every call into it fails with CKR_DEVICE_ERROR.
            faults.write_text(json.dumps({"error": "CKR_DEVICE_ERROR",
                                          "calls": ["sign", "probe", "discover", "find_objects"]}))
            await asyncio.sleep(0.3)
            with pytest.raises(SignerError) as e:
                await c.sign("k-p256", pb.ECDSA_SHA256, data, timeout=3)
            # UNAVAILABLE (retryable elsewhere), never a crypto error the edge takes as final.
            assert e.value.code == grpc.StatusCode.UNAVAILABLE
            for _ in range(50):
                if await c.health() == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
                await asyncio.sleep(0.1)
            assert await c.health() == health_pb2.HealthCheckResponse.NOT_SERVING
            # The HSM comes back: the signer logs in again, finds its keys, serves.
            faults.write_text("")
            for _ in range(100):
                if await c.health() == health_pb2.HealthCheckResponse.SERVING:
                    break
                await asyncio.sleep(0.1)
            assert await c.health() == health_pb2.HealthCheckResponse.SERVING
            sig = await c.sign("k-p256", pb.ECDSA_SHA256, data)
            key = next(k for k in (await c.list_keys()).keys if k.label == "k-p256")
            verify(key, pb.ECDSA_SHA256, sig)

    try:
        asyncio.run(go())
    finally:
        cluster.services.remove(svc)
        svc.stop()
    log = svc.log.read_text()
    assert "HSM fault: not serving" in log and "HSM recovered: serving" in log


def test_client_retries_unavailable_across_a_signer_restart(cluster: Cluster) -> None:
    import threading

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    first = cluster.start_signer(sessions=1, listen=f"127.0.0.1:{port}")
    pki = cluster.pki
    restarted: list[object] = []

    def restart() -> None:
        time.sleep(0.3)
        restarted.append(cluster.start_signer(sessions=1, listen=f"127.0.0.1:{port}"))

    try:
        with SyncSignerClient(first.address, ca=pki.ca_pem, cert=pki.client.cert,
                              key=pki.client.key, server_name="localhost") as c:
            data = digest("SHA256")
            c.sign("k-p256", pb.ECDSA_SHA256, data)
            first.stop()
            t = threading.Thread(target=restart)
            t.start()
            # The signer is down when this call starts; gRPC's retry policy (UNAVAILABLE,
            # backoff) carries it over to the restarted signer.
            sig = c.sign("k-p256", pb.ECDSA_SHA256, data, timeout=20)
            t.join()
            key = next(k for k in c.list_keys().keys if k.label == "k-p256")
            verify(key, pb.ECDSA_SHA256, sig)
    finally:
        for svc in [first, *restarted]:
            if svc in cluster.services:
                cluster.services.remove(svc)  # type: ignore[arg-type]
            svc.stop()  # type: ignore[attr-defined]


def test_metrics_show_operations_sessions_and_session_wait(cluster: Cluster) -> None:
    import urllib.request

    async def go() -> None:
        async with client(cluster) as c:
            await asyncio.gather(*(c.sign("k-p256", pb.ECDSA_SHA256, digest("SHA256"))
                                   for _ in range(20)))

    asyncio.run(go())
    address = cluster.services[0].fields["metrics"]
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as r:
        text = r.read().decode()
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines()
                 if line and not line.startswith("#"))
    ok = 'keyward_signer_operations{key="k-p256",algorithm="ECDSA_SHA256",outcome="ok"}'
    assert float(lines[ok]) >= 20
    # The pool's state: two sessions in all, none stuck in a call now.
    assert float(lines['keyward_hsm_sessions{state="in_use"}']) + float(
        lines['keyward_hsm_sessions{state="idle"}']) == 2
    assert float(lines["keyward_hsm_session_wait_seconds_count"]) >= 20
