"""Putting keys on a token: generate, import (PEM/DER), list, delete.

Every private key written here is a token object with ``CKA_SENSITIVE=True``,
``CKA_EXTRACTABLE=False`` and ``CKA_PRIVATE=True``, may sign (and, for RSA,
decrypt) and nothing else (no derive, wrap or unwrap), and has a public key object
beside it. Both carry ``CKA_ID`` = the key's SKI, so a key can be found by the SKI
the keyless protocol sends with any PKCS#11 tool.

Each function takes either a :class:`~signer.hsm.pool.Token` -- the work then runs
on one of its worker threads, in a temporary read/write session, and the token's
key set is refreshed afterwards -- or a logged-in read/write python-pkcs11 session.

About private key material in memory: importing necessarily parses the key in this
process. The big-endian byte strings we build for the token are bytearrays that are
zeroed as soon as the objects are created, and the parsed key objects are dropped
right away; Python integers, python-pkcs11's internal template copies and
cryptography's own buffers cannot be wiped from here. Nothing about a key except
its SKI, label and type is ever logged. Generating keys on the token avoids all of
this; prefer it where the key need not exist elsewhere.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar, get_args

import grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11e

from signer.hsm.errors import HsmError, classify
from signer.hsm.keys import (
    KeyInfo,
    describe_private_key,
    discover_keys,
    ec_params_for_curve,
    ski_from_spki,
)

if TYPE_CHECKING:
    from signer.hsm.pool import Token

__all__ = [
    "KEY_KINDS",
    "DuplicateKeyError",
    "KeyImportError",
    "KeyKind",
    "delete_key",
    "generate_key",
    "import_pem",
    "list_keys",
]

log = logging.getLogger(__name__)

KeyKind = Literal["rsa2048", "rsa3072", "p256", "p384", "ed25519"]
KEY_KINDS: Final[tuple[str, ...]] = get_args(KeyKind)
T = TypeVar("T")

_EC_KIND_CURVES: Final[dict[str, str]] = {"p256": "secp256r1", "p384": "secp384r1"}
_IMPORT_CURVES: Final[frozenset[str]] = frozenset({"secp256r1", "secp384r1", "secp521r1"})


class KeyImportError(ValueError):
    """The key material cannot be imported (unreadable, wrong password, unsupported)."""


class DuplicateKeyError(HsmError):
    """A key with the same SKI is already on the token."""

    def __init__(self, ski: bytes, label: str) -> None:
        super().__init__(
            grpc.StatusCode.ALREADY_EXISTS,
            f"a key with SKI {ski.hex()} is already on the token (label {label!r})",
        )
        self.ski = ski


# -- plumbing -------------------------------------------------------------------------


def _is_token(target: object) -> bool:
    from signer.hsm.pool import Token

    return isinstance(target, Token)


def _mechanisms_of(session: Any) -> frozenset[int]:
    return frozenset(int(m) for m in session.token.slot.get_mechanisms())


def _run(target: Token | Any, fn: Callable[[Any, frozenset[int]], T], *, write: bool) -> T:
    if _is_token(target):
        token: Token = target
        result = token.call(lambda session: fn(session, token.mechanisms), rw=write)
        if write:
            token.refresh_keys()
        return result
    return fn(target, _mechanisms_of(target))


def _served(target: Token | Any, info: KeyInfo) -> KeyInfo:
    """The token's own KeyInfo for a key just written (when its URI filter serves it)."""
    if _is_token(target):
        served: list[KeyInfo] = target.keys()
        for key in served:
            if key.ski == info.ski:
                return key
    return info


