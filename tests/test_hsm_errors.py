"""Error classification, missing mechanisms, and HSM faults through the real code path."""

from __future__ import annotations

import hashlib
import pickle
import time
from collections.abc import Iterator

import grpc
import pkcs11
import pytest
from pkcs11 import Mechanism
from pkcs11 import exceptions as p11e
from softhsm import SoftHsmToken, verify_signature

from signer.hsm import admin
from signer.hsm.errors import HsmError, ckr_name, classify
from signer.hsm.keys import KeyInfo
from signer.hsm.pool import Job, Token
from signer.v1 import signer_pb2 as pb

DIGEST = hashlib.sha256(b"Hello!").digest()

# -- classification (no HSM needed) -----------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "ckr", "code", "fault"),
    [
        (p11e.SessionHandleInvalid(), "CKR_SESSION_HANDLE_INVALID", "UNAVAILABLE", True),
        (p11e.SessionClosed(), "CKR_SESSION_CLOSED", "UNAVAILABLE", True),
        (p11e.UserNotLoggedIn(), "CKR_USER_NOT_LOGGED_IN", "UNAVAILABLE", True),
        (p11e.DeviceError(), "CKR_DEVICE_ERROR", "UNAVAILABLE", True),
        (p11e.DeviceRemoved(), "CKR_DEVICE_REMOVED", "UNAVAILABLE", True),
        (p11e.DeviceMemory(), "CKR_DEVICE_MEMORY", "UNAVAILABLE", True),
        (p11e.TokenNotPresent(), "CKR_TOKEN_NOT_PRESENT", "UNAVAILABLE", True),
        (p11e.TokenNotRecognised(), "CKR_TOKEN_NOT_RECOGNIZED", "UNAVAILABLE", True),
        (p11e.ObjectHandleInvalid(), "CKR_OBJECT_HANDLE_INVALID", "UNAVAILABLE", True),
        (p11e.KeyHandleInvalid(), "CKR_KEY_HANDLE_INVALID", "UNAVAILABLE", True),
        (p11e.GeneralError(), "CKR_GENERAL_ERROR", "UNAVAILABLE", True),
        (pkcs11.PKCS11Error("Initialisation error (not initialized). Should never see this."),
         "CKR_CRYPTOKI_NOT_INITIALIZED", "UNAVAILABLE", True),
        (p11e.DataLenRange(), "CKR_DATA_LEN_RANGE", "INVALID_ARGUMENT", False),
        (p11e.DataInvalid(), "CKR_DATA_INVALID", "INVALID_ARGUMENT", False),
        (p11e.EncryptedDataInvalid(), "CKR_ENCRYPTED_DATA_INVALID", "INVALID_ARGUMENT", False),
        (p11e.EncryptedDataLenRange(), "CKR_ENCRYPTED_DATA_LEN_RANGE", "INVALID_ARGUMENT",
         False),
        (p11e.MechanismInvalid(), "CKR_MECHANISM_INVALID", "FAILED_PRECONDITION", False),
        (p11e.KeyTypeInconsistent(), "CKR_KEY_TYPE_INCONSISTENT", "FAILED_PRECONDITION", False),
        (pkcs11.PKCS11Error("Unmapped error code 0x68"), "CKR_KEY_FUNCTION_NOT_PERMITTED",
         "FAILED_PRECONDITION", False),
        (p11e.PinIncorrect(), "CKR_PIN_INCORRECT", "FAILED_PRECONDITION", False),
        (p11e.SessionCount(), "CKR_SESSION_COUNT", "RESOURCE_EXHAUSTED", False),
        (p11e.SignatureInvalid(), "CKR_SIGNATURE_INVALID", "INTERNAL", False),
        (pkcs11.PKCS11Error("Unmapped error code 0x80000042"), "CKR_VENDOR_DEFINED+0x42",
         "INTERNAL", False),
        (p11e.NoSuchKey("No key matching {...}"), None, "INTERNAL", False),
        (RuntimeError("secret 1234 inside"), None, "INTERNAL", False),
    ],
)
def test_classify(exc: BaseException, ckr: str | None, code: str, fault: bool) -> None:
    assert ckr_name(exc) == ckr
    error = classify(exc, context="sign")
    assert error.code == getattr(grpc.StatusCode, code)
    assert error.hsm_fault is fault
    assert error.ckr == ckr
    assert error.message.startswith("sign failed")
    # Foreign exception text is never copied into the message.
    assert "1234" not in error.message and "{" not in error.message


