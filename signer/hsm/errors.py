"""Errors of the HSM layer, and the mapping from PKCS#11 failures to gRPC status codes.

Every failure that leaves ``signer.hsm`` is an :class:`HsmError` carrying one of the
status codes of the error table in ``protos/keyward/signer/v1/signer.proto``, so the
gRPC layer can pass it on without interpreting it again.

python-pkcs11 turns most ``CKR_*`` return values into one exception class each, but
not all of them: ``CKR_CRYPTOKI_NOT_INITIALIZED`` and a few others become a plain
``PKCS11Error`` with a fixed message, and return values it does not know (for
example ``CKR_KEY_FUNCTION_NOT_PERMITTED``) become ``PKCS11Error("Unmapped error code
0x68")``. :func:`ckr_name` recovers the ``CKR_*`` name in all three cases so metrics
can count failures by their real PKCS#11 name.

Messages never contain key material, PINs or caller input: they are built here from
the CKR name and a fixed description, never from ``str()`` of a foreign exception
(which might one day echo a template or a buffer).
"""

from __future__ import annotations

import re
from typing import Final

import grpc
import pkcs11.exceptions as p11e

__all__ = [
    "CKR_CODES",
    "HsmError",
    "ckr_name",
    "ckr_text",
    "classify",
    "is_ambiguous",
]


class HsmError(Exception):
    """A failed HSM-layer operation.

    ``code`` is the gRPC status code the caller should see, ``message`` a human
    description free of secrets, ``ckr`` the PKCS#11 return value name when the
    failure came from the module (``"CKR_DEVICE_ERROR"``), and ``hsm_fault`` tells
    the service that the HSM itself (session, login, device) is in trouble, so it
    should stop serving and recover rather than blame the request.
    """

    code: grpc.StatusCode
    message: str
    ckr: str | None
    hsm_fault: bool

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        ckr: str | None = None,
        hsm_fault: bool = False,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.ckr = ckr
        self.hsm_fault = hsm_fault

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        extra = f", ckr={self.ckr!r}" if self.ckr else ""
        fault = ", hsm_fault=True" if self.hsm_fault else ""
        return f"HsmError({self.code.name}, {self.message!r}{extra}{fault})"

    def __reduce__(self) -> tuple[object, ...]:
        # Exceptions with keyword-only constructor arguments do not pickle by default;
        # results may cross a process boundary in tests or tooling.
        return (_rebuild, (self.code, self.message, self.ckr, self.hsm_fault))


def _rebuild(code: grpc.StatusCode, message: str, ckr: str | None, hsm_fault: bool) -> HsmError:
    return HsmError(code, message, ckr=ckr, hsm_fault=hsm_fault)


