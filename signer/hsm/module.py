"""Loading a PKCS#11 module so that several threads may use it at once.

Why this module exists
----------------------
python-pkcs11 0.10 initialises a module with ``C_Initialize(NULL)``. A NULL argument
tells the module that the application will not call it from several threads at
once, and SoftHSM2 then runs without its internal locks. Measured on this code
base: two threads signing at the same time, each on its own session, crashed the
process in 8 of 9 runs. Keyward runs one worker thread per session, so it must
initialise the module with ``CKF_OS_LOCKING_OK``.

python-pkcs11 offers no way to pass ``CK_C_INITIALIZE_ARGS``, so we do this:

1. ``pkcs11.lib(path)`` loads the library (``dlopen``), resolves
   ``C_GetFunctionList`` and calls ``C_Initialize(NULL)``;
2. ``lib.finalize()`` undoes that initialisation (``C_Finalize``);
3. through ``ctypes.CDLL(path)`` -- ``dlopen`` of the same file returns the same
   loaded copy, so it is the same module state -- we call ``C_GetFunctionList`` and
   then *the function list's* ``C_Initialize`` with ``{CreateMutex, DestroyMutex,
   LockMutex, UnlockMutex = NULL, flags = CKF_OS_LOCKING_OK, pReserved = NULL}``.
   We go through the function list rather than the exported ``C_Initialize`` symbol
   because some vendor modules export only ``C_GetFunctionList``.

python-pkcs11's ``lib`` object keeps working afterwards (``get_slots``,
``get_token``, ``Token.open`` ...): it only holds function pointers. Two details:

* ``lib.initialized`` is False after step 2, and ``pkcs11.lib(path)`` (which caches
  the object per path) would call ``C_Initialize(NULL)`` again the next time anybody
  asked for it. So we keep our own handle, :class:`Pkcs11Module`, reference-counted
  per module file in this process: every user calls :func:`open_module` and
  :meth:`Pkcs11Module.release`, never ``pkcs11.lib`` directly.
* Because python-pkcs11 believes the module is finalised, it will never call
  ``C_Finalize`` itself (its destructor only finalises when ``initialized`` is
  True); the last :meth:`Pkcs11Module.release` does, through ctypes.

Login is also done here, through the function list's ``C_Login``/``C_Logout``, for
two reasons: python-pkcs11 can only log in while opening a session and logs out
whenever that session is closed, and login state is shared by all sessions of the
application on a token, so two users of one token in this process must not log each
other out. :meth:`Pkcs11Module.login` counts logins per slot; the first one calls
``C_Login``, the last :meth:`Pkcs11Module.logout` calls ``C_Logout``. The PIN is
copied into a ctypes buffer that is zeroed right after the call.

:meth:`Pkcs11Module.reinitialize` (``C_Finalize`` then the locked ``C_Initialize``)
is the fault-recovery path: it invalidates every session and login of the process,
so callers reopen their sessions and log in again afterwards.

If a module answers ``CKR_CANT_LOCK`` (it cannot use OS locks), we initialise it
with NULL and set :attr:`Pkcs11Module.serialize`: callers must then hold
:attr:`Pkcs11Module.call_lock` around every call. SoftHSM2 does not need this.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import threading
from collections.abc import Iterator
from typing import Any, Final

import grpc
import pkcs11

from signer.hsm.errors import HsmError, ckr_text, classify

__all__ = ["CKF_OS_LOCKING_OK", "Pkcs11Module", "SessionState", "open_module", "opened_module"]

log = logging.getLogger(__name__)

CKF_OS_LOCKING_OK: Final = 0x00000002
CKU_USER: Final = 1
_CKR_OK: Final = 0x0
_CKR_CANT_LOCK: Final = 0x00A
_CKR_CRYPTOKI_NOT_INITIALIZED: Final = 0x190
_CKR_CRYPTOKI_ALREADY_INITIALIZED: Final = 0x191
_CKR_USER_ALREADY_LOGGED_IN: Final = 0x100
_CKR_USER_NOT_LOGGED_IN: Final = 0x101

# CK_STATE values (pkcs11t.h).
CKS_RO_PUBLIC_SESSION: Final = 0
CKS_RO_USER_FUNCTIONS: Final = 1
CKS_RW_PUBLIC_SESSION: Final = 2
CKS_RW_USER_FUNCTIONS: Final = 3
CKS_RW_SO_FUNCTIONS: Final = 4

_CK_RV = ctypes.c_ulong
_CK_ULONG = ctypes.c_ulong


class _CkVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_ubyte), ("minor", ctypes.c_ubyte)]


class _CkCInitializeArgs(ctypes.Structure):
    # Linux/Unix layout: natural alignment (Windows packs PKCS#11 structs to 1).
    _fields_ = [
        ("CreateMutex", ctypes.c_void_p),
        ("DestroyMutex", ctypes.c_void_p),
        ("LockMutex", ctypes.c_void_p),
        ("UnlockMutex", ctypes.c_void_p),
        ("flags", _CK_ULONG),
        ("pReserved", ctypes.c_void_p),
    ]


class _CkSessionInfo(ctypes.Structure):
    _fields_ = [
        ("slotID", _CK_ULONG),
        ("state", _CK_ULONG),
        ("flags", _CK_ULONG),
        ("ulDeviceError", _CK_ULONG),
    ]


_FnInitialize = ctypes.CFUNCTYPE(_CK_RV, ctypes.c_void_p)
_FnFinalize = ctypes.CFUNCTYPE(_CK_RV, ctypes.c_void_p)
_FnGetSessionInfo = ctypes.CFUNCTYPE(_CK_RV, _CK_ULONG, ctypes.POINTER(_CkSessionInfo))
_FnLogin = ctypes.CFUNCTYPE(_CK_RV, _CK_ULONG, _CK_ULONG, ctypes.c_void_p, _CK_ULONG)
_FnLogout = ctypes.CFUNCTYPE(_CK_RV, _CK_ULONG)


class _CkFunctionList(ctypes.Structure):
    # CK_FUNCTION_LIST from pkcs11f.h, in order, up to the last entry we call.
    # Entries we never call are plain pointers.
    _fields_ = [
        ("version", _CkVersion),
        ("C_Initialize", _FnInitialize),
        ("C_Finalize", _FnFinalize),
        ("C_GetInfo", ctypes.c_void_p),
        ("C_GetFunctionList", ctypes.c_void_p),
        ("C_GetSlotList", ctypes.c_void_p),
        ("C_GetSlotInfo", ctypes.c_void_p),
        ("C_GetTokenInfo", ctypes.c_void_p),
        ("C_GetMechanismList", ctypes.c_void_p),
        ("C_GetMechanismInfo", ctypes.c_void_p),
        ("C_InitToken", ctypes.c_void_p),
        ("C_InitPIN", ctypes.c_void_p),
        ("C_SetPIN", ctypes.c_void_p),
        ("C_OpenSession", ctypes.c_void_p),
        ("C_CloseSession", ctypes.c_void_p),
        ("C_CloseAllSessions", ctypes.c_void_p),
        ("C_GetSessionInfo", _FnGetSessionInfo),
        ("C_GetOperationState", ctypes.c_void_p),
        ("C_SetOperationState", ctypes.c_void_p),
        ("C_Login", _FnLogin),
        ("C_Logout", _FnLogout),
    ]


class SessionState:
    """What ``C_GetSessionInfo`` says about a session (used as a health probe)."""

    __slots__ = ("device_error", "flags", "slot_id", "state")

    def __init__(self, slot_id: int, state: int, flags: int, device_error: int) -> None:
        self.slot_id = slot_id
        self.state = state
        self.flags = flags
        self.device_error = device_error

    @property
    def logged_in(self) -> bool:
        return self.state in (CKS_RO_USER_FUNCTIONS, CKS_RW_USER_FUNCTIONS)

    def __repr__(self) -> str:
        return (
            f"SessionState(slot_id={self.slot_id}, state={self.state}, "
            f"flags=0x{self.flags:x}, device_error=0x{self.device_error:x})"
        )


def _module_error(message: str, rv: int | None = None) -> HsmError:
    # Loading/initialising failures are configuration problems (wrong path, wrong
    # architecture, broken module), not transient ones.
    ckr = ckr_text(rv) if rv is not None else None
    text = f"{message}: {ckr}" if ckr else message
    return HsmError(grpc.StatusCode.FAILED_PRECONDITION, text, ckr=ckr)


class Pkcs11Module:
    """One loaded, OS-locking-initialised PKCS#11 module, shared within the process.

    Obtain it with :func:`open_module`; give it back with :meth:`release`.
    """

    path: str
    lib: Any  # pkcs11._pkcs11.lib; typed loosely because its stub is partial
    serialize: bool
    call_lock: contextlib.AbstractContextManager[Any]

    def __init__(self, path: str, requested: str | None = None) -> None:
        # Use open_module(): it shares instances and counts references. ``path`` is
        # the resolved file, ``requested`` the spelling the caller used.
        self.path = path
        self._refs = 0
        self._lock = threading.Lock()
        self._logins: dict[int, int] = {}
        self._foreign_login: set[int] = set()
        self._initialized = False
        self.serialize = False
        self.call_lock = contextlib.nullcontext()
        try:
            self.lib = pkcs11.lib(_python_pkcs11_key(path, requested or path))
        except pkcs11.PKCS11Error as exc:
            # python-pkcs11 says "OS exception while loading <path>: <dlerror>", which
            # is the useful part (file missing, wrong ELF class ...) and has no secrets.
            raise _module_error(f"cannot load PKCS#11 module {path}: {exc}") from None
        try:
            self._cdll = ctypes.CDLL(path)
            get_function_list = self._cdll.C_GetFunctionList
        except (OSError, AttributeError) as exc:
            raise _module_error(
                f"cannot resolve C_GetFunctionList in {path} ({type(exc).__name__})"
            ) from None
        get_function_list.restype = _CK_RV
        get_function_list.argtypes = [ctypes.POINTER(ctypes.POINTER(_CkFunctionList))]
        pointer = ctypes.POINTER(_CkFunctionList)()
        rv = int(get_function_list(ctypes.byref(pointer)))
        if rv != _CKR_OK or not pointer:
            raise _module_error(f"C_GetFunctionList of {path} failed", rv)
        self._functions = pointer.contents
        # Undo python-pkcs11's C_Initialize(NULL) (if this process had it initialised
        # that way; a cached lib object that we finalised earlier reports False).
        if self.lib.initialized:
            self.lib.finalize()
        self._initialize_locked()
        self.manufacturer_id: str = self.lib.manufacturer_id
        self.library_description: str = self.lib.library_description
        self.library_version: tuple[int, int] = tuple(self.lib.library_version)
        self.cryptoki_version: tuple[int, int] = (
            self._functions.version.major,
            self._functions.version.minor,
        )

    # -- initialisation ---------------------------------------------------------------

    def _initialize_locked(self) -> None:
        args = _CkCInitializeArgs(None, None, None, None, CKF_OS_LOCKING_OK, None)
        rv = int(self._functions.C_Initialize(ctypes.cast(ctypes.byref(args), ctypes.c_void_p)))
        if rv == _CKR_CANT_LOCK:
            log.warning(
                "PKCS#11 module %s cannot use OS locking; serialising every call to it",
                self.path,
            )
            rv = int(self._functions.C_Initialize(None))
            self.serialize = True
            self.call_lock = threading.Lock()
        if rv == _CKR_CRYPTOKI_ALREADY_INITIALIZED:
            # Someone else in this process initialised it behind python-pkcs11's back;
            # we cannot know whether with locks. Refuse rather than risk the crash.
            raise _module_error(
                f"PKCS#11 module {self.path} was already initialised by other code in this process",
                rv,
            )
        if rv != _CKR_OK:
            raise _module_error(f"C_Initialize of {self.path} failed", rv)
        self._initialized = True

    def _finalize(self) -> int:
        rv = int(self._functions.C_Finalize(None))
        self._initialized = False
        return rv

    def reinitialize(self) -> None:
        """``C_Finalize`` then the locked ``C_Initialize``: the fault-recovery reset.

        Every session and login of this process on this module is gone afterwards;
        login counts are reset, so users must log in again.
        """
        with self._lock:
            rv = self._finalize()
            if rv not in (_CKR_OK, _CKR_CRYPTOKI_NOT_INITIALIZED):
                log.warning("C_Finalize of %s during reinitialise: %s", self.path, ckr_text(rv))
            self._logins.clear()
            self._foreign_login.clear()
            self._initialize_locked()

    @property
    def initialized(self) -> bool:
        return self._initialized

    # -- reference counting -----------------------------------------------------------

    def _acquire(self) -> None:
        self._refs += 1

    def release(self) -> None:
        """Give back a reference from :func:`open_module`; the last one finalises."""
        with _registry_lock:
            self._refs -= 1
            if self._refs > 0:
                return
            _registry.pop(self.path, None)
            if self._initialized:
                rv = self._finalize()
                if rv not in (_CKR_OK, _CKR_CRYPTOKI_NOT_INITIALIZED):
                    log.warning("C_Finalize of %s: %s", self.path, ckr_text(rv))

    # -- login ------------------------------------------------------------------------

    def login(self, session_handle: int, slot_id: int, pin: str | None) -> None:
        """Log the user in on this slot unless this process already is.

        ``pin=None`` uses the token's protected authentication path (PIN pad).
        Raises :class:`HsmError` (``FAILED_PRECONDITION`` for a wrong or locked PIN).
        """
        with self._lock:
            count = self._logins.get(slot_id, 0)
            if count == 0:
                rv = self._c_login(session_handle, pin)
                if rv == _CKR_USER_ALREADY_LOGGED_IN:
                    # Logged in by code that does not use this registry: do not log
                    # out when our last user leaves, it is not ours to end.
                    self._foreign_login.add(slot_id)
                elif rv != _CKR_OK:
                    raise _login_error(rv)
            self._logins[slot_id] = count + 1

    def _c_login(self, session_handle: int, pin: str | None) -> int:
        if pin is None:
            with self.call_lock:
                return int(self._functions.C_Login(session_handle, CKU_USER, None, 0))
        encoded = pin.encode("utf-8")
        size = len(encoded)
        buffer = ctypes.create_string_buffer(size + 1)
        try:
            ctypes.memmove(buffer, encoded, size)
            with self.call_lock:
                return int(self._functions.C_Login(session_handle, CKU_USER, buffer, size))
        finally:
            # The str and its encoded copy are immutable and live until collected;
            # the buffer handed to the module at least does not outlive the call.
            ctypes.memset(buffer, 0, size + 1)
            del encoded

    def logout(self, session_handle: int, slot_id: int) -> None:
        """Drop one login reference for the slot; the last one calls ``C_Logout``."""
        with self._lock:
            count = self._logins.get(slot_id, 0)
            if count <= 0:
                return
            if count > 1:
                self._logins[slot_id] = count - 1
                return
            del self._logins[slot_id]
            if slot_id in self._foreign_login:
                self._foreign_login.discard(slot_id)
                return
            if not self._initialized:
                return
            with self.call_lock:
                rv = int(self._functions.C_Logout(session_handle))
            if rv not in (_CKR_OK, _CKR_USER_NOT_LOGGED_IN):
                log.warning("C_Logout on %s: %s", self.path, ckr_text(rv))

    # -- probing ----------------------------------------------------------------------

    def session_state(self, session_handle: int) -> SessionState:
        """``C_GetSessionInfo``; raises :class:`HsmError` when the call fails."""
        info = _CkSessionInfo()
        with self.call_lock:
            rv = int(self._functions.C_GetSessionInfo(session_handle, ctypes.byref(info)))
        if rv != _CKR_OK:
            raise classify(_RvError(rv), context="session probe")
        return SessionState(
            int(info.slotID), int(info.state), int(info.flags), int(info.ulDeviceError)
        )

    def __repr__(self) -> str:
        return f"<Pkcs11Module {self.path} refs={self._refs}>"


class _RvError(pkcs11.PKCS11Error):
    """A bare return value from a ctypes call, shaped like python-pkcs11's unmapped errors."""

    def __init__(self, rv: int) -> None:
        super().__init__(f"Unmapped error code {hex(rv)}")


