"""Numeric constants of the keyless wire protocol and their gokeyless names.

The enums are ``IntEnum`` so they compare equal to the raw bytes read off the
wire; the codec itself passes plain ``int`` around (an unknown opcode or error
code is legal syntax and must survive decoding), and only code that wants a
name converts.

The ``*_name``/``op_type`` helpers reproduce gokeyless's strings because they
end up as Prometheus label values: a user moving from gokeyless keeps their
dashboards and alerts (PEERS.md A6).
"""

from __future__ import annotations

import enum

__all__ = [
    "ErrorCode",
    "Op",
    "Tag",
    "error_name",
    "op_name",
    "op_type",
]


class Tag(enum.IntEnum):
    """Item tags (one byte in front of every TLV item)."""

    CERTIFICATE_DIGEST = 0x01  # deprecated SHA-256 of the modulus hex; 32 bytes
    SERVER_NAME = 0x02  # SNI the browser sent to the edge
    CLIENT_IP = 0x03  # 4 or 16 bytes
    SUBJECT_KEY_IDENTIFIER = 0x04  # 20 bytes; the key lookup handle
    SERVER_IP = 0x05  # 4 or 16 bytes
    CERT_ID = 0x06
    OPCODE = 0x11  # 1 byte: operation in requests, status in responses
    PAYLOAD = 0x12
    CUSTOM_FUNC_NAME = 0x13
    EXTRA = 0x14
    JAEGER_SPAN = 0x15
    REQ_CONTEXT = 0x16  # JSON object
    COMPLIANCE_REGION = 0x17  # 1 byte
    PADDING = 0x20  # ignored on receipt


class Op(enum.IntEnum):
    """Opcodes: requests, then the three response opcodes."""

    RSA_DECRYPT = 0x01
    RSA_SIGN_MD5SHA1 = 0x02
    RSA_SIGN_SHA1 = 0x03
    RSA_SIGN_SHA224 = 0x04
    RSA_SIGN_SHA256 = 0x05
    RSA_SIGN_SHA384 = 0x06
    RSA_SIGN_SHA512 = 0x07
    # Only the C server implements it (raw RSA, no padding removal); gokeyless
    # answers ErrBadOpcode. It is listed so the dispatcher can choose.
    RSA_DECRYPT_RAW = 0x08
    ECDSA_SIGN_MD5SHA1 = 0x12
    ECDSA_SIGN_SHA1 = 0x13
    ECDSA_SIGN_SHA224 = 0x14
    ECDSA_SIGN_SHA256 = 0x15
    ECDSA_SIGN_SHA384 = 0x16
    ECDSA_SIGN_SHA512 = 0x17
    ED25519_SIGN = 0x18
    SEAL = 0x21
    UNSEAL = 0x22
    RPC = 0x23
    CUSTOM = 0x24
    RSA_PSS_SIGN_SHA256 = 0x35
    RSA_PSS_SIGN_SHA384 = 0x36
    RSA_PSS_SIGN_SHA512 = 0x37
    PING = 0xF1
    # Response opcodes.
    RESPONSE = 0xF0
    PONG = 0xF2
    ERROR = 0xFF


class ErrorCode(enum.IntEnum):
    """The one-byte payload of an ``Op.ERROR`` packet."""

    NONE = 0x00  # never on the wire
    CRYPTO = 0x01
    KEY_NOT_FOUND = 0x02
    READ = 0x03
    VERSION_MISMATCH = 0x04
    BAD_OPCODE = 0x05
    UNEXPECTED_OPCODE = 0x06
    FORMAT = 0x07
    INTERNAL = 0x08
    CERT_NOT_FOUND = 0x09
    EXPIRED = 0x0A
    REMOTE_CONFIGURATION = 0x0B


