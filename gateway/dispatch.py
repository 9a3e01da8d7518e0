"""What the gateway answers to each keyless request.

The table, and why Keyward differs from gokeyless where it does, is docs/protocol.md;
this module is its code: opcode to Signer algorithm, and final Signer status to the
keyless error the edge sees.
"""

from __future__ import annotations

import json

import grpc

from gateway.protocol import ErrorCode, Op
from signer.v1 import signer_pb2 as pb

SIGN_ALGORITHMS: dict[int, pb.Algorithm] = {
    Op.RSA_SIGN_MD5SHA1: pb.RSA_PKCS1V15_MD5SHA1,
    Op.RSA_SIGN_SHA1: pb.RSA_PKCS1V15_SHA1,
    Op.RSA_SIGN_SHA224: pb.RSA_PKCS1V15_SHA224,
    Op.RSA_SIGN_SHA256: pb.RSA_PKCS1V15_SHA256,
    Op.RSA_SIGN_SHA384: pb.RSA_PKCS1V15_SHA384,
    Op.RSA_SIGN_SHA512: pb.RSA_PKCS1V15_SHA512,
    Op.RSA_PSS_SIGN_SHA256: pb.RSA_PSS_SHA256,
    Op.RSA_PSS_SIGN_SHA384: pb.RSA_PSS_SHA384,
    Op.RSA_PSS_SIGN_SHA512: pb.RSA_PSS_SHA512,
    Op.ECDSA_SIGN_MD5SHA1: pb.ECDSA_MD5SHA1,
    Op.ECDSA_SIGN_SHA1: pb.ECDSA_SHA1,
    Op.ECDSA_SIGN_SHA224: pb.ECDSA_SHA224,
    Op.ECDSA_SIGN_SHA256: pb.ECDSA_SHA256,
    Op.ECDSA_SIGN_SHA384: pb.ECDSA_SHA384,
    Op.ECDSA_SIGN_SHA512: pb.ECDSA_SHA512,
    Op.ED25519_SIGN: pb.ED25519,
}

DECRYPT_OPCODES = frozenset({Op.RSA_DECRYPT, Op.RSA_DECRYPT_RAW})
RESPONSE_OPCODES = frozenset({Op.RESPONSE, Op.PONG, Op.ERROR})

_S = grpc.StatusCode
STATUS_TO_KEYLESS: dict[int, int] = {
    _S.NOT_FOUND.value[0]: ErrorCode.KEY_NOT_FOUND,
    _S.INVALID_ARGUMENT.value[0]: ErrorCode.CRYPTO,
    _S.FAILED_PRECONDITION.value[0]: ErrorCode.CRYPTO,
    _S.OUT_OF_RANGE.value[0]: ErrorCode.CRYPTO,
    _S.PERMISSION_DENIED.value[0]: ErrorCode.REMOTE_CONFIGURATION,
    _S.UNAUTHENTICATED.value[0]: ErrorCode.REMOTE_CONFIGURATION,
    _S.UNIMPLEMENTED.value[0]: ErrorCode.REMOTE_CONFIGURATION,
}


def keyless_error(status_code: int) -> int:
    """The keyless error the edge sees for a final Signer status."""
    return STATUS_TO_KEYLESS.get(status_code, ErrorCode.INTERNAL)


def request_id_of(req_context: bytes) -> str:
    """The ``request_id`` of a tag 0x16 JSON object, or "" (only parsed for logs)."""
    if not req_context:
        return ""
    try:
        value = json.loads(req_context).get("request_id", "")
    except (ValueError, AttributeError):
        return ""
    return str(value)[:128] if isinstance(value, str | int) else ""