def _int_bytes(value: int, length: int | None = None) -> bytearray:
    size = length if length is not None else max(1, (value.bit_length() + 7) // 8)
    return bytearray(value.to_bytes(size, "big"))


def _wipe(buffers: list[bytearray]) -> None:
    for buffer in buffers:
        buffer[:] = b"\x00" * len(buffer)


def _der_octet_string(data: bytes) -> bytes:
    # CKA_EC_POINT is the DER encoding of an OCTET STRING holding the point.
    length = len(data)
    if length < 0x80:
        header = bytes([0x04, length])
    elif length < 0x100:
        header = bytes([0x04, 0x81, length])
    else:
        header = bytes([0x04, 0x82]) + length.to_bytes(2, "big")
    return header + data


def _private_template(label: str, key_id: bytes, *, decrypt: bool) -> dict[Attribute, Any]:
    return {
        Attribute.CLASS: ObjectClass.PRIVATE_KEY,
        Attribute.TOKEN: True,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.SIGN: True,
        Attribute.DECRYPT: decrypt,
        Attribute.DERIVE: False,
        Attribute.UNWRAP: False,
        Attribute.LABEL: label,
        Attribute.ID: key_id,
    }


def _public_template(label: str, key_id: bytes, *, encrypt: bool) -> dict[Attribute, Any]:
    return {
        Attribute.CLASS: ObjectClass.PUBLIC_KEY,
        Attribute.TOKEN: True,
        Attribute.PRIVATE: False,
        Attribute.VERIFY: True,
        Attribute.ENCRYPT: encrypt,
        Attribute.WRAP: False,
        Attribute.LABEL: label,
        Attribute.ID: key_id,
    }


def _check_label(label: str) -> None:
    if not label or len(label.encode("utf-8")) > 128:
        raise ValueError("a key label must be 1 to 128 bytes of UTF-8")


def _existing(session: Any, mechanisms: frozenset[int], ski: bytes) -> str | None:
    """The label of a key already on the token with this SKI (or CKA_ID = SKI)."""
    for key in discover_keys(session, mechanisms):
        if key.ski == ski:
            return key.label
    # Searches are materialised: PKCS#11 allows one active search per session, so an
    # abandoned or nested get_objects() generator breaks the next one.
    for obj in list(session.get_objects({Attribute.ID: ski})):
        try:
            return str(obj[Attribute.LABEL] or "")
        except p11e.PKCS11Error:
            return ""
    return None


def _destroy_quietly(*objects: Any) -> None:
    for obj in objects:
        if obj is not None:
            with contextlib.suppress(p11e.PKCS11Error):
                obj.destroy()


# -- generate -------------------------------------------------------------------------


def generate_key(target: Token | Any, kind: KeyKind, label: str) -> KeyInfo:
    """Generate a key pair on the token and return its description.

    ``kind`` is one of ``rsa2048``, ``rsa3072``, ``p256``, ``p384``, ``ed25519``.
    The key pair is generated with a temporary CKA_ID, then both objects get
    CKA_ID = SKI once the public key is known.
    """
    if kind not in KEY_KINDS:
        raise ValueError(f"unknown key kind {kind!r}; use one of {', '.join(KEY_KINDS)}")
    _check_label(label)
    info = _run(target, lambda s, m: _generate(s, m, kind, label), write=True)
    log.info("generated %s key %s (label %r)", kind, info.ski.hex(), label)
    return _served(target, info)


def _generate(session: Any, mechanisms: frozenset[int], kind: str, label: str) -> KeyInfo:
    pending_id = b"keyward-pending-" + os.urandom(8)
    private = _private_template(label, pending_id, decrypt=kind.startswith("rsa"))
    public = _public_template(label, pending_id, encrypt=kind.startswith("rsa"))
    key_length: int | None = None
    if kind.startswith("rsa"):
        key_type, mechanism = KeyType.RSA, Mechanism.RSA_PKCS_KEY_PAIR_GEN
        key_length = int(kind[3:])
        public[Attribute.MODULUS_BITS] = key_length
        public[Attribute.PUBLIC_EXPONENT] = b"\x01\x00\x01"
    elif kind == "ed25519":
        key_type, mechanism = KeyType.EC_EDWARDS, Mechanism.EC_EDWARDS_KEY_PAIR_GEN
        public[Attribute.EC_PARAMS] = ec_params_for_curve("ed25519")
    else:
        key_type, mechanism = KeyType.EC, Mechanism.EC_KEY_PAIR_GEN
        public[Attribute.EC_PARAMS] = ec_params_for_curve(_EC_KIND_CURVES[kind])
    if mechanism not in mechanisms:
        raise HsmError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"this token has no CKM_{mechanism.name} to generate a {kind} key",
        )
    try:
        public_key, private_key = session.generate_keypair(
            key_type,
            key_length,
            mechanism=mechanism,
            store=True,
            capabilities=0,
            public_template=public,
            private_template=private,
        )
    except p11e.PKCS11Error as exc:
        raise classify(exc, context=f"generating a {kind} key") from None
    try:
        info = describe_private_key(session, private_key, mechanisms)
        _set_id(private_key, public_key, info.ski)
        return describe_private_key(session, private_key, mechanisms)
    except BaseException:
        _destroy_quietly(private_key, public_key)
        raise