# PKCS#11 v2.40 / 3.0 return values (pkcs11t.h). python-pkcs11 does not export them,
# and we need them to name "Unmapped error code 0x..." failures.
CKR_CODES: Final[dict[int, str]] = {
    0x000: "CKR_OK",
    0x001: "CKR_CANCEL",
    0x002: "CKR_HOST_MEMORY",
    0x003: "CKR_SLOT_ID_INVALID",
    0x005: "CKR_GENERAL_ERROR",
    0x006: "CKR_FUNCTION_FAILED",
    0x007: "CKR_ARGUMENTS_BAD",
    0x008: "CKR_NO_EVENT",
    0x009: "CKR_NEED_TO_CREATE_THREADS",
    0x00A: "CKR_CANT_LOCK",
    0x010: "CKR_ATTRIBUTE_READ_ONLY",
    0x011: "CKR_ATTRIBUTE_SENSITIVE",
    0x012: "CKR_ATTRIBUTE_TYPE_INVALID",
    0x013: "CKR_ATTRIBUTE_VALUE_INVALID",
    0x01B: "CKR_ACTION_PROHIBITED",
    0x020: "CKR_DATA_INVALID",
    0x021: "CKR_DATA_LEN_RANGE",
    0x030: "CKR_DEVICE_ERROR",
    0x031: "CKR_DEVICE_MEMORY",
    0x032: "CKR_DEVICE_REMOVED",
    0x040: "CKR_ENCRYPTED_DATA_INVALID",
    0x041: "CKR_ENCRYPTED_DATA_LEN_RANGE",
    0x042: "CKR_AEAD_DECRYPT_FAILED",
    0x050: "CKR_FUNCTION_CANCELED",
    0x051: "CKR_FUNCTION_NOT_PARALLEL",
    0x054: "CKR_FUNCTION_NOT_SUPPORTED",
    0x060: "CKR_KEY_HANDLE_INVALID",
    0x062: "CKR_KEY_SIZE_RANGE",
    0x063: "CKR_KEY_TYPE_INCONSISTENT",
    0x064: "CKR_KEY_NOT_NEEDED",
    0x065: "CKR_KEY_CHANGED",
    0x066: "CKR_KEY_NEEDED",
    0x067: "CKR_KEY_INDIGESTIBLE",
    0x068: "CKR_KEY_FUNCTION_NOT_PERMITTED",
    0x069: "CKR_KEY_NOT_WRAPPABLE",
    0x06A: "CKR_KEY_UNEXTRACTABLE",
    0x070: "CKR_MECHANISM_INVALID",
    0x071: "CKR_MECHANISM_PARAM_INVALID",
    0x082: "CKR_OBJECT_HANDLE_INVALID",
    0x090: "CKR_OPERATION_ACTIVE",
    0x091: "CKR_OPERATION_NOT_INITIALIZED",
    0x0A0: "CKR_PIN_INCORRECT",
    0x0A1: "CKR_PIN_INVALID",
    0x0A2: "CKR_PIN_LEN_RANGE",
    0x0A3: "CKR_PIN_EXPIRED",
    0x0A4: "CKR_PIN_LOCKED",
    0x0B0: "CKR_SESSION_CLOSED",
    0x0B1: "CKR_SESSION_COUNT",
    0x0B3: "CKR_SESSION_HANDLE_INVALID",
    0x0B4: "CKR_SESSION_PARALLEL_NOT_SUPPORTED",
    0x0B5: "CKR_SESSION_READ_ONLY",
    0x0B6: "CKR_SESSION_EXISTS",
    0x0B7: "CKR_SESSION_READ_ONLY_EXISTS",
    0x0B8: "CKR_SESSION_READ_WRITE_SO_EXISTS",
    0x0C0: "CKR_SIGNATURE_INVALID",
    0x0C1: "CKR_SIGNATURE_LEN_RANGE",
    0x0D0: "CKR_TEMPLATE_INCOMPLETE",
    0x0D1: "CKR_TEMPLATE_INCONSISTENT",
    0x0E0: "CKR_TOKEN_NOT_PRESENT",
    0x0E1: "CKR_TOKEN_NOT_RECOGNIZED",
    0x0E2: "CKR_TOKEN_WRITE_PROTECTED",
    0x0F0: "CKR_UNWRAPPING_KEY_HANDLE_INVALID",
    0x0F1: "CKR_UNWRAPPING_KEY_SIZE_RANGE",
    0x0F2: "CKR_UNWRAPPING_KEY_TYPE_INCONSISTENT",
    0x100: "CKR_USER_ALREADY_LOGGED_IN",
    0x101: "CKR_USER_NOT_LOGGED_IN",
    0x102: "CKR_USER_PIN_NOT_INITIALIZED",
    0x103: "CKR_USER_TYPE_INVALID",
    0x104: "CKR_USER_ANOTHER_ALREADY_LOGGED_IN",
    0x105: "CKR_USER_TOO_MANY_TYPES",
    0x110: "CKR_WRAPPED_KEY_INVALID",
    0x112: "CKR_WRAPPED_KEY_LEN_RANGE",
    0x113: "CKR_WRAPPING_KEY_HANDLE_INVALID",
    0x114: "CKR_WRAPPING_KEY_SIZE_RANGE",
    0x115: "CKR_WRAPPING_KEY_TYPE_INCONSISTENT",
    0x120: "CKR_RANDOM_SEED_NOT_SUPPORTED",
    0x121: "CKR_RANDOM_NO_RNG",
    0x130: "CKR_DOMAIN_PARAMS_INVALID",
    0x140: "CKR_CURVE_NOT_SUPPORTED",
    0x150: "CKR_BUFFER_TOO_SMALL",
    0x160: "CKR_SAVED_STATE_INVALID",
    0x170: "CKR_INFORMATION_SENSITIVE",
    0x180: "CKR_STATE_UNSAVEABLE",
    0x190: "CKR_CRYPTOKI_NOT_INITIALIZED",
    0x191: "CKR_CRYPTOKI_ALREADY_INITIALIZED",
    0x1A0: "CKR_MUTEX_BAD",
    0x1A1: "CKR_MUTEX_NOT_LOCKED",
    0x1B0: "CKR_NEW_PIN_MODE",
    0x1B1: "CKR_NEXT_OTP",
    0x1B5: "CKR_EXCEEDED_MAX_ITERATIONS",
    0x1B6: "CKR_FIPS_SELF_TEST_FAILED",
    0x1B7: "CKR_LIBRARY_LOAD_FAILED",
    0x1B8: "CKR_PIN_TOO_WEAK",
    0x1B9: "CKR_PUBLIC_KEY_INVALID",
    0x200: "CKR_FUNCTION_REJECTED",
}
_CKR_VENDOR_DEFINED: Final = 0x80000000


