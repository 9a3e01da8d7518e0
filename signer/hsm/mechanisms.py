"""How each signer algorithm and decrypt mode maps onto PKCS#11.

Every operation is done with the *raw* mechanism over a digest the caller already
computed (the keyless protocol sends digests, PROTOCOL.md section 9):

* RSA PKCS#1 v1.5: ``CKM_RSA_PKCS`` over ``DigestInfo(hash) || digest`` -- the
  DER prefix is prepended here; MD5SHA1 (TLS 1.0/1.1) has no prefix.
* RSA-PSS: ``CKM_RSA_PKCS_PSS`` with ``CK_RSA_PKCS_PSS_PARAMS{hashAlg, mgf, sLen =
  hash length}`` (the TLS 1.3 rule). python-pkcs11 takes the parameters as the tuple
  ``(Mechanism.SHA256, MGF.SHA256, 32)``.
* ECDSA: ``CKM_ECDSA`` over the digest as is. PKCS#11 says the token truncates it to
  the order's bit length, as TLS expects. The token answers raw ``r || s``; we
  re-encode it as DER ``SEQUENCE { r, s }``, which is what TLS and the protocol carry.
* Ed25519: ``CKM_EDDSA`` (pure Ed25519, no parameters) over the whole message.
* Decrypt RAW: ``CKM_RSA_X_509``, the result left-padded with zeros to the modulus
  length k (some HSMs drop leading zero bytes of the integer).
* Decrypt PKCS1V15: ``CKM_RSA_PKCS``, the token removes the padding.

Inputs are checked *before* the HSM sees them (:func:`check_sign`,
:func:`check_decrypt`): wrong digest length, ciphertext not k bytes or not below the
modulus, algorithm of another key type. That keeps error codes precise (SoftHSM2
answers ``CKR_GENERAL_ERROR`` to most bad inputs) and keeps garbage away from the
device.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, cast

import grpc
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from pkcs11 import MGF, Mechanism

from signer.hsm.errors import HsmError
from signer.v1 import signer_pb2 as pb

if TYPE_CHECKING:
    from signer.hsm.keys import KeyInfo

__all__ = [
    "DECRYPT_SPECS",
    "SIGN_SPECS",
    "DecryptSpec",
    "SignSpec",
    "check_decrypt",
    "check_sign",
    "decrypt_spec",
    "mechanism_name",
    "raw_to_der",
    "sign_spec",
    "supported_algorithms",
    "supported_decrypt_modes",
]

# DER DigestInfo prefixes, RFC 8017 section 9.2 note 1.
_DIGEST_INFO: Final[dict[str, bytes]] = {
    "MD5SHA1": b"",
    "SHA1": bytes.fromhex("3021300906052b0e03021a05000414"),
    "SHA224": bytes.fromhex("302d300d06096086480165030402040500041c"),
    "SHA256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "SHA384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "SHA512": bytes.fromhex("3051300d060960864801650304020305000440"),
}
_DIGEST_LEN: Final[dict[str, int]] = {
    "MD5SHA1": 36,
    "SHA1": 20,
    "SHA224": 28,
    "SHA256": 32,
    "SHA384": 48,
    "SHA512": 64,
}
_PSS_PARAMS: Final[dict[str, tuple[Mechanism, MGF, int]]] = {
    "SHA256": (Mechanism.SHA256, MGF.SHA256, 32),
    "SHA384": (Mechanism.SHA384, MGF.SHA384, 48),
    "SHA512": (Mechanism.SHA512, MGF.SHA512, 64),
}


def mechanism_name(mechanism: int) -> str:
    """``CKM_EDDSA`` style name of a mechanism value."""
    try:
        return "CKM_" + Mechanism(mechanism).name
    except ValueError:
        return f"CKM_0x{mechanism:x}"


def raw_to_der(signature: bytes) -> bytes:
    """PKCS#11 ECDSA output ``r || s`` (equal halves) to DER ``SEQUENCE {r, s}``."""
    half, odd = divmod(len(signature), 2)
    if odd or half == 0:
        raise HsmError(
            grpc.StatusCode.INTERNAL,
            f"the token returned a {len(signature)}-byte ECDSA signature, not r || s",
        )
    r = int.from_bytes(signature[:half], "big")
    s = int.from_bytes(signature[half:], "big")
    return encode_dss_signature(r, s)