def _set_id(private_key: Any, public_key: Any, ski: bytes) -> None:
    try:
        private_key[Attribute.ID] = ski
        public_key[Attribute.ID] = ski
    except p11e.PKCS11Error as exc:
        raise classify(exc, context="setting CKA_ID to the SKI") from None


# -- import ---------------------------------------------------------------------------


def _load_private_key(data: bytes, password: bytes | None) -> Any:
    if b"-----BEGIN CERTIFICATE" in data and b"PRIVATE KEY-----" not in data:
        raise KeyImportError("this is a certificate, not a private key")
    pem = b"-----BEGIN" in data
    try:
        if pem:
            return serialization.load_pem_private_key(data, password)
        return serialization.load_der_private_key(data, password)
    except TypeError:
        # cryptography raises TypeError for a missing or superfluous password.
        if password is None:
            raise KeyImportError("the key is encrypted: a password is needed") from None
        raise KeyImportError("a password was given but the key is not encrypted") from None
    except ValueError:
        # Never include cryptography's message: keep the error free of any input.
        raise KeyImportError(
            "not a readable private key (PEM or DER; PKCS#1, PKCS#8 or SEC1), "
            "or the password is wrong"
        ) from None
    except Exception as exc:
        raise KeyImportError(f"cannot read the private key ({type(exc).__name__})") from None


def import_pem(
    target: Token | Any, pem_bytes: bytes, label: str, password: bytes | None = None
) -> KeyInfo:
    """Import an RSA, EC (P-256/384/521) or Ed25519 private key from PEM or DER.

    PKCS#1, PKCS#8 (also encrypted, with ``password``) and SEC1 are accepted. Refuses
    a key whose SKI is already on the token with :class:`DuplicateKeyError`
    (ALREADY_EXISTS), unreadable input with :class:`KeyImportError`.
    """
    _check_label(label)
    key = _load_private_key(bytes(pem_bytes), password)
    try:
        if isinstance(key, rsa.RSAPrivateKey):
            if key.key_size < 2048:
                log.warning(
                    "importing a %d-bit RSA key; 2048 bits or more is advised", key.key_size
                )
        elif isinstance(key, ec.EllipticCurvePrivateKey):
            if key.curve.name not in _IMPORT_CURVES:
                raise KeyImportError(
                    f"EC curve {key.curve.name} is not supported (P-256, P-384, P-521 only)"
                )
        elif not isinstance(key, ed25519.Ed25519PrivateKey):
            raise KeyImportError(
                f"{type(key).__name__} keys are not supported (RSA, EC and Ed25519 only)"
            )
        loaded = key
        info = _run(target, lambda s, m: _import(s, m, loaded, label), write=True)
    finally:
        # Drop our references to the parsed key as soon as it is on the token.
        del key
        loaded = None
    log.info("imported %s key %s (label %r)", info.curve or "RSA", info.ski.hex(), label)
    return _served(target, info)