def ckr_text(rv: int) -> str:
    """The ``CKR_*`` name of a return value (``CKR_VENDOR_DEFINED+0x...`` or hex when unknown)."""
    name = CKR_CODES.get(rv)
    if name is not None:
        return name
    if rv & _CKR_VENDOR_DEFINED:
        return f"CKR_VENDOR_DEFINED+0x{rv - _CKR_VENDOR_DEFINED:x}"
    return f"CKR_0x{rv:x}"


# python-pkcs11 exception class -> CKR name. Classes without a CKR of their own
# (NoSuchKey, NoSuchToken, MultipleObjectsReturned, ...) are raised by the library
# itself, not by the module, and are left out on purpose.
_CLASS_TO_CKR: Final[dict[type[BaseException], str]] = {
    p11e.AnotherUserAlreadyLoggedIn: "CKR_USER_ANOTHER_ALREADY_LOGGED_IN",
    p11e.AttributeTypeInvalid: "CKR_ATTRIBUTE_TYPE_INVALID",
    p11e.AttributeValueInvalid: "CKR_ATTRIBUTE_VALUE_INVALID",
    p11e.AttributeReadOnly: "CKR_ATTRIBUTE_READ_ONLY",
    p11e.AttributeSensitive: "CKR_ATTRIBUTE_SENSITIVE",
    p11e.ArgumentsBad: "CKR_ARGUMENTS_BAD",
    p11e.DataInvalid: "CKR_DATA_INVALID",
    p11e.DataLenRange: "CKR_DATA_LEN_RANGE",
    p11e.DomainParamsInvalid: "CKR_DOMAIN_PARAMS_INVALID",
    p11e.DeviceError: "CKR_DEVICE_ERROR",
    p11e.DeviceMemory: "CKR_DEVICE_MEMORY",
    p11e.DeviceRemoved: "CKR_DEVICE_REMOVED",
    p11e.EncryptedDataInvalid: "CKR_ENCRYPTED_DATA_INVALID",
    p11e.EncryptedDataLenRange: "CKR_ENCRYPTED_DATA_LEN_RANGE",
    p11e.ExceededMaxIterations: "CKR_EXCEEDED_MAX_ITERATIONS",
    p11e.FunctionCancelled: "CKR_FUNCTION_CANCELED",
    p11e.FunctionFailed: "CKR_FUNCTION_FAILED",
    p11e.FunctionRejected: "CKR_FUNCTION_REJECTED",
    p11e.FunctionNotSupported: "CKR_FUNCTION_NOT_SUPPORTED",
    p11e.KeyHandleInvalid: "CKR_KEY_HANDLE_INVALID",
    p11e.KeyIndigestible: "CKR_KEY_INDIGESTIBLE",
    p11e.KeyNeeded: "CKR_KEY_NEEDED",
    p11e.KeyNotNeeded: "CKR_KEY_NOT_NEEDED",
    p11e.KeyNotWrappable: "CKR_KEY_NOT_WRAPPABLE",
    p11e.KeySizeRange: "CKR_KEY_SIZE_RANGE",
    p11e.KeyTypeInconsistent: "CKR_KEY_TYPE_INCONSISTENT",
    p11e.KeyUnextractable: "CKR_KEY_UNEXTRACTABLE",
    p11e.GeneralError: "CKR_GENERAL_ERROR",
    p11e.HostMemory: "CKR_HOST_MEMORY",
    p11e.MechanismInvalid: "CKR_MECHANISM_INVALID",
    p11e.MechanismParamInvalid: "CKR_MECHANISM_PARAM_INVALID",
    p11e.NoEvent: "CKR_NO_EVENT",
    p11e.ObjectHandleInvalid: "CKR_OBJECT_HANDLE_INVALID",
    p11e.OperationActive: "CKR_OPERATION_ACTIVE",
    p11e.OperationNotInitialized: "CKR_OPERATION_NOT_INITIALIZED",
    p11e.PinExpired: "CKR_PIN_EXPIRED",
    p11e.PinIncorrect: "CKR_PIN_INCORRECT",
    p11e.PinInvalid: "CKR_PIN_INVALID",
    p11e.PinLenRange: "CKR_PIN_LEN_RANGE",
    p11e.PinLocked: "CKR_PIN_LOCKED",
    p11e.PinTooWeak: "CKR_PIN_TOO_WEAK",
    p11e.PublicKeyInvalid: "CKR_PUBLIC_KEY_INVALID",
    p11e.RandomNoRNG: "CKR_RANDOM_NO_RNG",
    p11e.RandomSeedNotSupported: "CKR_RANDOM_SEED_NOT_SUPPORTED",
    p11e.SessionClosed: "CKR_SESSION_CLOSED",
    p11e.SessionCount: "CKR_SESSION_COUNT",
    p11e.SessionExists: "CKR_SESSION_EXISTS",
    p11e.SessionHandleInvalid: "CKR_SESSION_HANDLE_INVALID",
    p11e.SessionReadOnly: "CKR_SESSION_READ_ONLY",
    p11e.SessionReadOnlyExists: "CKR_SESSION_READ_ONLY_EXISTS",
    p11e.SessionReadWriteSOExists: "CKR_SESSION_READ_WRITE_SO_EXISTS",
    p11e.SignatureLenRange: "CKR_SIGNATURE_LEN_RANGE",
    p11e.SignatureInvalid: "CKR_SIGNATURE_INVALID",
    p11e.SlotIDInvalid: "CKR_SLOT_ID_INVALID",
    p11e.TemplateIncomplete: "CKR_TEMPLATE_INCOMPLETE",
    p11e.TemplateInconsistent: "CKR_TEMPLATE_INCONSISTENT",
    p11e.TokenNotPresent: "CKR_TOKEN_NOT_PRESENT",
    p11e.TokenNotRecognised: "CKR_TOKEN_NOT_RECOGNIZED",
    p11e.TokenWriteProtected: "CKR_TOKEN_WRITE_PROTECTED",
    p11e.UnwrappingKeyHandleInvalid: "CKR_UNWRAPPING_KEY_HANDLE_INVALID",
    p11e.UnwrappingKeySizeRange: "CKR_UNWRAPPING_KEY_SIZE_RANGE",
    p11e.UnwrappingKeyTypeInconsistent: "CKR_UNWRAPPING_KEY_TYPE_INCONSISTENT",
    p11e.UserAlreadyLoggedIn: "CKR_USER_ALREADY_LOGGED_IN",
    p11e.UserNotLoggedIn: "CKR_USER_NOT_LOGGED_IN",
    p11e.UserPinNotInitialized: "CKR_USER_PIN_NOT_INITIALIZED",
    p11e.UserTooManyTypes: "CKR_USER_TOO_MANY_TYPES",
    p11e.WrappedKeyInvalid: "CKR_WRAPPED_KEY_INVALID",
    p11e.WrappedKeyLenRange: "CKR_WRAPPED_KEY_LEN_RANGE",
    p11e.WrappingKeyHandleInvalid: "CKR_WRAPPING_KEY_HANDLE_INVALID",
    p11e.WrappingKeySizeRange: "CKR_WRAPPING_KEY_SIZE_RANGE",
    p11e.WrappingKeyTypeInconsistent: "CKR_WRAPPING_KEY_TYPE_INCONSISTENT",
}