@dataclass(frozen=True, slots=True)
class SignSpec:
    """One signing algorithm: what key it needs, what input, which mechanism."""

    algorithm: pb.Algorithm
    name: str
    key_type: pb.KeyType
    # Exact input length, or None for "any" (Ed25519 signs whole messages).
    input_len: int | None
    mechanism: Mechanism
    prefix: bytes = b""
    pss: tuple[Mechanism, MGF, int] | None = None
    ecdsa: bool = False

    def sign(self, key: Any, data: bytes) -> bytes:
        """Run the HSM operation on a python-pkcs11 private key object (no checks)."""
        if self.prefix:
            data = self.prefix + data
        if self.pss is not None:
            signature: bytes = key.sign(data, mechanism=self.mechanism, mechanism_param=self.pss)
        else:
            signature = key.sign(data, mechanism=self.mechanism)
        if self.ecdsa:
            return raw_to_der(signature)
        return signature

    def fits_rsa_key(self, bits: int) -> bool:
        """Whether an RSA key of this size can carry the encoded digest at all."""
        k = (bits + 7) // 8
        if self.pss is not None:
            # RFC 8017 9.1.1: emLen >= hLen + sLen + 2, emLen = ceil((modBits - 1) / 8).
            em_len = (bits - 1 + 7) // 8
            return em_len >= self.pss[2] * 2 + 2
        # RFC 8017 9.2: k >= tLen + 11.
        return k >= len(self.prefix) + (self.input_len or 0) + 11


@dataclass(frozen=True, slots=True)
class DecryptSpec:
    """One RSA decrypt mode."""

    mode: pb.DecryptMode
    name: str
    mechanism: Mechanism
    raw: bool

    def decrypt(self, key: Any, ciphertext: bytes, k: int) -> bytes:
        """Run the HSM operation on a python-pkcs11 private key object (no checks)."""
        plaintext: bytes = key.decrypt(ciphertext, mechanism=self.mechanism)
        if self.raw:
            if len(plaintext) > k:
                raise HsmError(
                    grpc.StatusCode.INTERNAL,
                    f"the token returned {len(plaintext)} bytes for a {k}-byte raw RSA block",
                )
            # The result is an integer below n; keep it k bytes wide, as the protocol's
            # opcode 0x01 returns it and as the caller's padding check expects.
            plaintext = plaintext.rjust(k, b"\x00")
        return plaintext


def _algorithm(name: str) -> pb.Algorithm:
    # EnumTypeWrapper.Value is typed as returning int; the value is an Algorithm.
    return cast("pb.Algorithm", pb.Algorithm.Value(name))


def _build_sign_specs() -> dict[int, SignSpec]:
    specs: dict[int, SignSpec] = {}
    for hash_name in ("MD5SHA1", "SHA1", "SHA224", "SHA256", "SHA384", "SHA512"):
        rsa_alg = _algorithm(f"RSA_PKCS1V15_{hash_name}")
        specs[rsa_alg] = SignSpec(
            algorithm=rsa_alg,
            name=f"RSA_PKCS1V15_{hash_name}",
            key_type=pb.KEY_TYPE_RSA,
            input_len=_DIGEST_LEN[hash_name],
            mechanism=Mechanism.RSA_PKCS,
            prefix=_DIGEST_INFO[hash_name],
        )
        ec_alg = _algorithm(f"ECDSA_{hash_name}")
        specs[ec_alg] = SignSpec(
            algorithm=ec_alg,
            name=f"ECDSA_{hash_name}",
            key_type=pb.KEY_TYPE_EC,
            input_len=_DIGEST_LEN[hash_name],
            mechanism=Mechanism.ECDSA,
            ecdsa=True,
        )
    for hash_name, params in _PSS_PARAMS.items():
        alg = _algorithm(f"RSA_PSS_{hash_name}")
        specs[alg] = SignSpec(
            algorithm=alg,
            name=f"RSA_PSS_{hash_name}",
            key_type=pb.KEY_TYPE_RSA,
            input_len=_DIGEST_LEN[hash_name],
            mechanism=Mechanism.RSA_PKCS_PSS,
            pss=params,
        )
    specs[pb.ED25519] = SignSpec(
        algorithm=pb.ED25519,
        name="ED25519",
        key_type=pb.KEY_TYPE_ED25519,
        input_len=None,
        mechanism=Mechanism.EDDSA,
    )
    return specs


SIGN_SPECS: Final[Mapping[int, SignSpec]] = MappingProxyType(
    dict(sorted(_build_sign_specs().items()))
)
DECRYPT_SPECS: Final[Mapping[int, DecryptSpec]] = MappingProxyType(
    {
        pb.DECRYPT_MODE_RAW: DecryptSpec(
            pb.DECRYPT_MODE_RAW, "DECRYPT_MODE_RAW", Mechanism.RSA_X_509, raw=True
        ),
        pb.DECRYPT_MODE_PKCS1V15: DecryptSpec(
            pb.DECRYPT_MODE_PKCS1V15, "DECRYPT_MODE_PKCS1V15", Mechanism.RSA_PKCS, raw=False
        ),
    }
)

_KEY_TYPE_NAMES: Final[dict[int, str]] = {
    pb.KEY_TYPE_RSA: "an RSA",
    pb.KEY_TYPE_EC: "an EC",
    pb.KEY_TYPE_ED25519: "an Ed25519",
}


