"""Run every operation a key supports through a keyless server and verify each answer.

Shared by ``keyward test-keyserver`` (a tool for users, against Keyward or gokeyless)
and by ``keyward demo``'s start-up self-check. Verification uses only public keys.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils

from gateway.client import KeylessClient, KeylessError
from gateway.protocol import Op

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey

MESSAGE = b"Hello!"
_HASHES: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha224": hashes.SHA224,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}


def ski_of(public_key: PublicKey) -> bytes:
    """SHA-1 of the subjectPublicKey BIT STRING contents (PROTOCOL.md §7)."""
    return x509.SubjectKeyIdentifier.from_public_key(public_key).digest


@dataclasses.dataclass(slots=True)
class KeyFile:
    name: str
    path: Path
    public_key: PublicKey

    @property
    def ski(self) -> bytes:
        return ski_of(self.public_key)


def load_key_dir(directory: Path) -> list[KeyFile]:
    """Every ``.pubkey`` (PEM SubjectPublicKeyInfo) and ``.crt``/``.pem`` certificate."""
    out: list[KeyFile] = []
    for path in sorted(directory.rglob("*")):
        if not path.is_file():
            continue
        data = path.read_bytes()
        key: object
        if path.suffix == ".pubkey":
            key = serialization.load_pem_public_key(data)
        elif path.suffix in (".crt", ".pem") and b"CERTIFICATE" in data:
            key = x509.load_pem_x509_certificate(data).public_key()
        else:
            continue
        if isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey):
            out.append(KeyFile(path.stem, path, key))
    return out


@dataclasses.dataclass(slots=True)
class Check:
    key: str
    operation: str
    ok: bool
    error: str = ""
    latency_ms: float = 0.0


def _digest(name: str, message: bytes) -> bytes:
    if name == "md5sha1":
        return hashlib.md5(message).digest() + hashlib.sha1(message).digest()  # noqa: S324
    return hashlib.new(name, message).digest()


def operations_for(key: PublicKey) -> list[tuple[str, int]]:
    """The keyless operations that apply to a key type."""
    if isinstance(key, rsa.RSAPublicKey):
        ops: list[tuple[str, int]] = [("rsa-md5sha1", Op.RSA_SIGN_MD5SHA1)]
        ops += [(f"rsa-{h}", getattr(Op, f"RSA_SIGN_{h.upper()}")) for h in _HASHES]
        ops += [
            (f"rsa-pss-{h}", getattr(Op, f"RSA_PSS_SIGN_{h.upper()}"))
            for h in ("sha256", "sha384", "sha512")
        ]
        ops += [("rsa-decrypt", Op.RSA_DECRYPT), ("rsa-decrypt-raw", Op.RSA_DECRYPT_RAW)]
        return ops
    if isinstance(key, ec.EllipticCurvePublicKey):
        ec_ops: list[tuple[str, int]] = [("ecdsa-md5sha1", Op.ECDSA_SIGN_MD5SHA1)]
        return ec_ops + [(f"ecdsa-{h}", getattr(Op, f"ECDSA_SIGN_{h.upper()}")) for h in _HASHES]
    return [("ed25519", Op.ED25519_SIGN)]


def verify(key: PublicKey, name: str, message: bytes, output: bytes, sent: bytes) -> None:
    """Raise InvalidSignature (or ValueError) unless ``output`` is right for ``name``."""
    if isinstance(key, ed25519.Ed25519PublicKey):
        key.verify(output, message)
        return
    hash_name = name.rsplit("-", 1)[1]
    if isinstance(key, rsa.RSAPublicKey):
        if name.startswith("rsa-decrypt"):
            if name == "rsa-decrypt" and output == sent:
                # gokeyless with a PKCS#11 key strips the padding for 0x01; that is its
                # documented behaviour, so a tester for any key server accepts it.
                return
            # The raw RSA block: 00 02 <nonzero padding> 00 <message>, k bytes long.
            k = (key.key_size + 7) // 8
            if len(output) != k or output[:2] != b"\x00\x02":
                raise ValueError("decrypt did not return the raw k-byte PKCS#1 block")
            if output[output.index(b"\x00", 2) + 1 :] != sent:
                raise ValueError("decrypted message differs")
            return
        if name.startswith("rsa-pss"):
            h = _HASHES[hash_name]()
            key.verify(
                output,
                _digest(hash_name, message),
                padding.PSS(padding.MGF1(h), h.digest_size),
                utils.Prehashed(h),
            )
            return
        if hash_name == "md5sha1":
            # No DigestInfo: recover the block and compare (cryptography has no MD5SHA1).
            n, e = key.public_numbers().n, key.public_numbers().e
            k = (key.key_size + 7) // 8
            em = pow(int.from_bytes(output, "big"), e, n).to_bytes(k, "big")
            digest = _digest("md5sha1", message)
            expected = b"\x00\x01" + b"\xff" * (k - 3 - len(digest)) + b"\x00" + digest
            if em != expected:
                raise InvalidSignature
            return
        h = _HASHES[hash_name]()
        key.verify(output, _digest(hash_name, message), padding.PKCS1v15(), utils.Prehashed(h))
        return
    digest = _digest(hash_name, message)
    # ECDSA over a digest: verify against the same bytes via a Prehashed of that length
    # when possible; MD5SHA1 (36 bytes) has no hash object, so verify the raw value.
    utils.decode_dss_signature(output)  # raises ValueError unless DER SEQUENCE{r, s}
    if hash_name == "md5sha1":
        _verify_ecdsa_raw(key, digest, output)
    else:
        key.verify(output, digest, ec.ECDSA(utils.Prehashed(_HASHES[hash_name]())))


def _verify_ecdsa_raw(key: ec.EllipticCurvePublicKey, digest: bytes, der: bytes) -> None:
    # A Prehashed wrapper needs a hash of the right size; any hash class with a
    # 36-byte digest does not exist, so build one with the matching size.
    class _MD5SHA1(hashes.HashAlgorithm):
        name = "md5-sha1"
        digest_size = 36
        block_size = 64

    key.verify(der, digest, ec.ECDSA(utils.Prehashed(_MD5SHA1())))


async def check_key(
    client: KeylessClient, kf: KeyFile, *, timeout: float = 10.0, skip: tuple[str, ...] = ()
) -> list[Check]:
    results = []
    for name, opcode in operations_for(kf.public_key):
        if skip and name.startswith(skip):
            continue
        t0 = time.perf_counter()
        sent = MESSAGE
        try:
            if name.startswith("rsa-decrypt"):
                assert isinstance(kf.public_key, rsa.RSAPublicKey)
                sent = os.urandom(16)
                ct = kf.public_key.encrypt(sent, padding.PKCS1v15())
                out = await client.decrypt(kf.ski, ct, opcode=opcode, timeout=timeout)
                verify(kf.public_key, name, MESSAGE, out, sent)
            else:
                data = MESSAGE if name == "ed25519" else _digest(name.rsplit("-", 1)[1], MESSAGE)
                out = await client.sign(opcode, kf.ski, data, timeout=timeout)
                verify(kf.public_key, name, MESSAGE, out, sent)
        except KeylessError as e:
            results.append(Check(kf.name, name, False, str(e)))
            continue
        except (InvalidSignature, ValueError) as e:
            results.append(
                Check(kf.name, name, False, f"verification failed: {e or 'bad signature'}")
            )
            continue
        except (TimeoutError, ConnectionError) as e:
            results.append(Check(kf.name, name, False, f"{type(e).__name__}: {e}"))
            continue
        results.append(Check(kf.name, name, True, latency_ms=(time.perf_counter() - t0) * 1e3))
    return results