# The fixed messages python-pkcs11 0.10 gives return values it has no class for
# (_pkcs11.pxd map_rv_to_error).
_MESSAGE_TO_CKR: Final[tuple[tuple[str, str], ...]] = (
    ("(not initialized)", "CKR_CRYPTOKI_NOT_INITIALIZED"),
    ("(already initialized)", "CKR_CRYPTOKI_ALREADY_INITIALIZED"),
    ("Buffer was too small", "CKR_BUFFER_TOO_SMALL"),
    ("Parallel not supported", "CKR_SESSION_PARALLEL_NOT_SUPPORTED"),
    ("User type invalid", "CKR_USER_TYPE_INVALID"),
)
_UNMAPPED_RE: Final = re.compile(r"Unmapped error code (0x[0-9a-fA-F]+)")


def ckr_name(exc: BaseException) -> str | None:
    """The ``CKR_*`` name behind a python-pkcs11 exception, or None if it has none."""
    for cls in type(exc).__mro__:
        name = _CLASS_TO_CKR.get(cls)
        if name is not None:
            return name
    if not isinstance(exc, p11e.PKCS11Error):
        return None
    text = str(exc)
    match = _UNMAPPED_RE.search(text)
    if match is not None:
        return ckr_text(int(match.group(1), 16))
    for fragment, name in _MESSAGE_TO_CKR:
        if fragment in text:
            return name
    return None