def _key_type_phrase(key_type: int) -> str:
    return _KEY_TYPE_NAMES.get(key_type, "an unknown")


def sign_spec(algorithm: int) -> SignSpec:
    """The spec of a signing algorithm; INVALID_ARGUMENT for unspecified/unknown values."""
    spec = SIGN_SPECS.get(algorithm)
    if spec is None:
        if algorithm == pb.ALGORITHM_UNSPECIFIED:
            raise HsmError(grpc.StatusCode.INVALID_ARGUMENT, "no signing algorithm given")
        raise HsmError(grpc.StatusCode.INVALID_ARGUMENT, f"unknown signing algorithm {algorithm}")
    return spec


def decrypt_spec(mode: int) -> DecryptSpec:
    """The spec of a decrypt mode; INVALID_ARGUMENT for unspecified/unknown values."""
    spec = DECRYPT_SPECS.get(mode)
    if spec is None:
        if mode == pb.DECRYPT_MODE_UNSPECIFIED:
            raise HsmError(grpc.StatusCode.INVALID_ARGUMENT, "no decrypt mode given")
        raise HsmError(grpc.StatusCode.INVALID_ARGUMENT, f"unknown decrypt mode {mode}")
    return spec


def supported_algorithms(
    key_type: int, bits: int, mechanisms: Collection[int], *, can_sign: bool = True
) -> tuple[pb.Algorithm, ...]:
    """Algorithms a key of this type and size can do on a token with these mechanisms."""
    if not can_sign:
        return ()
    return tuple(
        spec.algorithm
        for spec in SIGN_SPECS.values()
        if spec.key_type == key_type
        and spec.mechanism in mechanisms
        and (key_type != pb.KEY_TYPE_RSA or spec.fits_rsa_key(bits))
    )


def supported_decrypt_modes(
    key_type: int, mechanisms: Collection[int], *, can_decrypt: bool = True
) -> tuple[pb.DecryptMode, ...]:
    """Decrypt modes an RSA key can do on a token with these mechanisms (none for others)."""
    if key_type != pb.KEY_TYPE_RSA or not can_decrypt:
        return ()
    return tuple(spec.mode for spec in DECRYPT_SPECS.values() if spec.mechanism in mechanisms)


def check_sign(spec: SignSpec, key: KeyInfo, data: bytes, mechanisms: Collection[int]) -> None:
    """Raise :class:`HsmError` unless ``key`` can sign ``data`` with ``spec`` on this token.

    Order matters for the error the caller sees: wrong key type (INVALID_ARGUMENT)
    before a missing mechanism (FAILED_PRECONDITION) before a wrong digest length
    (INVALID_ARGUMENT).
    """
    if spec.key_type != key.key_type:
        raise HsmError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{spec.name} needs {_key_type_phrase(spec.key_type)} key; key {key.ski.hex()} "
            f"is {_key_type_phrase(key.key_type)} key",
        )
    if spec.mechanism not in mechanisms:
        raise HsmError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"this token has no {mechanism_name(spec.mechanism)}, needed for {spec.name}",
        )
    if spec.input_len is not None and len(data) != spec.input_len:
        raise HsmError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{spec.name} needs a {spec.input_len}-byte digest, got {len(data)}",
        )
    if spec.algorithm not in key.algorithms:
        if not key.can_sign:
            raise HsmError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"key {key.ski.hex()} is not permitted to sign (CKA_SIGN is false)",
            )
        # Only RSA size limits remain (e.g. PSS-SHA512 on a 1024-bit key).
        raise HsmError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{spec.name} does not fit a {key.bits}-bit RSA key",
        )


def check_decrypt(
    spec: DecryptSpec, key: KeyInfo, ciphertext: bytes, mechanisms: Collection[int]
) -> None:
    """Raise :class:`HsmError` unless ``ciphertext`` may go to the HSM for ``key``."""
    if key.key_type != pb.KEY_TYPE_RSA or key.rsa_modulus is None:
        raise HsmError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{spec.name} needs an RSA key; key {key.ski.hex()} is "
            f"{_key_type_phrase(key.key_type)} key",
        )
    if spec.mechanism not in mechanisms:
        raise HsmError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"this token has no {mechanism_name(spec.mechanism)}, needed for {spec.name}",
        )
    k = (key.bits + 7) // 8
    if len(ciphertext) != k:
        raise HsmError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"ciphertext for a {key.bits}-bit RSA key must be {k} bytes, got {len(ciphertext)}",
        )
    # gokeyless only rejects values > n, so c = n slips through; c must be < n.
    if int.from_bytes(ciphertext, "big") >= key.rsa_modulus:
        raise HsmError(
            grpc.StatusCode.INVALID_ARGUMENT, "ciphertext is not smaller than the RSA modulus"
        )
    if spec.mode not in key.decrypt_modes:
        raise HsmError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"key {key.ski.hex()} is not permitted to decrypt (CKA_DECRYPT is false)",
        )
