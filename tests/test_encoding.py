"""signer.encoding against the generated protobuf code: the same messages, byte for
byte where protobuf's encoding is canonical, and field for field always."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from signer.encoding import (
    decrypt_body,
    result_entry,
    result_entry_message,
    sign_body,
    stream_entry,
    varint,
)
from signer.v1 import signer_pb2 as pb

skis = st.binary(min_size=0, max_size=64)
payloads = st.binary(min_size=0, max_size=2048)  # RSA-8192 ciphertexts are 1024 bytes
algorithms = st.sampled_from(list(pb.Algorithm.values()))
modes = st.sampled_from(list(pb.DecryptMode.values()))
ids = st.integers(min_value=0, max_value=2**64 - 1)
timeouts = st.integers(min_value=0, max_value=2**32 - 1)
parents = st.text(max_size=80)


@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_varint_is_protobufs(n: int) -> None:
    assert pb.Operation.FromString(b"\x08" + varint(n)).id == n
    assert pb.Operation(id=n).SerializeToString() == (b"\x08" + varint(n) if n else b"")


@given(skis, algorithms, payloads)
def test_sign_body_is_the_generated_serialisation(ski: bytes, alg: int, data: bytes) -> None:
    expected = pb.Operation(sign=pb.SignRequest(key=pb.KeySelector(ski=ski), algorithm=alg,
                                                data=data))
    assert sign_body(ski, alg, data) == expected.SerializeToString()


@given(skis, modes, payloads)
def test_decrypt_body_is_the_generated_serialisation(ski: bytes, mode: int, data: bytes) -> None:
    expected = pb.Operation(decrypt=pb.DecryptRequest(key=pb.KeySelector(ski=ski), mode=mode,
                                                      ciphertext=data))
    assert decrypt_body(ski, mode, data) == expected.SerializeToString()


@given(st.lists(st.tuples(skis, algorithms, payloads, ids, timeouts, parents), max_size=8))
def test_stream_entries_make_the_stream_request(
    ops: list[tuple[bytes, int, bytes, int, int, str]],
) -> None:
    raw = b"".join(stream_entry(sign_body(ski, alg, data), op_id, timeout, parent)
                   for ski, alg, data, op_id, timeout, parent in ops)
    expected = pb.StreamRequest(operations=[
        pb.Operation(id=op_id, timeout_us=timeout, traceparent=parent,
                     sign=pb.SignRequest(key=pb.KeySelector(ski=ski), algorithm=alg, data=data))
        for ski, alg, data, op_id, timeout, parent in ops
    ])
    assert pb.StreamRequest.FromString(raw) == expected


def test_fields_given_to_stream_entry_override_those_of_a_serialised_message() -> None:
    """OperationStream accepts a pb.Operation too: it appends its own id (and the
    caller's timeout or traceparent), and the parser takes the last value."""
    op = pb.Operation(id=7, timeout_us=5, traceparent="old",
                      sign=pb.SignRequest(key=pb.KeySelector(ski=b"k"), data=b"d"))
    parsed = pb.StreamRequest.FromString(
        stream_entry(op.SerializeToString(), 99, 1234, "00-new-01")).operations[0]
    assert (parsed.id, parsed.timeout_us, parsed.traceparent) == (99, 1234, "00-new-01")
    assert parsed.sign == op.sign
    kept = pb.StreamRequest.FromString(stream_entry(op.SerializeToString(), 99)).operations[0]
    assert (kept.id, kept.timeout_us, kept.traceparent) == (99, 5, "old")


@given(st.lists(st.tuples(ids, st.binary(max_size=600)), max_size=8), st.integers(0, 16),
       st.text(max_size=40))
def test_result_entries_make_the_stream_response(
    outputs: list[tuple[int, bytes]], code: int, message: str
) -> None:
    error = pb.OperationResult(id=7, error=pb.Status(code=code, message=message))
    raw = b"".join(result_entry(op_id, out) for op_id, out in outputs)
    raw += result_entry_message(error)
    parsed = pb.StreamResponse.FromString(raw)
    assert parsed == pb.StreamResponse(results=[
        *(pb.OperationResult(id=op_id, output=out) for op_id, out in outputs), error])
    # An empty output is still an output (the oneof says which), as the generated
    # code would send it.
    assert all(r.WhichOneof("result") == "output" for r in parsed.results[:-1])