def _import(session: Any, mechanisms: frozenset[int], key: Any, label: str) -> KeyInfo:
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    ski = ski_from_spki(spki)
    existing = _existing(session, mechanisms, ski)
    if existing is not None:
        raise DuplicateKeyError(ski, existing)

    secrets: list[bytearray] = []
    private_template: dict[Attribute, Any]
    public_template: dict[Attribute, Any]
    if isinstance(key, rsa.RSAPrivateKey):
        numbers = key.private_numbers()
        public_numbers = numbers.public_numbers
        private_template = _private_template(label, ski, decrypt=True)
        private_template[Attribute.KEY_TYPE] = KeyType.RSA
        public_template = _public_template(label, ski, encrypt=True)
        public_template[Attribute.KEY_TYPE] = KeyType.RSA
        modulus = bytes(_int_bytes(public_numbers.n))
        exponent = bytes(_int_bytes(public_numbers.e))
        for attribute, value in (
            (Attribute.PRIVATE_EXPONENT, numbers.d),
            (Attribute.PRIME_1, numbers.p),
            (Attribute.PRIME_2, numbers.q),
            (Attribute.EXPONENT_1, numbers.dmp1),
            (Attribute.EXPONENT_2, numbers.dmq1),
            (Attribute.COEFFICIENT, numbers.iqmp),
        ):
            buffer = _int_bytes(value)
            secrets.append(buffer)
            private_template[attribute] = buffer
        del numbers
        for template in (private_template, public_template):
            template[Attribute.MODULUS] = modulus
            template[Attribute.PUBLIC_EXPONENT] = exponent
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        params = ec_params_for_curve(key.curve.name)
        size = (key.curve.key_size + 7) // 8
        scalar = _int_bytes(key.private_numbers().private_value, size)
        secrets.append(scalar)
        private_template = _private_template(label, ski, decrypt=False)
        private_template.update(
            {Attribute.KEY_TYPE: KeyType.EC, Attribute.EC_PARAMS: params, Attribute.VALUE: scalar}
        )
        point = key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        public_template = _public_template(label, ski, encrypt=False)
        public_template.update(
            {
                Attribute.KEY_TYPE: KeyType.EC,
                Attribute.EC_PARAMS: params,
                Attribute.EC_POINT: _der_octet_string(point),
            }
        )
    else:
        params = ec_params_for_curve("ed25519")
        raw = bytearray(
            key.private_bytes(
                serialization.Encoding.Raw,
                serialization.PrivateFormat.Raw,
                serialization.NoEncryption(),
            )
        )
        secrets.append(raw)
        private_template = _private_template(label, ski, decrypt=False)
        private_template.update(
            {
                Attribute.KEY_TYPE: KeyType.EC_EDWARDS,
                Attribute.EC_PARAMS: params,
                Attribute.VALUE: raw,
            }
        )
        public_raw = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        public_template = _public_template(label, ski, encrypt=False)
        public_template.update(
            {
                Attribute.KEY_TYPE: KeyType.EC_EDWARDS,
                Attribute.EC_PARAMS: params,
                # SoftHSM2 stores and returns the Ed25519 point DER-wrapped; so do we.
                Attribute.EC_POINT: _der_octet_string(public_raw),
            }
        )

    private_key = public_key = None
    try:
        try:
            private_key = session.create_object(private_template)
        finally:
            # The module has its copy now (or failed); ours goes.
            _wipe(secrets)
            private_template.clear()
        public_key = session.create_object(public_template)
        info = describe_private_key(session, private_key, mechanisms)
        if info.ski != ski:
            raise HsmError(
                grpc.StatusCode.INTERNAL,
                "the token's copy of the key does not match the imported key",
            )
        return info
    except p11e.PKCS11Error as exc:
        _destroy_quietly(private_key, public_key)
        raise classify(exc, context="importing the key") from None
    except BaseException:
        _destroy_quietly(private_key, public_key)
        raise


# -- list / delete --------------------------------------------------------------------


def list_keys(target: Token | Any) -> list[KeyInfo]:
    """Every usable private key on the token, freshly discovered and unfiltered
    (a Token's own :meth:`~signer.hsm.pool.Token.keys` applies its URI's id/object)."""
    return _run(target, discover_keys, write=False)


def delete_key(target: Token | Any, ski: bytes) -> int:
    """Destroy the objects (private and public key) whose CKA_ID is this SKI.

    Only keys written the Keyward way (CKA_ID = SKI) are deleted: matching objects
    of keys made elsewhere by their own CKA_ID could take unrelated objects along
    (many tools leave CKA_ID empty), so such a key is refused with
    FAILED_PRECONDITION. Returns the number of objects destroyed.
    """

    def delete(session: Any, mechanisms: frozenset[int]) -> int:
        doomed = list(session.get_objects({Attribute.ID: ski}))
        if not doomed:
            for key in discover_keys(session, mechanisms):
                if key.ski == ski:
                    raise HsmError(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"key {ski.hex()} (label {key.label!r}) has CKA_ID {key.id.hex()}, "
                        "not its SKI; delete it with the HSM's own tools",
                    )
            raise HsmError(grpc.StatusCode.NOT_FOUND, f"no key with SKI {ski.hex()}")
        for obj in doomed:
            try:
                obj.destroy()
            except p11e.PKCS11Error as exc:
                raise classify(exc, context="deleting the key") from None
        return len(doomed)

    count = _run(target, delete, write=True)
    log.info("deleted key %s (%d objects)", ski.hex(), count)
    return count