# gokeyless's constant names (its `stringer` output). 0x08 has no gokeyless
# constant; the name follows the same pattern so it is still a readable label.
_OP_NAMES: dict[int, str] = {
    Op.RSA_DECRYPT: "OpRSADecrypt",
    Op.RSA_SIGN_MD5SHA1: "OpRSASignMD5SHA1",
    Op.RSA_SIGN_SHA1: "OpRSASignSHA1",
    Op.RSA_SIGN_SHA224: "OpRSASignSHA224",
    Op.RSA_SIGN_SHA256: "OpRSASignSHA256",
    Op.RSA_SIGN_SHA384: "OpRSASignSHA384",
    Op.RSA_SIGN_SHA512: "OpRSASignSHA512",
    Op.RSA_DECRYPT_RAW: "OpRSADecryptRaw",
    Op.ECDSA_SIGN_MD5SHA1: "OpECDSASignMD5SHA1",
    Op.ECDSA_SIGN_SHA1: "OpECDSASignSHA1",
    Op.ECDSA_SIGN_SHA224: "OpECDSASignSHA224",
    Op.ECDSA_SIGN_SHA256: "OpECDSASignSHA256",
    Op.ECDSA_SIGN_SHA384: "OpECDSASignSHA384",
    Op.ECDSA_SIGN_SHA512: "OpECDSASignSHA512",
    Op.ED25519_SIGN: "OpEd25519Sign",
    Op.SEAL: "OpSeal",
    Op.UNSEAL: "OpUnseal",
    Op.RPC: "OpRPC",
    Op.CUSTOM: "OpCustom",
    Op.RSA_PSS_SIGN_SHA256: "OpRSAPSSSignSHA256",
    Op.RSA_PSS_SIGN_SHA384: "OpRSAPSSSignSHA384",
    Op.RSA_PSS_SIGN_SHA512: "OpRSAPSSSignSHA512",
    Op.PING: "OpPing",
    Op.RESPONSE: "OpResponse",
    Op.PONG: "OpPong",
    Op.ERROR: "OpError",
}

# Plain-int keys: the lookups below run once per request, and hashing an int is
# cheaper than going through IntEnum.__hash__.
_OP_NAMES = {int(k): v for k, v in _OP_NAMES.items()}

_OP_TYPES: dict[int, str] = {}
for _op in (
    Op.RSA_DECRYPT,
    Op.RSA_DECRYPT_RAW,
    Op.RSA_SIGN_MD5SHA1,
    Op.RSA_SIGN_SHA1,
    Op.RSA_SIGN_SHA224,
    Op.RSA_SIGN_SHA256,
    Op.RSA_SIGN_SHA384,
    Op.RSA_SIGN_SHA512,
    Op.RSA_PSS_SIGN_SHA256,
    Op.RSA_PSS_SIGN_SHA384,
    Op.RSA_PSS_SIGN_SHA512,
):
    _OP_TYPES[int(_op)] = "rsa"
for _op in (
    Op.ECDSA_SIGN_MD5SHA1,
    Op.ECDSA_SIGN_SHA1,
    Op.ECDSA_SIGN_SHA224,
    Op.ECDSA_SIGN_SHA256,
    Op.ECDSA_SIGN_SHA384,
    Op.ECDSA_SIGN_SHA512,
):
    _OP_TYPES[int(_op)] = "ecdsa"
_OP_TYPES[int(Op.ED25519_SIGN)] = "ed25519"
_OP_TYPES[int(Op.CUSTOM)] = "custom"
_OP_TYPES[int(Op.RPC)] = "rpc"
for _op in (Op.SEAL, Op.UNSEAL, Op.PING, Op.RESPONSE, Op.PONG, Op.ERROR):
    _OP_TYPES[int(_op)] = "other"
del _op

# gokeyless's Error.String() texts; they are the `error` label of its latency
# histograms, so they must match exactly (including the long key-not-found text).
_ERROR_NAMES: dict[int, str] = {
    ErrorCode.NONE: "no error",
    ErrorCode.CRYPTO: "cryptography error",
    ErrorCode.KEY_NOT_FOUND: "key not found due to no matching SKI/SNI/ServerIP",
    ErrorCode.READ: "read failure",
    ErrorCode.VERSION_MISMATCH: "version mismatch",
    ErrorCode.BAD_OPCODE: "bad opcode",
    ErrorCode.UNEXPECTED_OPCODE: "unexpected opcode",
    ErrorCode.FORMAT: "malformed message",
    ErrorCode.INTERNAL: "internal error",
    ErrorCode.CERT_NOT_FOUND: "certificate not found",
    ErrorCode.EXPIRED: "sealing key expired",
    ErrorCode.REMOTE_CONFIGURATION: "remote configuration error",
}
_ERROR_NAMES = {int(k): v for k, v in _ERROR_NAMES.items()}


def op_name(op: int) -> str:
    """gokeyless constant name of an opcode, e.g. ``"OpECDSASignSHA256"``.

    Unknown values give ``"OpUnknown(0xbb)"`` so a label never fails to render
    and an unknown opcode is still recognisable in logs.
    """
    name = _OP_NAMES.get(op)
    if name is None:
        return f"OpUnknown({op:#04x})"
    return name


def op_type(op: int) -> str:
    """Metric family of an opcode, as gokeyless's ``Op.Type()``.

    One of ``rsa``, ``ecdsa``, ``ed25519``, ``custom``, ``rpc``, ``other`` or
    ``unknown``.
    """
    return _OP_TYPES.get(op, "unknown")


def error_name(code: int) -> str:
    """gokeyless text of an error code (``"cryptography error"``, ...)."""
    return _ERROR_NAMES.get(code, "unknown error")
