"""Every algorithm and decrypt mode on keys generated in a real SoftHSM2 token."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from typing import cast

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import padding
from pkcs11 import Attribute, ObjectClass
from pkcs11 import exceptions as p11e
from softhsm import DIGEST_SIZES, SoftHsmToken, rsa_encrypt_raw, verify_signature

from signer.hsm import admin
from signer.hsm.errors import HsmError
from signer.hsm.keys import KeyInfo, ski_from_spki
from signer.hsm.pool import Job, Token
from signer.v1 import signer_pb2 as pb

MESSAGE = b"Hello!"


@pytest.fixture(scope="module")
def token(softhsm: SoftHsmToken) -> Iterator[Token]:
    with Token(softhsm.uri(), sessions=2) as tok:
        yield tok


@pytest.fixture(scope="module")
def keys(token: Token) -> dict[str, KeyInfo]:
    return {
        "rsa2048": admin.generate_key(token, "rsa2048", "gen-rsa2048"),
        "p256": admin.generate_key(token, "p256", "gen-p256"),
        "p384": admin.generate_key(token, "p384", "gen-p384"),
        "ed25519": admin.generate_key(token, "ed25519", "gen-ed25519"),
    }


def _digest(hash_name: str, message: bytes = MESSAGE) -> bytes:
    if hash_name == "MD5SHA1":
        return hashlib.md5(message).digest() + hashlib.sha1(message).digest()
    return hashlib.new(hash_name.lower(), message).digest()


def _algorithm(name: str) -> pb.Algorithm:
    return cast("pb.Algorithm", pb.Algorithm.Value(name))


def _sign_algorithms(prefix: str) -> list[str]:
    names = pb.Algorithm.keys()
    return [name for name in names if name.startswith(prefix)]


def test_discovery_describes_generated_keys(token: Token, keys: dict[str, KeyInfo]) -> None:
    listed = token.keys()
    served = {key.ski: key for key in listed}
    assert set(served) == {key.ski for key in keys.values()}
    rsa_key, p256, p384, ed = keys["rsa2048"], keys["p256"], keys["p384"], keys["ed25519"]
    assert (rsa_key.key_type, rsa_key.bits, rsa_key.curve) == (pb.KEY_TYPE_RSA, 2048, "")
    assert (p256.key_type, p256.bits, p256.curve) == (pb.KEY_TYPE_EC, 256, "secp256r1")
    assert (p384.key_type, p384.bits, p384.curve) == (pb.KEY_TYPE_EC, 384, "secp384r1")
    assert (ed.key_type, ed.bits, ed.curve) == (pb.KEY_TYPE_ED25519, 255, "ed25519")
    for key in keys.values():
        # CKA_ID = SKI, and the SKI is the SKI of the SPKI.
        assert key.id == key.ski
        assert key.ski == ski_from_spki(key.spki)
        assert len(key.ski) == 20
        assert served[key.ski] == key
    assert set(rsa_key.algorithms) == {
        pb.Algorithm.Value(n) for n in _sign_algorithms("RSA_")
    }
    assert set(rsa_key.decrypt_modes) == {pb.DECRYPT_MODE_RAW, pb.DECRYPT_MODE_PKCS1V15}
    assert set(p256.algorithms) == {pb.Algorithm.Value(n) for n in _sign_algorithms("ECDSA_")}
    assert p256.decrypt_modes == ()
    assert ed.algorithms == (pb.ED25519,)
    proto = rsa_key.to_proto()
    assert proto.ski == rsa_key.ski and proto.public_key == rsa_key.spki
    assert proto.type == pb.KEY_TYPE_RSA and proto.bits == 2048 and proto.label == "gen-rsa2048"
    assert list(proto.algorithms) == list(rsa_key.algorithms)
    assert proto.id == rsa_key.id
    assert "gen-rsa2048" in repr(rsa_key)


@pytest.mark.parametrize("key_name", ["rsa2048"])
@pytest.mark.parametrize("algorithm", _sign_algorithms("RSA_"))
def test_rsa_algorithms(token: Token, keys: dict[str, KeyInfo], key_name: str,
                        algorithm: str) -> None:
    key = keys[key_name]
    digest = _digest(algorithm.rpartition("_")[2])
    signature = token.run(Job.sign(key, _algorithm(algorithm), digest))
    assert len(signature) == 256
    verify_signature(key.spki, algorithm, digest, signature)


@pytest.mark.parametrize("key_name", ["p256", "p384"])
@pytest.mark.parametrize("algorithm", _sign_algorithms("ECDSA_"))
def test_ecdsa_algorithms(token: Token, keys: dict[str, KeyInfo], key_name: str,
                          algorithm: str) -> None:
    key = keys[key_name]
    digest = _digest(algorithm.rpartition("_")[2])
    signature = token.run(Job.sign(key.ski, _algorithm(algorithm), digest))
    assert signature[0] == 0x30  # DER SEQUENCE, not raw r || s
    verify_signature(key.spki, algorithm, digest, signature)


@pytest.mark.parametrize("message", [b"", MESSAGE, os.urandom(1000)])
def test_ed25519(token: Token, keys: dict[str, KeyInfo], message: bytes) -> None:
    key = keys["ed25519"]
    signature = token.run(Job.sign(key, pb.ED25519, message))
    assert len(signature) == 64
    verify_signature(key.spki, "ED25519", message, signature)


def test_rsa_decrypt_modes(token: Token, keys: dict[str, KeyInfo]) -> None:
    key = keys["rsa2048"]
    public_key = key.public_key()
    ciphertext = public_key.encrypt(b"premaster secret", padding.PKCS1v15())  # type: ignore[union-attr]
    plain = token.run(Job.decrypt(key, pb.DECRYPT_MODE_PKCS1V15, ciphertext))
    assert plain == b"premaster secret"
    raw = token.run(Job.decrypt(key, pb.DECRYPT_MODE_RAW, ciphertext))
    assert len(raw) == 256
    assert raw[:2] == b"\x00\x02" and raw.endswith(b"\x00premaster secret")


def test_raw_decrypt_keeps_leading_zeros(token: Token, keys: dict[str, KeyInfo]) -> None:
    key = keys["rsa2048"]
    block = b"\x00" * 250 + b"\x01\x02\x03\x04\x05\x06"
    raw = token.run(Job.decrypt(key, pb.DECRYPT_MODE_RAW, rsa_encrypt_raw(key.spki, block)))
    assert raw == block


def test_bad_padding_is_invalid_argument_not_a_fault(token: Token,
                                                     keys: dict[str, KeyInfo]) -> None:
    # SoftHSM2 answers CKR_GENERAL_ERROR here; a session probe shows the HSM is fine,
    # so the request is blamed and the token stays healthy.
    key = keys["rsa2048"]
    block = b"\x00\x01" + b"\x5a" * 247 + b"\x00" + MESSAGE  # type 1, not 2
    with pytest.raises(HsmError) as info:
        token.run(Job.decrypt(key, pb.DECRYPT_MODE_PKCS1V15, rsa_encrypt_raw(key.spki, block)))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.ckr == "CKR_GENERAL_ERROR"
    assert not info.value.hsm_fault
    assert token.healthy


def test_validation_errors(token: Token, keys: dict[str, KeyInfo]) -> None:
    rsa_key, p256, ed = keys["rsa2048"], keys["p256"], keys["ed25519"]
    digest = _digest("SHA256")
    n = rsa_key.rsa_modulus
    assert n is not None
    cases: list[tuple[Job, grpc.StatusCode, str]] = [
        (Job.sign(b"\x01" * 20, pb.RSA_PKCS1V15_SHA256, digest), grpc.StatusCode.NOT_FOUND,
         "no key with SKI " + "01" * 20),
        (Job.sign(b"\x01" * 19, pb.RSA_PKCS1V15_SHA256, digest),
         grpc.StatusCode.INVALID_ARGUMENT, "20 bytes"),
        (Job.sign(rsa_key, pb.RSA_PKCS1V15_SHA256, digest[:31]),
         grpc.StatusCode.INVALID_ARGUMENT, "RSA_PKCS1V15_SHA256 needs a 32-byte digest, got 31"),
        (Job.sign(rsa_key, pb.RSA_PSS_SHA384, digest), grpc.StatusCode.INVALID_ARGUMENT,
         "needs a 48-byte digest, got 32"),
        (Job.sign(p256, pb.ECDSA_SHA1, digest), grpc.StatusCode.INVALID_ARGUMENT,
         "needs a 20-byte digest"),
        (Job.sign(rsa_key, pb.ECDSA_SHA256, digest), grpc.StatusCode.INVALID_ARGUMENT,
         "ECDSA_SHA256 needs an EC key"),
        (Job.sign(p256, pb.RSA_PSS_SHA256, digest), grpc.StatusCode.INVALID_ARGUMENT,
         "needs an RSA key"),
        (Job.sign(ed, pb.ECDSA_SHA256, digest), grpc.StatusCode.INVALID_ARGUMENT,
         "needs an EC key"),
        (Job.sign(p256, pb.ED25519, digest), grpc.StatusCode.INVALID_ARGUMENT,
         "needs an Ed25519 key"),
        (Job.sign(rsa_key, pb.ALGORITHM_UNSPECIFIED, digest), grpc.StatusCode.INVALID_ARGUMENT,
         "no signing algorithm"),
        (Job(key=rsa_key, data=digest, algorithm=99), grpc.StatusCode.INVALID_ARGUMENT,  # type: ignore[arg-type]
         "unknown signing algorithm"),
        (Job(key=rsa_key, data=digest, algorithm=pb.RSA_PKCS1V15_SHA256,
             decrypt_mode=pb.DECRYPT_MODE_RAW), grpc.StatusCode.INVALID_ARGUMENT, "not both"),
        (Job.decrypt(p256, pb.DECRYPT_MODE_RAW, b"\x00" * 32),
         grpc.StatusCode.INVALID_ARGUMENT, "needs an RSA key"),
        (Job.decrypt(rsa_key, pb.DECRYPT_MODE_RAW, b"\x00" * 255),
         grpc.StatusCode.INVALID_ARGUMENT, "must be 256 bytes, got 255"),
        (Job.decrypt(rsa_key, pb.DECRYPT_MODE_RAW, n.to_bytes(256, "big")),
         grpc.StatusCode.INVALID_ARGUMENT, "not smaller than the RSA modulus"),
        (Job.decrypt(rsa_key, pb.DECRYPT_MODE_PKCS1V15, b"\xff" * 256),
         grpc.StatusCode.INVALID_ARGUMENT, "not smaller than the RSA modulus"),
        (Job.decrypt(rsa_key, pb.DECRYPT_MODE_UNSPECIFIED, b"\x00" * 256),
         grpc.StatusCode.INVALID_ARGUMENT, "no signing algorithm or decrypt mode"),
    ]
    results = token.submit([job for job, _, _ in cases]).result(30)
    for (job, code, text), result in zip(cases, results, strict=True):
        assert isinstance(result, HsmError), job
        assert result.code == code, (job, result)
        assert text in result.message, (job, result)
        assert not result.hsm_fault
    # Invalid jobs are answered without touching the HSM or the queue.
    assert token.healthy
    assert token.queued_jobs == 0


def test_batch_results_in_order(token: Token, keys: dict[str, KeyInfo]) -> None:
    digest = _digest("SHA256")
    jobs = [
        Job.sign(keys["p256"], pb.ECDSA_SHA256, digest),
        Job.sign(b"\x02" * 20, pb.ECDSA_SHA256, digest),  # NOT_FOUND in the middle
        Job.sign(keys["rsa2048"], pb.RSA_PKCS1V15_SHA256, digest),
        Job.sign(keys["ed25519"], pb.ED25519, MESSAGE),
    ]
    results = token.submit(jobs).result(30)
    assert isinstance(results[0], bytes)
    verify_signature(keys["p256"].spki, "ECDSA_SHA256", digest, results[0])
    assert isinstance(results[1], HsmError) and results[1].code == grpc.StatusCode.NOT_FOUND
    assert isinstance(results[2], bytes)
    verify_signature(keys["rsa2048"].spki, "RSA_PKCS1V15_SHA256", digest, results[2])
    assert isinstance(results[3], bytes)
    verify_signature(keys["ed25519"].spki, "ED25519", MESSAGE, results[3])
    assert token.submit([]).result(1) == []


def test_deadline_expired(token: Token, keys: dict[str, KeyInfo]) -> None:
    digest = _digest("SHA256")
    past = time.monotonic() - 0.001
    with pytest.raises(HsmError) as info:
        token.run(Job.sign(keys["p256"], pb.ECDSA_SHA256, digest, deadline=past))
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED

    # A deadline that passes while the job waits: the first job holds the only
    # worker that takes this batch (fault_injector sleeps "in the HSM call").
    calls: list[str] = []

    def slow(point: str) -> None:
        calls.append(point)
        if point == "sign" and len(calls) == 1:
            time.sleep(0.3)

    token.fault_injector = slow
    try:
        soon = time.monotonic() + 0.1
        results = token.submit([
            Job.sign(keys["p256"], pb.ECDSA_SHA256, digest),
            Job.sign(keys["p256"], pb.ECDSA_SHA256, digest, deadline=soon),
            Job.sign(keys["p256"], pb.ECDSA_SHA256, digest, deadline=soon + 10),
        ]).result(30)
    finally:
        token.fault_injector = None
    assert isinstance(results[0], bytes)
    assert isinstance(results[1], HsmError)
    assert results[1].code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert isinstance(results[2], bytes)
    assert calls.count("sign") == 2  # the expired job never reached the HSM


def test_queue_full(softhsm: SoftHsmToken, keys: dict[str, KeyInfo], token: Token) -> None:
    digest = _digest("SHA256")
    gate_open = False

    def gate(point: str) -> None:
        while point == "sign" and not gate_open:
            time.sleep(0.01)

    with Token(softhsm.uri(), sessions=1, max_queue=4) as small:
        key = small.resolve_key(ski=keys["p256"].ski)
        small.fault_injector = gate
        first = small.submit([Job.sign(key, pb.ECDSA_SHA256, digest)])  # taken by the worker
        deadline = time.monotonic() + 5
        while small.queued_jobs and time.monotonic() < deadline:
            time.sleep(0.01)
        second = small.submit([Job.sign(key, pb.ECDSA_SHA256, digest)] * 3)
        third = small.submit([Job.sign(key, pb.ECDSA_SHA256, digest)])  # 4 waiting: full
        with pytest.raises(HsmError) as info:
            small.submit([Job.sign(key, pb.ECDSA_SHA256, digest)])
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue is full" in info.value.message
        with pytest.raises(HsmError) as info:
            small.submit([Job.sign(key, pb.ECDSA_SHA256, digest)] * 5)  # bigger than the bound
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        gate_open = True
        for future in (first, second, third):
            for result in future.result(30):
                assert isinstance(result, bytes)
                verify_signature(key.spki, "ECDSA_SHA256", digest, result)
        # Room again.
        assert isinstance(small.run(Job.sign(key, pb.ECDSA_SHA256, digest)), bytes)
    with pytest.raises(HsmError) as info:
        small.submit([Job.sign(key, pb.ECDSA_SHA256, digest)])
    assert info.value.code == grpc.StatusCode.UNAVAILABLE


def test_generated_keys_are_sensitive_and_not_extractable(token: Token,
                                                          keys: dict[str, KeyInfo]) -> None:
    def read(session: object) -> list[dict[str, object]]:
        found = []
        for key in keys.values():
            for obj in session.get_objects(  # type: ignore[attr-defined]
                {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.ID: key.ski}
            ):
                secret = {
                    pb.KEY_TYPE_RSA: Attribute.PRIVATE_EXPONENT,
                }.get(key.key_type, Attribute.VALUE)
                try:
                    obj[secret]
                    readable = True
                except p11e.AttributeSensitive:
                    readable = False
                found.append({
                    "sensitive": obj[Attribute.SENSITIVE],
                    "extractable": obj[Attribute.EXTRACTABLE],
                    "always_sensitive": obj[Attribute.ALWAYS_SENSITIVE],
                    "never_extractable": obj[Attribute.NEVER_EXTRACTABLE],
                    "token": obj[Attribute.TOKEN],
                    "private": obj[Attribute.PRIVATE],
                    "derive": obj[Attribute.DERIVE],
                    "readable": readable,
                })
        return found

    found = token.call(read)
    assert len(found) == len(keys)
    for attributes in found:
        assert attributes == {
            "sensitive": True, "extractable": False, "always_sensitive": True,
            "never_extractable": True, "token": True, "private": True, "derive": False,
            "readable": False,
        }


def test_generate_rsa3072_and_delete(token: Token) -> None:
    before = token.generation
    key = admin.generate_key(token, "rsa3072", "gen-rsa3072")
    assert key.bits == 3072 and token.generation == before + 1
    digest = _digest("SHA512")
    signature = token.run(Job.sign(key, pb.RSA_PSS_SHA512, digest))
    verify_signature(key.spki, "RSA_PSS_SHA512", digest, signature)
    assert admin.delete_key(token, key.ski) == 2
    assert token.generation == before + 2
    with pytest.raises(HsmError) as info:
        token.run(Job.sign(key, pb.RSA_PSS_SHA512, digest))
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    assert token.healthy


def test_refresh_without_change_keeps_generation(token: Token, keys: dict[str, KeyInfo]) -> None:
    generation = token.generation
    assert token.refresh_keys() is False
    assert token.generation == generation
    # Workers rebuilt their caches from the new snapshot and still sign.
    for _ in range(4):
        token.run(Job.sign(keys["ed25519"], pb.ED25519, MESSAGE))


def test_resolve_key(token: Token, keys: dict[str, KeyInfo]) -> None:
    assert token.resolve_key(label="gen-p256") == keys["p256"]
    assert token.resolve_key(ski=keys["p384"].ski) == keys["p384"]
    for kwargs, code in (
        ({"label": "nope"}, grpc.StatusCode.NOT_FOUND),
        ({"ski": b"\x00" * 20}, grpc.StatusCode.NOT_FOUND),
        ({"ski": b"\x00"}, grpc.StatusCode.INVALID_ARGUMENT),
        ({}, grpc.StatusCode.INVALID_ARGUMENT),
    ):
        with pytest.raises(HsmError) as info:
            token.resolve_key(**kwargs)
        assert info.value.code == code


def test_digest_sizes_table_matches_proto() -> None:
    names = pb.Algorithm.keys()
    for name in names:
        if name.startswith(("RSA_", "ECDSA_")):
            assert name.rpartition("_")[2] in DIGEST_SIZES