def _login_error(rv: int) -> HsmError:
    error = classify(_RvError(rv), context="login")
    return error


def _python_pkcs11_key(path: str, requested: str) -> str:
    """The path under which python-pkcs11 already caches a lib object for this file.

    ``pkcs11.lib()`` caches per path *string*; asking again under another spelling of
    the same file (a symlink, as /usr/lib/softhsm/libsofthsm2.so is) makes a second
    lib object whose ``C_Initialize(NULL)`` fails with
    CKR_CRYPTOKI_ALREADY_INITIALIZED. So reuse the cached object whatever its
    spelling (``pkcs11._loaded`` is private, hence the getattr).
    """
    loaded: dict[str, Any] = getattr(pkcs11, "_loaded", {})
    for key in loaded:
        if os.path.realpath(key) == path:
            return key
    return requested


_registry: dict[str, Pkcs11Module] = {}
_registry_lock = threading.Lock()


def open_module(path: str) -> Pkcs11Module:
    """The process-wide :class:`Pkcs11Module` for ``path``, loading it if needed.

    Each call takes a reference; pair it with :meth:`Pkcs11Module.release`.
    """
    key = os.path.realpath(path)
    with _registry_lock:
        module = _registry.get(key)
        if module is None:
            if not os.path.exists(key):
                raise _module_error(f"PKCS#11 module {path} does not exist")
            module = Pkcs11Module(key, path)
            _registry[key] = module
        module._acquire()
        return module


@contextlib.contextmanager
def opened_module(path: str) -> Iterator[Pkcs11Module]:
    """``with opened_module(path) as module:`` -- :func:`open_module` plus release."""
    module = open_module(path)
    try:
        yield module
    finally:
        module.release()