# The HSM itself is unusable: the session, the login, the token or the device is
# gone. Retrying elsewhere is safe; this signer must recover (reopen, log in again)
# before it can serve, so these set hsm_fault.
_FAULTS: Final[frozenset[str]] = frozenset(
    {
        "CKR_SESSION_HANDLE_INVALID",
        "CKR_SESSION_CLOSED",
        "CKR_USER_NOT_LOGGED_IN",
        "CKR_DEVICE_ERROR",
        "CKR_DEVICE_REMOVED",
        "CKR_DEVICE_MEMORY",
        "CKR_TOKEN_NOT_PRESENT",
        "CKR_TOKEN_NOT_RECOGNIZED",
        "CKR_OBJECT_HANDLE_INVALID",
        "CKR_KEY_HANDLE_INVALID",
        "CKR_GENERAL_ERROR",
        "CKR_CRYPTOKI_NOT_INITIALIZED",
        "CKR_SLOT_ID_INVALID",
        "CKR_FIPS_SELF_TEST_FAILED",
    }
)
# The request is wrong (length, value, padding).
_INVALID: Final[frozenset[str]] = frozenset(
    {
        "CKR_DATA_LEN_RANGE",
        "CKR_DATA_INVALID",
        "CKR_ENCRYPTED_DATA_INVALID",
        "CKR_ENCRYPTED_DATA_LEN_RANGE",
    }
)
# The key exists but this token cannot or may not use it that way.
_PRECONDITION: Final[frozenset[str]] = frozenset(
    {
        "CKR_MECHANISM_INVALID",
        "CKR_MECHANISM_PARAM_INVALID",
        "CKR_KEY_TYPE_INCONSISTENT",
        "CKR_KEY_FUNCTION_NOT_PERMITTED",
        "CKR_KEY_SIZE_RANGE",
        "CKR_CURVE_NOT_SUPPORTED",
        "CKR_FUNCTION_NOT_SUPPORTED",
        # Login problems are configuration problems. They must never be retried
        # automatically: every wrong-PIN attempt runs down the token's retry
        # counter, and a locked user PIN needs the security officer.
        "CKR_PIN_INCORRECT",
        "CKR_PIN_INVALID",
        "CKR_PIN_LEN_RANGE",
        "CKR_PIN_EXPIRED",
        "CKR_PIN_LOCKED",
        "CKR_USER_PIN_NOT_INITIALIZED",
    }
)
# Transient overload inside the module: retry elsewhere, but the HSM is not broken.
_EXHAUSTED: Final[frozenset[str]] = frozenset({"CKR_SESSION_COUNT", "CKR_HOST_MEMORY"})