def test_hsm_error_pickles_and_reprs() -> None:
    error = HsmError(grpc.StatusCode.UNAVAILABLE, "sign failed: CKR_DEVICE_ERROR",
                     ckr="CKR_DEVICE_ERROR", hsm_fault=True)
    copy = pickle.loads(pickle.dumps(error))  # noqa: S301
    assert (copy.code, copy.message, copy.ckr, copy.hsm_fault) == (
        error.code, error.message, error.ckr, error.hsm_fault)
    assert "UNAVAILABLE" in repr(error) and str(error) == error.message
    assert classify(error) is error


# -- on a real token --------------------------------------------------------------------


@pytest.fixture(scope="module")
def token(softhsm: SoftHsmToken) -> Iterator[Token]:
    with Token(softhsm.uri(), sessions=2) as tok:
        yield tok


@pytest.fixture(scope="module")
def keys(token: Token) -> dict[str, KeyInfo]:
    kinds: tuple[admin.KeyKind, ...] = ("p256", "rsa2048", "ed25519")
    return {kind: admin.generate_key(token, kind, f"err-{kind}") for kind in kinds}


@pytest.fixture
def clean(token: Token) -> Iterator[Token]:
    """The module's token, healthy again after the test (faults are injected)."""
    yield token
    token.fault_injector = None
    if not token.healthy:
        token.recover()
    assert token.healthy


def test_token_without_eddsa(softhsm: SoftHsmToken, keys: dict[str, KeyInfo]) -> None:
    # SoftHSM2 has CKM_EDDSA; the allow-list simulates a token that does not.
    everything_but_eddsa = [m for m in Mechanism if m != Mechanism.EDDSA]
    with Token(softhsm.uri(), sessions=1, mechanism_allowlist=everything_but_eddsa) as tok:
        assert int(Mechanism.EDDSA) not in tok.mechanisms
        ed = tok.resolve_key(ski=keys["ed25519"].ski)
        assert ed.algorithms == ()  # nothing to advertise
        with pytest.raises(HsmError) as info:
            tok.run(Job.sign(ed, pb.ED25519, b"hello"))
        assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "this token has no CKM_EDDSA" in info.value.message
        # Other keys are unaffected; the token is healthy.
        signature = tok.run(Job.sign(keys["p256"], pb.ECDSA_SHA256, DIGEST))
        verify_signature(keys["p256"].spki, "ECDSA_SHA256", DIGEST, signature)
        assert tok.healthy


def test_token_without_rsa_x509(softhsm: SoftHsmToken, keys: dict[str, KeyInfo]) -> None:
    allowed = [m for m in Mechanism if m not in (Mechanism.RSA_X_509, Mechanism.RSA_PKCS_PSS)]
    with Token(softhsm.uri(), sessions=1, mechanism_allowlist=allowed) as tok:
        rsa_key = tok.resolve_key(ski=keys["rsa2048"].ski)
        assert rsa_key.decrypt_modes == (pb.DECRYPT_MODE_PKCS1V15,)
        assert pb.RSA_PSS_SHA256 not in rsa_key.algorithms
        assert pb.RSA_PKCS1V15_SHA256 in rsa_key.algorithms
        results = tok.submit([
            Job.decrypt(rsa_key, pb.DECRYPT_MODE_RAW, b"\x00" * 256),
            Job.sign(rsa_key, pb.RSA_PSS_SHA256, DIGEST),
        ]).result(30)
        for result, mechanism in zip(results, ("CKM_RSA_X_509", "CKM_RSA_PKCS_PSS"),
                                     strict=True):
            assert isinstance(result, HsmError)
            assert result.code == grpc.StatusCode.FAILED_PRECONDITION
            assert f"this token has no {mechanism}" in result.message


@pytest.mark.parametrize(
    ("exc", "ckr"),
    [
        (p11e.DeviceError(), "CKR_DEVICE_ERROR"),
        (p11e.SessionHandleInvalid(), "CKR_SESSION_HANDLE_INVALID"),
        (p11e.UserNotLoggedIn(), "CKR_USER_NOT_LOGGED_IN"),
        (p11e.DeviceRemoved(), "CKR_DEVICE_REMOVED"),
    ],
)
def test_injected_fault_marks_token_unhealthy(clean: Token, keys: dict[str, KeyInfo],
                                              exc: Exception, ckr: str) -> None:
    token = clean
    seen: list[HsmError] = []
    token.on_fault = seen.append

    def injector(point: str) -> None:
        if point == "sign":
            raise exc

    token.fault_injector = injector
    try:
        with pytest.raises(HsmError) as info:
            token.run(Job.sign(keys["p256"], pb.ECDSA_SHA256, DIGEST))
    finally:
        token.fault_injector = None
        token.on_fault = None
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert info.value.hsm_fault and info.value.ckr == ckr
    assert not token.healthy
    assert token.last_fault is not None and token.last_fault.ckr == ckr
    assert [e.ckr for e in seen] == [ckr]
    token.recover()
    assert token.healthy and token.last_fault is None
    signature = token.run(Job.sign(keys["p256"], pb.ECDSA_SHA256, DIGEST))
    verify_signature(keys["p256"].spki, "ECDSA_SHA256", DIGEST, signature)


