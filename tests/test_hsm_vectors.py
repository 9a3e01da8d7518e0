"""PROTOCOL.md section 14 vectors, byte for byte, with the test keys imported into SoftHSM2.

The keys are read from ../shared/vectors (never copied into the repository).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from pkcs11 import Attribute, ObjectClass
from pkcs11 import exceptions as p11e
from softhsm import SoftHsmToken, verify_signature

from signer.hsm import admin
from signer.hsm.errors import HsmError
from signer.hsm.keys import KeyInfo, ski_from_spki
from signer.hsm.pool import Job, Token
from signer.v1 import signer_pb2 as pb

HELLO = b"Hello!"

# PROTOCOL.md section 14, "Test keys".
SKIS = {
    "rsa": "406550d87609ecae021a83ef2c1f372c08f42699",
    "ecdsa": "d9c69b8e23abba7c26fd5d0e282f3dd679741036",
    "ed25519": "1b5e422431d15e92e88312c04807591d62c2b687",
}
# Vector 4: RSA MD5SHA1 over MD5("Hello!") || SHA1("Hello!").
MD5SHA1_HELLO = bytes.fromhex(
    "952d2c56d0485958336747bcdd98590d" "69342c5c39e5ae5f0077aecc32c0f81811fb8193"
)
VECTOR4_SIGNATURE = bytes.fromhex(
    "0264b35021ced7ba444ef1321b1ed71b52402199c3c81ebf38f392d7e8d9999899de45a8d68440dc2a3d"
    "68e2bc4ced32eb890223b1629e23226ee69e199c47bbfd7e1c57ca4b128693da371bb883fcf2f1da34a2"
    "88f9e9a03ad21fe7ef0796c84a082afca1c16d454018ad362dde6fa6a977c7cadea6fa7085b31c8362d3"
    "905ddb5e0dd7f23b4021709709734acd0a76e53d1bb95b83f68694ec629634d3907cbaa38829b96eb6bc"
    "04975475340c494d19fe9b3e9b0fd6663f144f422f2e764a56b09f298694f6f7796b5d3502718a1f16d2"
    "f21a8d1f5f07756f7224caeae00f06466dcbf212f80be5f7308839e009b97da47841809074a72e971714"
    "429c9413"
)
# Vector 5: RSA-SHA256 of SHA256("Hello!").
VECTOR5_SIGNATURE = bytes.fromhex(
    "4901b1afce8ce5b3ad3d801299630fe06497450581547d0dca6e83db7ee72728a3fa00a8a511f11a427e"
    "cdc87e2c243dd331a06fea54b73d946ac6f04ab76e7b6983b33bcd9e181516aafbde74bc3ec2356ea4ac"
    "eaeb4589fd2f6e4cce5985680b4756c97ed63cf082648e191ef6ecd87698c08418b4e83251906f950c47"
    "ffd3cf452572807d3170523708bfddb297fefe87314900d390d0088baf94a9e6936e5a4202d9da96739b"
    "af484c5af77a1b3df71053424974aa3e6891239e8e565b089cb49a06eff4151b021f599934025e3019fa"
    "116ee734ab7fa988573d9880738b8c765d678bada79df8f883161935410312b6d68ebeb83fee8f6b0644"
    "7eec0179"
)
# Vector 6: Ed25519 over gokeyless's testEd25519Msg and over "Hello!".
ED25519_MESSAGE = b"\x20" * 64 + b"TLS 1.3, server CertificateVerify" + b"\x00" + b"\x01" * 32
VECTOR6_SIGNATURE = bytes.fromhex(
    "3d1b88a781991e0661fae5c4415592bc32fa8d466dcfb0e3cd40e722207da3f3"
    "f239a5399fd7b37ec0ed5d97895a3f1322c1c0ed457c92ec1de0bc35f06e9f0c"
)
VECTOR6_HELLO_SIGNATURE = bytes.fromhex(
    "fce36cc1b64f51e04dd8e95dfb9f52242e41e5e06fcc686aaf8cde167cd67eea"
    "b522904b381f4848c4925264442124a9e6de1ad34d900e15f4125ce8a41d7705"
)
# Vector 7: textbook RSA of EM = 00 02 || 247 x 5a || 00 || "Hello!".
VECTOR7_EM = b"\x00\x02" + b"\x5a" * 247 + b"\x00" + HELLO
VECTOR7_CIPHERTEXT = bytes.fromhex(
    "116238f959bfacc7d37a7aa13df9cf9c1d4070d43f254e574e60d13bd14199bde4a3fb50690cce837eb4"
    "66c4c6db72ffe0196d73c33d01e59220c4c66eba395365f63a16c01a3812e8b0d63e36b3bba02f218e71"
    "21327a0579f923d663f6d9c006cfc64cd93dcefc48b3892eb0f77c6b301bcea317342ec321bae234f8de"
    "274ad9ac31e2da2f952364ea08ccd304d7867879fb2f0f41d35cb2a21cf9a2dd7da5741c7a48a2522575"
    "a14e740c5e12a56f4a5d26fdccbaad54ee282785026cbcd0f30f8f213758cd51ab7f355be545ae324d0e"
    "c9c1f6b00acae80315d9843861aa8e73afc1f9c7a855d8ec5695e32fa54240e95a74c14a4c6372666877"
    "f7cecf14"
)


@pytest.fixture(scope="module")
def token(softhsm: SoftHsmToken) -> Iterator[Token]:
    with Token(softhsm.uri(), sessions=2) as tok:
        yield tok


@pytest.fixture(scope="module")
def imported(token: Token, shared_vectors: Path) -> dict[str, KeyInfo]:
    return {
        name: admin.import_pem(token, (shared_vectors / f"{name}.key").read_bytes(),
                               f"vector-{name}")
        for name in SKIS
    }


def test_vector_lengths() -> None:
    assert len(MD5SHA1_HELLO) == 36
    expected = hashlib.md5(HELLO).digest() + hashlib.sha1(HELLO).digest()
    assert expected == MD5SHA1_HELLO
    assert len(ED25519_MESSAGE) == 130
    assert len(VECTOR4_SIGNATURE) == len(VECTOR5_SIGNATURE) == len(VECTOR7_CIPHERTEXT) == 256
    assert len(VECTOR7_EM) == 256


def test_skis_match_protocol(imported: dict[str, KeyInfo], shared_vectors: Path,
                             token: Token) -> None:
    for name, ski in SKIS.items():
        assert imported[name].ski.hex() == ski
        assert imported[name].id.hex() == ski  # CKA_ID = SKI
        # ...and equal to the SKI of the published .pubkey.
        public_key = serialization.load_pem_public_key(
            (shared_vectors / f"{name}.pubkey").read_bytes()
        )
        spki = public_key.public_bytes(serialization.Encoding.DER,
                                       serialization.PublicFormat.SubjectPublicKeyInfo)
        assert ski_from_spki(spki).hex() == ski
        assert imported[name].spki == spki
    served = token.keys()
    assert {key.ski.hex() for key in served} == set(SKIS.values())
    assert imported["rsa"].bits == 2048 and imported["ecdsa"].curve == "secp256r1"


def test_vector4_rsa_md5sha1(token: Token, imported: dict[str, KeyInfo]) -> None:
    ski = bytes.fromhex(SKIS["rsa"])
    assert token.run(Job.sign(ski, pb.RSA_PKCS1V15_MD5SHA1, MD5SHA1_HELLO)) == VECTOR4_SIGNATURE


def test_vector5_rsa_sha256(token: Token, imported: dict[str, KeyInfo]) -> None:
    digest = hashlib.sha256(HELLO).digest()
    assert digest.hex() == "334d016f755cd6dc58c53a86e183882f8ec14f52fb05345887c8a5edd42c87b7"
    signature = token.run(Job.sign(imported["rsa"], pb.RSA_PKCS1V15_SHA256, digest))
    assert signature == VECTOR5_SIGNATURE


def test_vector6_ed25519(token: Token, imported: dict[str, KeyInfo]) -> None:
    key = imported["ed25519"]
    results = token.submit([
        Job.sign(key, pb.ED25519, ED25519_MESSAGE),
        Job.sign(key, pb.ED25519, HELLO),
    ]).result(30)
    assert results == [VECTOR6_SIGNATURE, VECTOR6_HELLO_SIGNATURE]


def test_vector3_ecdsa_verifies(token: Token, imported: dict[str, KeyInfo],
                                shared_vectors: Path) -> None:
    digest = hashlib.sha256(HELLO).digest()
    signature = token.run(Job.sign(bytes.fromhex(SKIS["ecdsa"]), pb.ECDSA_SHA256, digest))
    public_key = serialization.load_pem_public_key(
        (shared_vectors / "ecdsa.pubkey").read_bytes()
    )
    spki = public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    verify_signature(spki, "ECDSA_SHA256", digest, signature)


def test_vector7_raw_decrypt(token: Token, imported: dict[str, KeyInfo]) -> None:
    key = imported["rsa"]
    assert token.run(Job.decrypt(key, pb.DECRYPT_MODE_RAW, VECTOR7_CIPHERTEXT)) == VECTOR7_EM
    assert token.run(Job.decrypt(key, pb.DECRYPT_MODE_PKCS1V15, VECTOR7_CIPHERTEXT)) == HELLO


def test_imported_keys_are_sensitive_and_not_extractable(
    token: Token, imported: dict[str, KeyInfo]
) -> None:
    def read(session: object) -> dict[str, tuple[object, ...]]:
        out: dict[str, tuple[object, ...]] = {}
        for name, key in imported.items():
            objects = list(session.get_objects(  # type: ignore[attr-defined]
                {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.ID: key.ski}
            ))
            assert len(objects) == 1
            obj = objects[0]
            secret = Attribute.PRIVATE_EXPONENT if name == "rsa" else Attribute.VALUE
            try:
                obj[secret]
                readable = True
            except p11e.AttributeSensitive:
                readable = False
            publics = list(session.get_objects(  # type: ignore[attr-defined]
                {Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.ID: key.ski}
            ))
            out[name] = (obj[Attribute.SENSITIVE], obj[Attribute.EXTRACTABLE],
                         obj[Attribute.TOKEN], obj[Attribute.PRIVATE], readable, len(publics),
                         obj[Attribute.LABEL])
        return out

    for name, attributes in token.call(read).items():
        assert attributes == (True, False, True, True, False, 1, f"vector-{name}"), name


def test_duplicate_import_refused(token: Token, imported: dict[str, KeyInfo],
                                  shared_vectors: Path) -> None:
    generation = token.generation
    pem = (shared_vectors / "ecdsa.key").read_bytes()
    with pytest.raises(admin.DuplicateKeyError) as info:
        admin.import_pem(token, pem, "again")
    assert info.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert SKIS["ecdsa"] in info.value.message and "vector-ecdsa" in info.value.message
    # Also as PKCS#8 DER: same key, same refusal.
    key = serialization.load_pem_private_key(pem, None)
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    with pytest.raises(admin.DuplicateKeyError):
        admin.import_pem(token, der, "again-der")
    assert token.generation == generation
    assert len(token.keys()) == 3


def test_import_formats(token: Token, imported: dict[str, KeyInfo]) -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    password = b"correct horse"
    generated: dict[str, tuple[Any, serialization.PrivateFormat,
                               serialization.KeySerializationEncryption]] = {
        "rsa-pkcs8-encrypted": (rsa.generate_private_key(65537, 2048),
                                serialization.PrivateFormat.PKCS8,
                                serialization.BestAvailableEncryption(password)),
        "p384-sec1-der": (ec.generate_private_key(ec.SECP384R1()),
                          serialization.PrivateFormat.TraditionalOpenSSL,
                          serialization.NoEncryption()),
        "p521-pkcs8": (ec.generate_private_key(ec.SECP521R1()),
                       serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        "ed25519-der": (ed25519.Ed25519PrivateKey.generate(),
                        serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    }
    for label, (key, fmt, encryption) in generated.items():
        encoding = (serialization.Encoding.DER if label.endswith("der")
                    else serialization.Encoding.PEM)
        data = key.private_bytes(encoding, fmt, encryption)
        info = admin.import_pem(token, data, label,
                                password=password if "encrypted" in label else None)
        spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)
        assert info.spki == spki and info.label == label
        assert token.resolve_key(ski=info.ski) == info
        algorithm, data_in = {
            "rsa-pkcs8-encrypted": ("RSA_PSS_SHA256", hashlib.sha256(HELLO).digest()),
            "p384-sec1-der": ("ECDSA_SHA384", hashlib.sha384(HELLO).digest()),
            "p521-pkcs8": ("ECDSA_SHA512", hashlib.sha512(HELLO).digest()),
            "ed25519-der": ("ED25519", HELLO),
        }[label]
        signature = token.run(
            Job.sign(info, cast("pb.Algorithm", pb.Algorithm.Value(algorithm)), data_in)
        )
        if label != "p521-pkcs8":  # the test verifier handles P-256/P-384 only
            verify_signature(spki, algorithm, data_in, signature)
        else:
            public_key = key.public_key()
            assert isinstance(public_key, ec.EllipticCurvePublicKey)
            public_key.verify(signature, HELLO, ec.ECDSA(hashes.SHA512()))
        assert info.bits in (2048, 384, 521, 255)
        assert admin.delete_key(token, info.ski) == 2
    served = token.keys()
    assert {key.ski.hex() for key in served} == set(SKIS.values())


@pytest.mark.parametrize(
    ("data", "password", "message"),
    [
        (b"not a key at all", None, "not a readable private key"),
        (b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n", None,
         "certificate, not a private key"),
        (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", None,
         "not a readable private key"),
    ],
)
def test_import_errors(token: Token, data: bytes, password: bytes | None, message: str) -> None:
    with pytest.raises(admin.KeyImportError, match=message):
        admin.import_pem(token, data, "bad", password=password)


def test_import_password_errors(token: Token, shared_vectors: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    encrypted = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.BestAvailableEncryption(b"pw"))
    with pytest.raises(admin.KeyImportError, match="password is needed"):
        admin.import_pem(token, encrypted, "enc")
    with pytest.raises(admin.KeyImportError, match="password is wrong"):
        admin.import_pem(token, encrypted, "enc", password=b"wrong")
    with pytest.raises(admin.KeyImportError, match="not encrypted"):
        admin.import_pem(token, (shared_vectors / "ecdsa.key").read_bytes(), "x", password=b"pw")


def test_list_keys_and_errors_carry_no_key_material(token: Token,
                                                    imported: dict[str, KeyInfo]) -> None:
    listed = admin.list_keys(token)
    assert {key.ski for key in listed} == {key.ski for key in imported.values()}
    with pytest.raises(HsmError) as info:
        admin.delete_key(token, b"\x07" * 20)
    assert info.value.code == grpc.StatusCode.NOT_FOUND
