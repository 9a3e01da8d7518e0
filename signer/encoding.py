"""Signer Stream operations encoded directly as protobuf bytes, for the fast path.

On the Stream method the protobuf objects cost more than the work they describe: a
gateway that builds a ``pb.Operation`` (three nested messages) per keyless request,
stamps its id and deadline, copies it into a ``StreamRequest`` and serialises that,
spends more CPU per request on those objects than on the rest of its own work. The
bytes are simple, so this module writes them itself, following
``protos/keyward/signer/v1/signer.proto`` (the contract; nothing here changes it):

- :func:`sign_body` and :func:`decrypt_body` encode an ``Operation``'s ``sign`` or
  ``decrypt`` field once per request;
- :func:`stream_entry` wraps a body as one element of ``StreamRequest.operations``
  with the fields that change per attempt (``id``, ``timeout_us``, ``traceparent``)
  appended. Protobuf parsers take the last value of a repeated scalar field, so a
  body serialised from a ``pb.Operation`` that already set them is overridden, as
  if the fields had been assigned.
- :func:`result_entry` is the signer's side: one ``StreamResponse.results`` element
  for an output (errors, rare, go through :func:`result_entry_message`). Entries
  joined are a ``StreamResponse``.

``tests/test_encoding.py`` checks every function against the generated code.
"""

from __future__ import annotations

from typing import Any

# Wire types: 0 varint, 2 length-delimited. A tag is (field number << 3) | wire type.
_OPERATIONS = b"\x0a"  # StreamRequest.operations = 1, length-delimited
_ID = b"\x08"  # Operation.id = 1, varint
_SIGN = b"\x12"  # Operation.sign = 2
_DECRYPT = b"\x1a"  # Operation.decrypt = 3
_TIMEOUT = b"\x20"  # Operation.timeout_us = 4, varint
_TRACEPARENT = b"\x2a"  # Operation.traceparent = 5
_KEY_SKI = b"\x0a"  # SignRequest.key / DecryptRequest.key = 1; KeySelector.ski = 1
_ALGORITHM = b"\x10"  # SignRequest.algorithm = 2 / DecryptRequest.mode = 2, varint
_DATA = b"\x1a"  # SignRequest.data = 3 / DecryptRequest.ciphertext = 3
_RESULTS = b"\x0a"  # StreamResponse.results = 1
_OUTPUT = b"\x12"  # OperationResult.output = 2

# Small varints, precomputed: ids under 16384 and every enum value hit this table.
_SMALL = [bytes((n,)) if n < 0x80 else bytes(((n & 0x7F) | 0x80, n >> 7)) for n in range(16384)]


def varint(n: int) -> bytes:
    """Protobuf's base-128 varint of a non-negative integer."""
    if n < 16384:
        return _SMALL[n]
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: bytes, data: bytes) -> bytes:
    return tag + varint(len(data)) + data


def _request(ski: bytes, enum_value: int, data: bytes) -> bytes:
    # KeySelector{ski} (a oneof member: written even when empty), then the enum and the
    # data, each omitted at its default as proto3 omits them: the generated code's bytes.
    out = _field(_KEY_SKI, _field(_KEY_SKI, ski))
    if enum_value:
        out += _ALGORITHM + varint(enum_value)
    return out + _field(_DATA, data) if data else out


def sign_body(ski: bytes, algorithm: int, data: bytes) -> bytes:
    """``Operation{sign: SignRequest{key: {ski}, algorithm, data}}``, serialised."""
    return _field(_SIGN, _request(ski, algorithm, data))


def decrypt_body(ski: bytes, mode: int, ciphertext: bytes) -> bytes:
    """``Operation{decrypt: DecryptRequest{key: {ski}, mode, ciphertext}}``, serialised."""
    return _field(_DECRYPT, _request(ski, mode, ciphertext))


def stream_entry(body: bytes, op_id: int, timeout_us: int = 0, traceparent: str = "") -> bytes:
    """One ``StreamRequest.operations`` element: ``body`` plus the per-attempt fields
    (each written only when set, as proto3 omits defaults)."""
    entry = body + _ID + varint(op_id) if op_id else body
    if timeout_us:
        entry += _TIMEOUT + varint(timeout_us)
    if traceparent:
        entry += _field(_TRACEPARENT, traceparent.encode())
    return _OPERATIONS + varint(len(entry)) + entry


def result_entry(op_id: int, output: bytes) -> bytes:
    """One ``StreamResponse.results`` element: ``OperationResult{id, output}``."""
    entry = (_ID + varint(op_id) if op_id else b"") + _OUTPUT + varint(len(output)) + output
    return _RESULTS + varint(len(entry)) + entry


def result_entry_message(result: Any) -> bytes:
    """One ``StreamResponse.results`` element from a ``pb.OperationResult``."""
    return _field(_RESULTS, result.SerializeToString())