def test_general_error_with_healthy_session_is_not_a_fault(
    clean: Token, keys: dict[str, KeyInfo]
) -> None:
    token = clean

    def injector(point: str) -> None:
        if point == "sign":
            raise p11e.GeneralError()

    token.fault_injector = injector
    with pytest.raises(HsmError) as info:
        token.run(Job.sign(keys["rsa2048"], pb.RSA_PKCS1V15_SHA256, DIGEST))
    assert info.value.code == grpc.StatusCode.INTERNAL
    assert info.value.ckr == "CKR_GENERAL_ERROR" and not info.value.hsm_fault
    assert token.healthy


def test_general_error_with_failing_probe_is_a_fault(clean: Token,
                                                     keys: dict[str, KeyInfo]) -> None:
    token = clean

    def injector(point: str) -> None:
        if point == "sign":
            raise p11e.GeneralError()
        if point == "probe":
            raise p11e.DeviceError()

    token.fault_injector = injector
    with pytest.raises(HsmError) as info:
        token.run(Job.sign(keys["rsa2048"], pb.RSA_PKCS1V15_SHA256, DIGEST))
    assert info.value.code == grpc.StatusCode.UNAVAILABLE and info.value.hsm_fault
    assert "probe failed" in info.value.message and "CKR_DEVICE_ERROR" in info.value.message
    assert not token.healthy


def test_real_logout_is_detected_and_recovered(clean: Token, keys: dict[str, KeyInfo]) -> None:
    """Log out behind the token's back: private keys vanish; the next job reports a
    fault (SoftHSM2 says CKR_OBJECT_HANDLE_INVALID), and recover() logs in again."""
    token = clean
    token.module.logout(token._sessions[0].handle, token.slot_id)
    with pytest.raises(HsmError) as info:
        token.run(Job.sign(keys["p256"], pb.ECDSA_SHA256, DIGEST))
    assert info.value.code == grpc.StatusCode.UNAVAILABLE and info.value.hsm_fault
    assert not token.healthy
    token.recover()
    assert token.healthy
    served = token.keys()
    assert {key.ski for key in served} >= {key.ski for key in keys.values()}
    token.run(Job.sign(keys["p256"], pb.ECDSA_SHA256, DIGEST))


def test_fault_rest_of_batch_still_answered(clean: Token, keys: dict[str, KeyInfo]) -> None:
    token = clean
    calls = 0

    def injector(point: str) -> None:
        nonlocal calls
        if point == "sign":
            calls += 1
            if calls == 2:
                raise p11e.DeviceError()

    token.fault_injector = injector
    results = token.submit([Job.sign(keys["p256"], pb.ECDSA_SHA256, DIGEST)] * 3).result(30)
    assert isinstance(results[0], bytes) and isinstance(results[2], bytes)
    assert isinstance(results[1], HsmError) and results[1].ckr == "CKR_DEVICE_ERROR"


def test_slow_hsm_and_close_without_drain(softhsm: SoftHsmToken,
                                          keys: dict[str, KeyInfo]) -> None:
    tok = Token(softhsm.uri(), sessions=1)
    tok.fault_injector = lambda point: time.sleep(0.2) if point == "sign" else None
    key = tok.resolve_key(ski=keys["p256"].ski)
    running = tok.submit([Job.sign(key, pb.ECDSA_SHA256, DIGEST)])
    time.sleep(0.05)
    queued = tok.submit([Job.sign(key, pb.ECDSA_SHA256, DIGEST)])
    tok.close(drain=False)
    assert isinstance(running.result(10)[0], bytes)
    result = queued.result(10)[0]
    assert isinstance(result, HsmError) and result.code == grpc.StatusCode.UNAVAILABLE
    assert not tok.healthy
    tok.close()  # idempotent
    with pytest.raises(HsmError):
        tok.call(lambda session: None)
