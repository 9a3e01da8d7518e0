"""Key identification (SKI) and discovery of the private keys on a token.

The keyless protocol names keys by their SKI: SHA-1 over the *contents* of the
subjectPublicKey BIT STRING of the key's SubjectPublicKeyInfo (RFC 5280 4.2.1.2
method 1; PROTOCOL.md section 7). That needs the public key, and a PKCS#11 private
key object does not always carry it, so discovery pairs every private key with its
public half:

* RSA: ``CKA_MODULUS``/``CKA_PUBLIC_EXPONENT`` of the private key (PKCS#11 lets
  those be read even from a sensitive key), else the public key object with the
  same ``CKA_ID``;
* EC: the public key object with the same ``CKA_ID``: ``CKA_EC_PARAMS`` (the DER
  OID of the named curve) and ``CKA_EC_POINT`` (the point, which SoftHSM2 and the
  spec store DER-wrapped in an OCTET STRING; some modules store it raw);
* Ed25519 (``CKK_EC_EDWARDS``): likewise, with ``CKA_EC_PARAMS`` either the OID
  1.3.101.112 or the PrintableString "edwards25519" (PKCS#11 3.0 allows both) and
  ``CKA_EC_POINT`` the 32 raw bytes, possibly DER-wrapped.

A private key without a usable public half is skipped with a warning naming its
label; discovery never fails because of one odd object on the token.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Any, Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from pkcs11 import Attribute, KeyType, ObjectClass
from pkcs11 import exceptions as p11e

from signer.hsm.mechanisms import supported_algorithms, supported_decrypt_modes
from signer.v1 import signer_pb2 as pb

__all__ = [
    "KeyInfo",
    "describe_private_key",
    "discover_keys",
    "ec_params_for_curve",
    "ski_from_spki",
]

log = logging.getLogger(__name__)

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey


def ski_from_spki(spki_der: bytes) -> bytes:
    """The 20-byte SKI of a DER SubjectPublicKeyInfo (RFC 5280 4.2.1.2 method 1).

    ``cryptography``'s ``SubjectKeyIdentifier.from_public_key`` hashes exactly the
    BIT STRING contents (for RSA the DER RSAPublicKey, for EC the point ``04||X||Y``,
    for Ed25519 the 32 key bytes), not the whole SPKI.
    """
    public_key = serialization.load_der_public_key(spki_der)
    return x509.SubjectKeyIdentifier.from_public_key(public_key).digest  # type: ignore[arg-type]


# CKA_EC_PARAMS (DER) -> (curve name as the proto spells it, cryptography curve).
_EC_CURVES: Final[dict[bytes, tuple[str, ec.EllipticCurve]]] = {
    bytes.fromhex("06082a8648ce3d030107"): ("secp256r1", ec.SECP256R1()),
    bytes.fromhex("06052b81040022"): ("secp384r1", ec.SECP384R1()),
    bytes.fromhex("06052b81040023"): ("secp521r1", ec.SECP521R1()),
}
_CURVE_PARAMS: Final[dict[str, bytes]] = {name: der for der, (name, _) in _EC_CURVES.items()}
ED25519_OID_PARAMS: Final = bytes.fromhex("06032b6570")
_ED25519_PARAMS: Final[frozenset[bytes]] = frozenset(
    {
        ED25519_OID_PARAMS,
        b"\x13\x0cedwards25519",  # PrintableString
        b"\x0c\x0cedwards25519",  # UTF8String, seen in some 3.0 modules
    }
)


def ec_params_for_curve(curve: str) -> bytes:
    """DER ``CKA_EC_PARAMS`` for "secp256r1", "secp384r1", "secp521r1" or "ed25519"."""
    if curve == "ed25519":
        return ED25519_OID_PARAMS
    return _CURVE_PARAMS[curve]


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """A private key on the token, described by public facts only.

    ``algorithms`` and ``decrypt_modes`` are tuples (immutable, so KeyInfo can be
    shared between threads) of what the key can do *on this token*: key type, size,
    ``CKA_SIGN``/``CKA_DECRYPT`` and the token's mechanism list all considered.
    ``handle`` is the object handle seen at discovery (valid across this process's
    sessions for token objects); it is not part of equality.
    """

    ski: bytes
    label: str
    id: bytes
    key_type: pb.KeyType
    bits: int
    curve: str
    spki: bytes
    algorithms: tuple[pb.Algorithm, ...]
    decrypt_modes: tuple[pb.DecryptMode, ...]
    can_sign: bool = True
    can_decrypt: bool = False
    rsa_modulus: int | None = field(default=None, repr=False, compare=False)
    handle: int | None = field(default=None, repr=False, compare=False)

    def to_proto(self) -> pb.Key:
        return pb.Key(
            ski=self.ski,
            label=self.label,
            type=self.key_type,
            bits=self.bits,
            curve=self.curve,
            public_key=self.spki,
            algorithms=self.algorithms,
            decrypt_modes=self.decrypt_modes,
            id=self.id,
        )

    def public_key(self) -> PublicKey:
        """The public key as a ``cryptography`` object (for verifying in tests/tools)."""
        key = serialization.load_der_public_key(self.spki)
        assert isinstance(
            key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
        )
        return key

    def __repr__(self) -> str:
        kind = pb.KeyType.Name(self.key_type).removeprefix("KEY_TYPE_")
        size = f"{self.bits}" if not self.curve else self.curve
        return f"KeyInfo(ski={self.ski.hex()}, label={self.label!r}, {kind} {size})"


class _Skip(Exception):
    """This private key cannot be described; the reason is logged, it is skipped."""


def _read(obj: Any, attribute: Attribute, default: Any = None) -> Any:
    """An attribute value, or ``default`` if the object does not have or show it."""
    try:
        return obj[attribute]
    except (p11e.AttributeTypeInvalid, p11e.AttributeSensitive, p11e.FunctionFailed):
        return default


def _der_octet_string(data: bytes) -> bytes | None:
    """The contents of a DER OCTET STRING that spans all of ``data``, else None."""
    if len(data) < 2 or data[0] != 0x04:
        return None
    first = data[1]
    if first < 0x80:
        length, start = first, 2
    else:
        count = first & 0x7F
        if count == 0 or count > 2 or len(data) < 2 + count:
            return None
        length = int.from_bytes(data[2 : 2 + count], "big")
        start = 2 + count
    if start + length != len(data):
        return None
    return data[start:]


def _point_bytes(ec_point: bytes, raw_lengths: Collection[int]) -> bytes:
    """The raw point from ``CKA_EC_POINT``, whether DER-wrapped or not.

    A raw uncompressed point also starts with 0x04, so the decision is made by
    length: the raw encodings of a curve have sizes no wrapped one can have.
    """
    if len(ec_point) in raw_lengths:
        return ec_point
    inner = _der_octet_string(ec_point)
    if inner is not None and len(inner) in raw_lengths:
        return inner
    raise _Skip(f"CKA_EC_POINT of {len(ec_point)} bytes is not a point of this curve")


def _spki_of(public_key: PublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


class _PublicIndex:
    """All public key objects of the token, grouped by (key type, CKA_ID), read once."""

    def __init__(self, session: Any) -> None:
        self._session = session
        self._groups: dict[tuple[int, bytes], list[Any]] | None = None

    def candidates(self, key_type: int, key_id: bytes) -> list[Any]:
        if self._groups is None:
            groups: dict[tuple[int, bytes], list[Any]] = {}
            for obj in list(self._session.get_objects({Attribute.CLASS: ObjectClass.PUBLIC_KEY})):
                kt = _read(obj, Attribute.KEY_TYPE)
                if kt is None:
                    continue
                groups.setdefault((int(kt), _read(obj, Attribute.ID, b"") or b""), []).append(obj)
            self._groups = groups
        return self._groups.get((key_type, key_id), [])


def _public_from_objects(candidates: Iterable[Any], label: str, build: Any) -> PublicKey:
    """Build the public key from matching public objects; all must agree."""
    found: dict[bytes, PublicKey] = {}
    labelled: dict[bytes, PublicKey] = {}
    for obj in candidates:
        try:
            public_key = build(obj)
        except _Skip:
            continue
        spki = _spki_of(public_key)
        found[spki] = public_key
        if (_read(obj, Attribute.LABEL, "") or "") == label:
            labelled[spki] = public_key
    if len(found) == 1:
        return next(iter(found.values()))
    if len(labelled) == 1:
        # Several different public keys share the CKA_ID; the one with the same label
        # as the private key is the intended half.
        return next(iter(labelled.values()))
    if not found:
        raise _Skip("no public key object with the same CKA_ID")
    raise _Skip(f"{len(found)} different public keys share its CKA_ID")


def describe_private_key(
    session: Any,
    private_key: Any,
    mechanisms: Collection[int],
    *,
    publics: _PublicIndex | None = None,
) -> KeyInfo:
    """Describe one private key object. Raises ``ValueError`` when it cannot be used."""
    try:
        return _describe(session, private_key, mechanisms, publics or _PublicIndex(session))
    except _Skip as exc:
        raise ValueError(str(exc)) from None


def _describe(
    session: Any, private_key: Any, mechanisms: Collection[int], publics: _PublicIndex
) -> KeyInfo:
    key_type = _read(private_key, Attribute.KEY_TYPE)
    label: str = _read(private_key, Attribute.LABEL, "") or ""
    key_id: bytes = _read(private_key, Attribute.ID, b"") or b""
    can_sign = bool(_read(private_key, Attribute.SIGN, True))
    can_decrypt = bool(_read(private_key, Attribute.DECRYPT, False))
    modulus: int | None = None
    curve_name = ""

    if key_type == KeyType.RSA:
        pb_type = pb.KEY_TYPE_RSA
        n_bytes = _read(private_key, Attribute.MODULUS)
        e_bytes = _read(private_key, Attribute.PUBLIC_EXPONENT)
        if n_bytes and e_bytes:
            public_key: PublicKey = rsa.RSAPublicNumbers(
                int.from_bytes(e_bytes, "big"), int.from_bytes(n_bytes, "big")
            ).public_key()
        else:

            def build_rsa(obj: Any) -> PublicKey:
                n = _read(obj, Attribute.MODULUS)
                e = _read(obj, Attribute.PUBLIC_EXPONENT)
                if not n or not e:
                    raise _Skip("public key object lacks CKA_MODULUS/CKA_PUBLIC_EXPONENT")
                return rsa.RSAPublicNumbers(
                    int.from_bytes(e, "big"), int.from_bytes(n, "big")
                ).public_key()

            public_key = _public_from_objects(
                publics.candidates(KeyType.RSA, key_id), label, build_rsa
            )
        assert isinstance(public_key, rsa.RSAPublicKey)
        modulus = public_key.public_numbers().n
        bits = public_key.key_size

    elif key_type == KeyType.EC:
        pb_type = pb.KEY_TYPE_EC
        private_params = _read(private_key, Attribute.EC_PARAMS)

        def build_ec(obj: Any) -> PublicKey:
            params = _read(obj, Attribute.EC_PARAMS)
            if private_params is not None and params != private_params:
                raise _Skip("public key is on another curve")
            curve = _EC_CURVES.get(params or b"")
            if curve is None:
                raise _Skip("unsupported curve (only P-256, P-384, P-521 named curves)")
            size = (curve[1].key_size + 7) // 8
            point = _point_bytes(
                _read(obj, Attribute.EC_POINT, b"") or b"", (2 * size + 1, size + 1)
            )
            try:
                return ec.EllipticCurvePublicKey.from_encoded_point(curve[1], point)
            except ValueError:
                raise _Skip("CKA_EC_POINT is not a valid point") from None

        if private_params is not None and private_params not in _EC_CURVES:
            raise _Skip("unsupported curve (only P-256, P-384, P-521 named curves)")
        public_key = _public_from_objects(publics.candidates(KeyType.EC, key_id), label, build_ec)
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        curve_name = public_key.curve.name
        bits = public_key.curve.key_size

    elif key_type == KeyType.EC_EDWARDS:
        pb_type = pb.KEY_TYPE_ED25519
        private_params = _read(private_key, Attribute.EC_PARAMS)
        if private_params is not None and private_params not in _ED25519_PARAMS:
            raise _Skip("Edwards curve other than Ed25519 (Ed448 is not supported)")

        def build_ed(obj: Any) -> PublicKey:
            params = _read(obj, Attribute.EC_PARAMS)
            if params is not None and params not in _ED25519_PARAMS:
                raise _Skip("public key is not Ed25519")
            raw = _point_bytes(_read(obj, Attribute.EC_POINT, b"") or b"", (32,))
            return ed25519.Ed25519PublicKey.from_public_bytes(raw)

        public_key = _public_from_objects(
            publics.candidates(KeyType.EC_EDWARDS, key_id), label, build_ed
        )
        curve_name = "ed25519"
        bits = 255
        can_decrypt = False

    else:
        name = getattr(key_type, "name", str(key_type))
        raise _Skip(f"key type {name} is not supported")

    spki = _spki_of(public_key)
    return KeyInfo(
        ski=ski_from_spki(spki),
        label=label,
        id=key_id,
        key_type=pb_type,
        bits=bits,
        curve=curve_name,
        spki=spki,
        algorithms=supported_algorithms(pb_type, bits, mechanisms, can_sign=can_sign),
        decrypt_modes=supported_decrypt_modes(pb_type, mechanisms, can_decrypt=can_decrypt),
        can_sign=can_sign,
        can_decrypt=can_decrypt,
        rsa_modulus=modulus,
        handle=private_key.handle,
    )


def discover_keys(
    session: Any,
    mechanisms: Collection[int],
    *,
    key_id: bytes | None = None,
    label: str | None = None,
) -> list[KeyInfo]:
    """Every usable private key on the session's token, optionally filtered.

    ``key_id``/``label`` are the URI's ``id``/``object`` (CKA_ID / CKA_LABEL). Keys
    come back sorted by SKI; when the same key (same SKI) is on the token twice,
    the first is kept and the duplicate is logged.
    """
    template: dict[Attribute, Any] = {Attribute.CLASS: ObjectClass.PRIVATE_KEY}
    if key_id is not None:
        template[Attribute.ID] = key_id
    if label is not None:
        template[Attribute.LABEL] = label
    publics = _PublicIndex(session)
    found: dict[bytes, KeyInfo] = {}
    # Materialise the search first: describing a key runs other searches (its public
    # half), and PKCS#11 allows only one active search per session.
    for private_key in list(session.get_objects(template)):
        try:
            info = _describe(session, private_key, mechanisms, publics)
        except _Skip as exc:
            shown = _read(private_key, Attribute.LABEL, "") or ""
            shown_id = (_read(private_key, Attribute.ID, b"") or b"").hex()
            log.warning("skipping private key %r (CKA_ID %s): %s", shown, shown_id or "empty", exc)
            continue
        previous = found.get(info.ski)
        if previous is not None:
            log.warning(
                "private key %r has the same SKI %s as %r; serving one of them",
                info.label,
                info.ski.hex(),
                previous.label,
            )
            continue
        found[info.ski] = info
    return [found[ski] for ski in sorted(found)]