_DESCRIPTIONS: Final[dict[str, str]] = {
    "CKR_DATA_LEN_RANGE": "input has the wrong length for this key and algorithm",
    "CKR_DATA_INVALID": "input is not valid for this key and algorithm",
    "CKR_ENCRYPTED_DATA_INVALID": "ciphertext is not valid for this key (bad padding?)",
    "CKR_ENCRYPTED_DATA_LEN_RANGE": "ciphertext has the wrong length for this key",
    "CKR_MECHANISM_INVALID": "the token does not support this mechanism",
    "CKR_KEY_TYPE_INCONSISTENT": "the key type does not fit the mechanism",
    "CKR_KEY_FUNCTION_NOT_PERMITTED": "the key's attributes do not permit this operation",
    "CKR_PIN_INCORRECT": "login failed: wrong PIN (not retried, to spare the PIN counter)",
    "CKR_PIN_LOCKED": "login failed: the user PIN is locked",
    "CKR_USER_NOT_LOGGED_IN": "the token session is no longer logged in",
    "CKR_DEVICE_REMOVED": "the token was removed",
    "CKR_TOKEN_NOT_PRESENT": "the token is not present",
    "CKR_CRYPTOKI_NOT_INITIALIZED": "the PKCS#11 module is not initialised",
}


def classify(exc: BaseException, *, context: str = "HSM call") -> HsmError:
    """Turn any exception raised around an HSM call into an :class:`HsmError`.

    ``context`` names the operation for the message ("sign", "decrypt", "login");
    the message never includes ``str(exc)`` of a foreign exception.
    """
    if isinstance(exc, HsmError):
        return exc
    ckr = ckr_name(exc)
    if ckr is None:
        if isinstance(exc, p11e.PKCS11Error):
            return HsmError(
                grpc.StatusCode.INTERNAL,
                f"{context} failed: unexpected PKCS#11 library error ({type(exc).__name__})",
            )
        return HsmError(
            grpc.StatusCode.INTERNAL, f"{context} failed: internal error ({type(exc).__name__})"
        )
    detail = _DESCRIPTIONS.get(ckr)
    message = f"{context} failed: {ckr}" + (f" ({detail})" if detail else "")
    if ckr in _FAULTS:
        return HsmError(grpc.StatusCode.UNAVAILABLE, message, ckr=ckr, hsm_fault=True)
    if ckr in _INVALID:
        return HsmError(grpc.StatusCode.INVALID_ARGUMENT, message, ckr=ckr)
    if ckr in _PRECONDITION:
        return HsmError(grpc.StatusCode.FAILED_PRECONDITION, message, ckr=ckr)
    if ckr in _EXHAUSTED:
        return HsmError(grpc.StatusCode.RESOURCE_EXHAUSTED, message, ckr=ckr)
    return HsmError(grpc.StatusCode.INTERNAL, message, ckr=ckr)


# Return values a module uses for "something went wrong" without saying what.
# SoftHSM2 2.6 answers CKR_GENERAL_ERROR for a bad PKCS#1 v1.5 padding, a ciphertext
# of the wrong length and a PSS input of the wrong length alike (measured), so a
# general error after a request-dependent operation does not prove the HSM broken.
_AMBIGUOUS: Final[frozenset[str]] = frozenset({"CKR_GENERAL_ERROR", "CKR_FUNCTION_FAILED"})


def is_ambiguous(error: HsmError) -> bool:
    """True when the CKR value cannot tell a broken HSM from a bad request.

    The pool then probes the session (C_GetSessionInfo) before deciding; see
    ``signer.hsm.pool``.
    """
    return error.ckr in _AMBIGUOUS
