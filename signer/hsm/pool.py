"""The token: one PKCS#11 token, logged in once, served by one worker thread per session.

Threading model
---------------
The module is initialised with OS locking (see :mod:`signer.hsm.module`), and each
worker thread owns one session for its whole life. PKCS#11 sessions are not meant
to be used by two threads at once, and python-pkcs11 objects (key handles wrapped
with their session) are bound to one session, so each worker also keeps its own
cache of key objects. Token-object handles are valid across the sessions of one
application, so a worker finds its objects with one ``C_FindObjects`` pass over the
private keys, matched by the handle seen at discovery (checked against CKA_ID and
CKA_LABEL), at start and whenever the key set is replaced.

Work arrives in batches (:meth:`Token.submit`): one worker takes a whole batch from
a shared FIFO queue and runs its jobs in order, which amortises the thread hand-off
(a Python queue round trip costs about as much as an ECDSA signature in SoftHSM2).
The queue is bounded in *jobs*; beyond the bound :meth:`Token.submit` fails at once
with RESOURCE_EXHAUSTED rather than letting latency grow without limit.

All HSM work of a Token, including key discovery and admin writes (:meth:`Token.call`),
runs on the worker threads, so the number of sessions never exceeds ``sessions`` and
a module that cannot lock (``Pkcs11Module.serialize``) is used from one thread only.

Faults
------
A job failing with a CKR value of the "HSM broken" family (:mod:`signer.hsm.errors`)
marks the token unhealthy (:attr:`Token.healthy`, :attr:`Token.last_fault`,
:attr:`Token.on_fault`); the service is expected to stop serving and call
:meth:`Token.recover`. ``CKR_GENERAL_ERROR`` is ambiguous -- SoftHSM2 returns it for
a bad PKCS#1 v1.5 padding as well as for real failures -- so it is only treated as a
fault when a ``C_GetSessionInfo`` probe of the same session fails or shows the login
gone; otherwise it is the request's fault (PKCS1V15 decrypt: INVALID_ARGUMENT) or
INTERNAL. Without this, any client could take the signer out of service with one
garbage ciphertext.

Stuck calls
-----------
PKCS#11 gives no way to interrupt a call in progress: ``C_Sign`` and ``C_Decrypt``
are synchronous, v2.40 has no cancel function at all, and v3.0's ``C_SessionCancel``
only ends an operation *between* calls (after ``C_SignInit``, before the final
``C_Sign``), on the session's own thread; nor may another thread use the session
(``C_CloseSession`` or ``C_Finalize`` under a running call is undefined behaviour,
and crashes some modules). So a call that never returns (a network HSM that stopped
answering, a wedged driver) cannot be taken back; what can be bounded is what it
costs. With ``call_timeout`` set, a watchdog thread checks the workers: one whose
current HSM call has run longer than that is *abandoned*. Its batch is answered at
once with UNAVAILABLE (the gateway retries elsewhere), a fresh session is opened for
a new worker thread so the token keeps its ``sessions`` count, and the old thread,
whenever its call returns, closes its session and ends without touching the results.
At most ``max_stuck`` (default: the session count) abandoned calls may be
outstanding at once; one more is treated as an HSM fault (NOT_SERVING, then
:meth:`recover`, which waits for the stuck calls to return before it re-initialises
the module, since finalising under a running call is what must never happen).

``fault_injector`` is a test hook: when set, it is called with the name of the HSM
call about to be made ("sign", "decrypt", "probe", "find_objects", "discover",
"call") and may raise a python-pkcs11 exception or sleep, so failure tests run
through the real code path. When it is None the cost is one attribute read per job.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Final, TypeAlias, TypeVar

import grpc
import pkcs11
from pkcs11 import Attribute, ObjectClass, TokenFlag

from signer.hsm.errors import HsmError, classify, is_ambiguous
from signer.hsm.keys import KeyInfo, discover_keys
from signer.hsm.mechanisms import (
    DecryptSpec,
    SignSpec,
    check_decrypt,
    check_sign,
    decrypt_spec,
    sign_spec,
)
from signer.hsm.module import Pkcs11Module, open_module
from signer.hsm.uri import Pkcs11Uri, parse_pkcs11_uri
from signer.v1 import signer_pb2 as pb

__all__ = ["FaultInjector", "Job", "Result", "Token"]

log = logging.getLogger(__name__)

Result: TypeAlias = bytes | HsmError
FaultInjector: TypeAlias = Callable[[str], None]
T = TypeVar("T")

DEFAULT_SESSIONS: Final = 2
DEFAULT_MAX_QUEUE: Final = 4096
_SKI_LEN: Final = 20


@dataclass(slots=True)
class Job:
    """One operation: a signature (``algorithm``) or an RSA decryption (``decrypt_mode``).

    ``key`` is a :class:`KeyInfo` or a 20-byte SKI; it is looked up in the token's
    current key set either way. ``deadline`` is a :func:`time.monotonic` value after
    which the job is answered DEADLINE_EXCEEDED without touching the HSM.
    Use :meth:`sign` / :meth:`decrypt` to build one. A Job may be changed until it is
    submitted (e.g. to set a deadline); :meth:`Token.submit` copies what it needs.
    """

    key: KeyInfo | bytes
    data: bytes
    algorithm: pb.Algorithm = pb.ALGORITHM_UNSPECIFIED
    decrypt_mode: pb.DecryptMode = pb.DECRYPT_MODE_UNSPECIFIED
    deadline: float | None = None

    @classmethod
    def sign(
        cls,
        key: KeyInfo | bytes,
        algorithm: pb.Algorithm,
        data: bytes,
        deadline: float | None = None,
    ) -> Job:
        return cls(key=key, data=data, algorithm=algorithm, deadline=deadline)

    @classmethod
    def decrypt(
        cls,
        key: KeyInfo | bytes,
        mode: pb.DecryptMode,
        data: bytes,
        deadline: float | None = None,
    ) -> Job:
        return cls(key=key, data=data, decrypt_mode=mode, deadline=deadline)

    def __repr__(self) -> str:
        # Never show the input: it may be a digest of something private or a ciphertext.
        ski = self.key.ski if isinstance(self.key, KeyInfo) else self.key
        op = (
            pb.DecryptMode.Name(self.decrypt_mode)
            if self.decrypt_mode
            else _algorithm_name(self.algorithm)
        )
        return f"Job({op}, ski={ski.hex()}, {len(self.data)} bytes)"


def _algorithm_name(algorithm: int) -> str:
    try:
        return pb.Algorithm.Name(algorithm)
    except ValueError:
        return f"algorithm {algorithm}"


class _KeySet:
    """A snapshot of the served keys; replaced as a whole, never mutated, so readers
    on any thread need no lock."""

    __slots__ = ("by_ski", "generation", "keys")

    def __init__(self, generation: int, keys: tuple[KeyInfo, ...]) -> None:
        self.generation = generation
        self.keys = keys
        # Built once per key set, not per submitted batch.
        self.by_ski: dict[bytes, KeyInfo] = {key.ski: key for key in keys}


class _Work:
    __slots__ = ("data", "deadline", "index", "k", "key", "spec")

    def __init__(
        self,
        index: int,
        spec: SignSpec | DecryptSpec,
        key: KeyInfo,
        data: bytes,
        deadline: float | None,
    ) -> None:
        self.index = index
        self.spec = spec
        self.key = key
        self.data = data
        self.deadline = deadline
        self.k = (key.bits + 7) // 8


class _Batch:
    __slots__ = ("future", "results", "work")

    def __init__(
        self, work: list[_Work], results: list[Result | None], future: Future[list[Result]]
    ) -> None:
        self.work = work
        self.results = results
        self.future = future


class _Control:
    __slots__ = ("fn", "future", "rw")

    def __init__(self, fn: Callable[[Any], Any], future: Future[Any], rw: bool) -> None:
        self.fn = fn
        self.future = future
        self.rw = rw


_STOP: Final = object()


class _Abandoned(Exception):
    """Raised in a worker whose stuck call the watchdog gave up on."""


def _deadline_error() -> HsmError:
    return HsmError(
        grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed before an HSM session was free"
    )


class _Worker:
    """One thread, one session, one private-key object cache."""

    def __init__(self, token: Token, index: int, session: Any) -> None:
        self.token = token
        self.index = index
        self.session = session
        self.keyset: _KeySet | None = None
        self.objects: dict[bytes, Any] = {}
        self.thread = threading.Thread(target=self._run, name=f"keyward-hsm-{index}", daemon=True)
        # For the stuck-call watchdog: when the current HSM call began (None between
        # calls), the item being worked on, and whether the watchdog gave up on it.
        # ``lock`` orders a result being stored against the watchdog answering it.
        self.lock = threading.Lock()
        self.busy_since: float | None = None
        self.current: _Batch | _Control | None = None
        self.abandoned = False

    def _done_calling(self) -> None:
        """After an HSM call: raise _Abandoned if the watchdog gave up on it."""
        with self.lock:
            self.busy_since = None
            if self.abandoned:
                raise _Abandoned

    # -- object cache -----------------------------------------------------------------

    def _rebuild(self, keyset: _KeySet) -> None:
        token = self.token
        injector = token.fault_injector
        if injector is not None:
            injector("find_objects")
        by_handle: dict[int, Any] = {}
        for attempt in range(3):
            try:
                listed = list(self.session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY}))
            except pkcs11.exceptions.ObjectHandleInvalid:
                # Another session destroyed a key between C_FindObjects and the
                # attribute reads python-pkcs11 makes for each object (an admin
                # `keys delete` during a refresh): the object is gone, the HSM is
                # fine. List again; only a persistent failure is a fault.
                if attempt == 2:
                    raise
                continue
            by_handle = {obj.handle: obj for obj in listed}
            break
        objects: dict[bytes, Any] = {}
        missing: list[KeyInfo] = []
        for key in keyset.keys:
            obj = by_handle.get(key.handle) if key.handle is not None else None
            if obj is None or not _same_key_object(obj, key):
                obj = self._search(key)
            if obj is not None:
                objects[key.ski] = obj
            else:
                missing.append(key)
        if missing and token._logged_in:
            # Private objects are invisible when the login is gone; that is an HSM
            # fault, not a key that was deleted.
            if injector is not None:
                injector("probe")
            if not token.module.session_state(self.session.handle).logged_in:
                raise HsmError(
                    grpc.StatusCode.UNAVAILABLE,
                    "the token session is no longer logged in",
                    ckr="CKR_USER_NOT_LOGGED_IN",
                    hsm_fault=True,
                )
        for key in missing:
            log.warning(
                "worker %d: cannot find private key %r (SKI %s) on its session",
                self.index,
                key.label,
                key.ski.hex(),
            )
        self.objects = objects
        self.keyset = keyset

    def _search(self, key: KeyInfo) -> Any:
        # Handles differ between sessions on some modules: fall back to the
        # attributes, and accept only an unambiguous match.
        template: dict[Attribute, Any] = {
            Attribute.CLASS: ObjectClass.PRIVATE_KEY,
            Attribute.ID: key.id,
        }
        if key.label:
            template[Attribute.LABEL] = key.label
        try:
            matches = list(self.session.get_objects(template))
        except pkcs11.exceptions.ObjectHandleInvalid:
            return None  # destroyed by another session while we looked: gone
        return matches[0] if len(matches) == 1 else None

    # -- main loop --------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except _Abandoned:
            # The watchdog answered our work and replaced us; our call finally returned.
            log.warning("worker %d: its stuck HSM call returned; closing its session", self.index)
            with contextlib.suppress(Exception):
                self.session.close()
            self.token._abandoned_exited(self)

    def _loop(self) -> None:
        token = self.token
        tasks = token._queue
        # The object cache was built by Token._open before this thread started.
        while True:
            item = tasks.get()
            if item is _STOP:
                return
            self.current = item  # type: ignore[assignment]
            if isinstance(item, _Control):
                self._run_control(item)
                continue
            assert isinstance(item, _Batch)
            token._taken(len(item.work))
            if not item.future.set_running_or_notify_cancel():
                continue
            # When a session took the batch: callers compute the wait for a session
            # (metrics, the HSM span) from it without another thread hand-off.
            item.future.hsm_started = time.monotonic()  # type: ignore[attr-defined]
            try:
                self._run_batch(item)
            except _Abandoned:
                raise
            except BaseException as exc:  # a bug here must not kill the worker
                error = classify(exc, context="batch")
                log.exception("worker %d: unexpected failure running a batch", self.index)
                for work in item.work:
                    if item.results[work.index] is None:
                        item.results[work.index] = error
            item.future.set_result(item.results)  # type: ignore[arg-type]

    def _run_batch(self, batch: _Batch) -> None:
        token = self.token
        keyset = token._keyset
        if keyset is not self.keyset:
            self.busy_since = time.monotonic()
            error: HsmError | None = None
            try:
                self._rebuild(keyset)
            except Exception as exc:
                error = self._failure(exc, "finding key objects", None)
            self._done_calling()
            if error is not None:
                for work in batch.work:
                    batch.results[work.index] = error
                return
        results = batch.results
        objects = self.objects
        monotonic = time.monotonic
        for work in batch.work:
            now = monotonic()
            if work.deadline is not None and now >= work.deadline:
                results[work.index] = _deadline_error()
                continue
            obj = objects.get(work.key.ski)
            if obj is None:
                results[work.index] = HsmError(
                    grpc.StatusCode.NOT_FOUND,
                    f"no key with SKI {work.key.ski.hex()} (no longer on the token)",
                )
                continue
            spec = work.spec
            self.busy_since = now
            out: Result
            try:
                injector = token.fault_injector
                if isinstance(spec, SignSpec):
                    if injector is not None:
                        injector("sign")
                    out = spec.sign(obj, work.data)
                else:
                    if injector is not None:
                        injector("decrypt")
                    out = spec.decrypt(obj, work.data, work.k)
            except Exception as exc:
                out = self._failure(exc, spec.name, spec)
            with self.lock:
                self.busy_since = None
                if self.abandoned:
                    raise _Abandoned
                results[work.index] = out

    def _run_control(self, control: _Control) -> None:
        if not control.future.set_running_or_notify_cancel():
            return
        self.busy_since = time.monotonic()
        failure: BaseException | None = None
        result: Any = None
        try:
            injector = self.token.fault_injector
            if injector is not None:
                injector("call")
            if control.rw:
                # Admin writes need a read/write session; open it here, in the worker
                # thread, so the module still sees one thread per session.
                session = self.token._p11_token.open(rw=True)
                try:
                    result = control.fn(session)
                finally:
                    with contextlib.suppress(pkcs11.PKCS11Error):
                        session.close()
            else:
                result = control.fn(self.session)
        except (HsmError, ValueError) as exc:
            # ValueError: callers (admin) use it for their own refusals; keep its text.
            failure = exc
        except Exception as exc:
            failure = self._failure(exc, "HSM call", None)
        self._done_calling()
        if failure is not None:
            control.future.set_exception(failure)
        else:
            control.future.set_result(result)

    # -- errors -----------------------------------------------------------------------

    def _failure(
        self, exc: BaseException, context: str, spec: SignSpec | DecryptSpec | None
    ) -> HsmError:
        error = classify(exc, context=context)
        if is_ambiguous(error):
            error = self._disambiguate(error, context, spec)
        if error.hsm_fault:
            if error.ckr in ("CKR_OBJECT_HANDLE_INVALID", "CKR_KEY_HANDLE_INVALID"):
                self.keyset = None  # find the objects again on the next batch
            self.token._note_fault(error)
        return error

    def _disambiguate(
        self, error: HsmError, context: str, spec: SignSpec | DecryptSpec | None
    ) -> HsmError:
        token = self.token
        try:
            injector = token.fault_injector
            if injector is not None:
                injector("probe")
            state = token.module.session_state(self.session.handle)
        except Exception as probe_exc:
            probe = classify(probe_exc, context="session probe")
            return HsmError(
                grpc.StatusCode.UNAVAILABLE,
                f"{context} failed: {error.ckr}, and the session probe failed too "
                f"({probe.ckr or probe.code.name})",
                ckr=error.ckr,
                hsm_fault=True,
            )
        if token._logged_in and not state.logged_in:
            return HsmError(
                grpc.StatusCode.UNAVAILABLE,
                f"{context} failed: {error.ckr}; the session is no longer logged in",
                ckr=error.ckr,
                hsm_fault=True,
            )
        if state.device_error:
            return HsmError(
                grpc.StatusCode.UNAVAILABLE,
                f"{context} failed: {error.ckr}; the device reports error 0x{state.device_error:x}",
                ckr=error.ckr,
                hsm_fault=True,
            )
        if isinstance(spec, DecryptSpec) and not spec.raw:
            return HsmError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{context} failed: the ciphertext does not decrypt to a valid "
                f"PKCS#1 v1.5 block ({error.ckr})",
                ckr=error.ckr,
            )
        return HsmError(
            grpc.StatusCode.INTERNAL,
            f"{context} failed: {error.ckr}; the session is healthy, so this is "
            "not treated as an HSM fault",
            ckr=error.ckr,
        )


def _same_key_object(obj: Any, key: KeyInfo) -> bool:
    try:
        return bool(obj[Attribute.ID] == key.id and (obj[Attribute.LABEL] or "") == key.label)
    except pkcs11.PKCS11Error:
        return False


class Token:
    """One PKCS#11 token, opened, logged in and served by ``sessions`` worker threads.

    ``uri`` selects the module and token (``token``/``serial``/``slot-id``) and
    optionally the keys (``id``/``object``); its PIN is used once to log in and read
    again from its source whenever :meth:`recover` logs in again.

    ``mechanism_allowlist`` (tests only) restricts the token's mechanism list, to
    simulate a token without, say, ``CKM_EDDSA``.

    ``call_timeout`` (seconds, None for no bound) and ``max_stuck`` bound what an HSM
    call that never returns can cost; see "Stuck calls" above.
    """

    fault_injector: FaultInjector | None
    on_fault: Callable[[HsmError], None] | None
    max_queue: int

    def __init__(
        self,
        uri: Pkcs11Uri | str,
        *,
        sessions: int | None = None,
        max_queue: int = DEFAULT_MAX_QUEUE,
        mechanism_allowlist: Iterable[int] | None = None,
        fault_injector: FaultInjector | None = None,
        on_fault: Callable[[HsmError], None] | None = None,
        call_timeout: float | None = None,
        max_stuck: int | None = None,
    ) -> None:
        self.uri = parse_pkcs11_uri(uri) if isinstance(uri, str) else uri
        if self.uri.module_path is None:
            raise HsmError(
                grpc.StatusCode.FAILED_PRECONDITION, "the PKCS#11 URI has no module-path"
            )
        count = sessions if sessions is not None else (self.uri.max_sessions or DEFAULT_SESSIONS)
        if count < 1:
            raise ValueError("sessions must be at least 1")
        if max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        self.max_queue = max_queue
        self.fault_injector = fault_injector
        # Called on a worker thread with the first and every later fault; it must
        # return quickly and must not call close()/recover() itself (they wait for
        # the workers), only signal whoever will.
        self.on_fault = on_fault
        self._allowlist = (
            frozenset(int(m) for m in mechanism_allowlist)
            if mechanism_allowlist is not None
            else None
        )
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending = 0
        self._closing = False
        self._fault: HsmError | None = None
        self._workers: list[_Worker] = []
        self._sessions: list[Any] = []
        self._logged_in = False
        self._keyset = _KeySet(0, ())
        if call_timeout is not None and call_timeout <= 0:
            raise ValueError("call_timeout must be positive (or None)")
        self.call_timeout = call_timeout
        # Workers abandoned in a stuck call whose thread has not ended yet.
        self._abandoned: list[_Worker] = []
        self.abandoned_calls = 0  # ever, for metrics and tests
        self._spawned = 0
        self._watchdog_stop = threading.Event()
        # Held while a replacement session is being opened: recover() and close() take
        # it too, so the module is never re-initialised or finalised under that work.
        self._replacing = threading.Lock()
        self._replacements = 0  # replacement workers being started
        self._watchdog: threading.Thread | None = None
        self.module: Pkcs11Module = open_module(self.uri.module_path)
        self._session_count = count
        if self.module.serialize and count > 1:
            log.warning(
                "module %s cannot lock: using 1 session instead of %d", self.module.path, count
            )
            self._session_count = 1
        self.max_stuck = max_stuck if max_stuck is not None else self._session_count
        try:
            self._open()
        except BaseException:
            self._teardown()
            self.module.release()
            raise
        if call_timeout is not None:
            self._watchdog = threading.Thread(
                target=self._watch, name="keyward-hsm-watchdog", daemon=True
            )
            self._watchdog.start()

    # -- opening and closing ----------------------------------------------------------

    def _open(self) -> None:
        """Find the token, open the sessions, log in, discover, start the workers."""
        slot, p11_token = self._find_token()
        self._slot = slot
        self._p11_token = p11_token
        self.label: str = p11_token.label
        self.serial: str = p11_token.serial.decode("ascii", "replace")
        self.slot_id: int = slot.slot_id
        mechanisms = frozenset(int(m) for m in slot.get_mechanisms())
        if self._allowlist is not None:
            mechanisms &= self._allowlist
        self.mechanisms: frozenset[int] = mechanisms
        try:
            for _ in range(self._session_count):
                self._sessions.append(p11_token.open())
        except pkcs11.PKCS11Error as exc:
            raise classify(exc, context=f"opening {self._session_count} sessions") from None
        self._login()
        keys = self._discover(self._sessions[0])
        previous = self._keyset
        if previous.keys != tuple(keys) or previous.generation == 0:
            self._keyset = _KeySet(previous.generation + 1, tuple(keys))
        else:
            self._keyset = _KeySet(previous.generation, tuple(keys))
        workers = [_Worker(self, self._next_index(), s) for s in self._sessions]
        # Each worker's object cache is built here, before its thread exists (so the
        # session still has one user at a time), and a failure fails the open.
        for worker in workers:
            try:
                worker._rebuild(self._keyset)
            except HsmError:
                raise
            except Exception as exc:
                raise classify(exc, context="finding key objects") from None
        self._workers = workers
        for worker in workers:
            worker.thread.start()
        log.info(
            "token %r (serial %s): %d sessions, %d keys",
            self.label,
            self.serial,
            len(self._sessions),
            len(keys),
        )

    def _next_index(self) -> int:
        self._spawned += 1
        return self._spawned - 1

    # -- stuck calls ------------------------------------------------------------------

    def _watch(self) -> None:
        """The watchdog thread: abandon workers stuck in one HSM call too long."""
        assert self.call_timeout is not None
        limit = self.call_timeout
        interval = min(0.1, limit / 4)
        while not self._watchdog_stop.wait(interval):
            if self._closing:
                continue
            now = time.monotonic()
            for worker in list(self._workers):
                since = worker.busy_since
                if since is not None and now - since > limit:
                    try:
                        self._abandon(worker, now - since)
                    except Exception:  # the watchdog must outlive its own failures
                        log.exception("HSM watchdog: abandoning worker %d failed", worker.index)

    def _abandon(self, worker: _Worker, stuck_for: float) -> None:
        error = HsmError(
            grpc.StatusCode.UNAVAILABLE,
            f"an HSM call ran for more than {self.call_timeout:g}s; its session was abandoned",
        )
        with worker.lock:
            if worker.busy_since is None or worker.abandoned:
                return  # it returned meanwhile
            worker.abandoned = True
            item = worker.current
            # Answer its work now; the thread will not touch it again (see _done_calling).
            if isinstance(item, _Batch):
                for work in item.work:
                    if item.results[work.index] is None:
                        item.results[work.index] = error
                if not item.future.done():
                    item.future.set_result(item.results)  # type: ignore[arg-type]
            elif isinstance(item, _Control) and not item.future.done():
                item.future.set_exception(error)
        with self._lock:
            self.abandoned_calls += 1
            if worker in self._workers:
                self._workers.remove(worker)
            if worker.session in self._sessions:
                self._sessions.remove(worker.session)
            self._abandoned = [w for w in self._abandoned if w.thread.is_alive()]
            self._abandoned.append(worker)
            stuck = len(self._abandoned)
            replace = stuck <= self.max_stuck
            if replace:
                self._replacements += 1
        log.error(
            "HSM worker %d stuck in one call for %.1fs: abandoned it (%d stuck, at most %d)",
            worker.index,
            stuck_for,
            stuck,
            self.max_stuck,
        )
        if not replace:
            self._note_fault(
                HsmError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"{stuck} HSM calls stuck for more than {self.call_timeout:g}s",
                    hsm_fault=True,
                )
            )
            return
        # Keep the token at its session count, from another thread: opening a session
        # may hang too when the HSM is what is stuck, and the watchdog must go on.
        threading.Thread(
            target=self._replace, args=(worker,), name="keyward-hsm-replace", daemon=True
        ).start()

    def _replace(self, worker: _Worker) -> None:
        """A new session, worker and thread for an abandoned one. The object cache is
        built before the thread starts, as in _open."""
        try:
            with self._replacing:
                if self._closing:
                    return
                try:
                    session = self._p11_token.open()
                    fresh = _Worker(self, self._next_index(), session)
                    fresh._rebuild(self._keyset)
                except Exception as exc:
                    self._note_fault(classify(exc, context="replacing a stuck HSM session"))
                    return
                with self._lock:
                    if self._closing:
                        with contextlib.suppress(Exception):
                            session.close()
                        return
                    self._sessions.append(session)
                    self._workers.append(fresh)
                fresh.thread.start()
                log.warning(
                    "HSM worker %d started on a new session in place of %d",
                    fresh.index,
                    worker.index,
                )
        finally:
            with self._lock:
                self._replacements -= 1

    def _abandoned_exited(self, worker: _Worker) -> None:
        with self._lock:
            if worker in self._abandoned:
                self._abandoned.remove(worker)

    @property
    def stuck_calls(self) -> int:
        """Abandoned HSM calls that have not returned yet."""
        return sum(1 for w in self._abandoned if w.thread.is_alive())

    def _find_token(self) -> tuple[Any, Any]:
        uri = self.uri
        lib = self.module.lib
        module = self.module
        if uri.library_manufacturer is not None and (
            module.manufacturer_id != uri.library_manufacturer
        ):
            raise self._no_token("library-manufacturer does not match the module")
        if uri.library_description is not None and (
            module.library_description != uri.library_description
        ):
            raise self._no_token("library-description does not match the module")
        if uri.library_version is not None:
            wanted = tuple(int(p) for p in uri.library_version.split("."))
            have = module.library_version[: len(wanted)]
            if have != wanted:
                raise self._no_token("library-version does not match the module")
        matches: list[tuple[Any, Any]] = []
        try:
            slots = lib.get_slots(token_present=True)
        except pkcs11.PKCS11Error as exc:
            raise classify(exc, context="listing slots") from None
        for slot in slots:
            if uri.slot_id is not None and slot.slot_id != uri.slot_id:
                continue
            if uri.slot_manufacturer is not None and slot.manufacturer_id != uri.slot_manufacturer:
                continue
            if uri.slot_description is not None and (slot.slot_description != uri.slot_description):
                continue
            try:
                p11_token = slot.get_token()
            except (pkcs11.TokenNotPresent, pkcs11.TokenNotRecognised):
                continue
            if uri.token is not None and p11_token.label != uri.token:
                continue
            if uri.serial is not None and (
                p11_token.serial.decode("ascii", "replace") != uri.serial
            ):
                continue
            if uri.manufacturer is not None and p11_token.manufacturer_id != uri.manufacturer:
                continue
            if uri.model is not None and p11_token.model != uri.model:
                continue
            if not p11_token.flags & TokenFlag.TOKEN_INITIALIZED:
                continue
            matches.append((slot, p11_token))
        if not matches:
            raise self._no_token("no initialised token matches")
        if len(matches) > 1:
            raise HsmError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{len(matches)} tokens match {self.uri.redacted()}; add serial or slot-id",
            )
        return matches[0]

    def _no_token(self, why: str) -> HsmError:
        # UNAVAILABLE and a fault: a network HSM or a token may come back.
        return HsmError(
            grpc.StatusCode.UNAVAILABLE,
            f"{why} {self.uri.redacted()}",
            ckr="CKR_TOKEN_NOT_PRESENT",
            hsm_fault=True,
        )

    def _login(self) -> None:
        first = self._sessions[0]
        if self.uri.has_pin:
            pin: str | None = self.uri.resolve_pin()
        elif self._p11_token.flags & TokenFlag.PROTECTED_AUTHENTICATION_PATH:
            pin = None  # the token's own PIN pad
        else:
            log.warning(
                "no PIN in %s: not logging in; private keys may be invisible", self.uri.redacted()
            )
            return
        try:
            self.module.login(first.handle, self.slot_id, pin)
        finally:
            del pin
        self._logged_in = True

    def _discover(self, session: Any) -> list[KeyInfo]:
        injector = self.fault_injector
        if injector is not None:
            injector("discover")
        return discover_keys(
            session, self.mechanisms, key_id=self.uri.object_id, label=self.uri.object_label
        )

    def _stop_workers(self, timeout: float | None) -> bool:
        """Stop the worker threads; queued batches run first. True if all stopped."""
        with self._lock:
            workers = list(self._workers)  # the watchdog may remove one meanwhile
        for _ in workers:
            self._queue.put(_STOP)
        deadline = None if timeout is None else time.monotonic() + timeout
        for worker in workers:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            worker.thread.join(remaining)
        stuck = [w.index for w in workers if w.thread.is_alive() and not w.abandoned]
        if stuck:
            log.error("HSM workers %s did not stop (stuck in an HSM call?)", stuck)
            return False
        self._workers = []
        return True

    def _fail_queued(self, message: str) -> None:
        """Answer everything still queued with UNAVAILABLE (after the workers stopped)."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            error = HsmError(grpc.StatusCode.UNAVAILABLE, message)
            if isinstance(item, _Batch):
                self._taken(len(item.work))
                if item.future.set_running_or_notify_cancel():
                    for work in item.work:
                        item.results[work.index] = error
                    item.future.set_result(item.results)  # type: ignore[arg-type]
            elif isinstance(item, _Control) and item.future.set_running_or_notify_cancel():
                item.future.set_exception(error)

    def _teardown(self) -> None:
        """Log out and close the sessions (workers must be stopped)."""
        sessions, self._sessions = self._sessions, []
        if not sessions:
            return
        if self._logged_in and self.module.initialized:
            self.module.logout(sessions[0].handle, self.slot_id)
        self._logged_in = False
        if not self.module.initialized:
            return
        for session in reversed(sessions):
            with contextlib.suppress(pkcs11.PKCS11Error):
                session.close()

    def close(self, *, drain: bool = True, timeout: float | None = 30.0) -> None:
        """Stop accepting work, finish (``drain``) or fail the queue, stop the workers,
        log out, close the sessions and release the module (C_Finalize if last user).

        Idempotent. If a worker is stuck in an HSM call past ``timeout``, the sessions
        and the module are left alone (finalising under a running call can crash).
        """
        with self._lock:
            if self._closing:
                return
            self._closing = True
        self._watchdog_stop.set()
        if not drain:
            self._fail_queued("the HSM token is closing")
        stopped = self._stop_workers(timeout)
        self._fail_queued("the HSM token is closed")
        if not stopped or self.stuck_calls:
            if self.stuck_calls:
                log.error(
                    "%d HSM calls are still stuck: leaving the module as it is", self.stuck_calls
                )
            return
        if not self._replacing.acquire(timeout=timeout if timeout is not None else -1):
            log.error("a replacement HSM session is stuck opening: leaving the module as it is")
            return
        self._replacing.release()
        self._teardown()
        self.module.release()

    def __enter__(self) -> Token:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def recover(self, *, timeout: float | None = 30.0) -> None:
        """Start over after an HSM fault: stop the workers (queued work fails with
        UNAVAILABLE), ``C_Finalize`` + locked ``C_Initialize`` of the module, find the
        token again, open new sessions, log in (the PIN source is read again),
        discover the keys and start new workers. Clears :attr:`last_fault`.

        Reinitialising resets the module for the whole process, including any other
        Token on it; the signer serves one token, so there is none. Raises
        :class:`HsmError` if the token is still unusable; call again later.
        """
        with self._lock:
            if self._closing:
                raise HsmError(grpc.StatusCode.UNAVAILABLE, "the HSM token is closed")
            self._closing = True  # refuse new work while we rebuild
        try:
            self._fail_queued("the HSM is being recovered")
            if not self._stop_workers(timeout):
                raise HsmError(
                    grpc.StatusCode.UNAVAILABLE,
                    "HSM workers are stuck in a call; cannot recover yet",
                )
            self._fail_queued("the HSM is being recovered")  # and any stale stop marker
            stuck = self.stuck_calls
            if stuck:
                # C_Finalize under a running call is undefined behaviour: wait for the
                # abandoned calls to come back (the signer stays NOT_SERVING meanwhile).
                raise HsmError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"{stuck} abandoned HSM calls have not returned; cannot re-initialise "
                    "the module under them yet",
                )
            if not self._replacing.acquire(timeout=timeout if timeout is not None else -1):
                raise HsmError(
                    grpc.StatusCode.UNAVAILABLE,
                    "a replacement HSM session is stuck opening; cannot recover yet",
                )
            try:
                with contextlib.suppress(Exception):
                    self._teardown()
                self._sessions = []
                self._logged_in = False
                self.module.reinitialize()
                self._open()
                self._fault = None
            finally:
                self._replacing.release()
        except BaseException:
            with contextlib.suppress(Exception):
                self._teardown()
            raise
        finally:
            with self._lock:
                self._closing = False

    # -- state --------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """False once closed, after an HSM fault (until :meth:`recover`), or if a worker died."""
        if self._closing or self._fault is not None or not self._serviceable():
            return False
        return all(worker.thread.is_alive() for worker in self._workers)

    def _serviceable(self) -> bool:
        # A worker being replaced after a stuck call counts: work queued meanwhile
        # waits for the new worker instead of failing.
        return bool(self._workers) or self._replacements > 0

    @property
    def last_fault(self) -> HsmError | None:
        return self._fault

    @property
    def generation(self) -> int:
        """Changes whenever the key set changes; equal generations mean equal sets."""
        return self._keyset.generation

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    @property
    def description(self) -> str:
        """``label (serial)``, for ListKeysResponse.token, logs and metrics."""
        return f"{self.label} ({self.serial})"

    def keys(self) -> list[KeyInfo]:
        return list(self._keyset.keys)

    def resolve_key(self, *, ski: bytes | None = None, label: str | None = None) -> KeyInfo:
        """The key by SKI or by CKA_LABEL; NOT_FOUND, or INVALID_ARGUMENT if ambiguous."""
        keyset = self._keyset
        keys = keyset.keys
        if ski is not None:
            if len(ski) != _SKI_LEN:
                raise HsmError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"an SKI is {_SKI_LEN} bytes, got {len(ski)}"
                )
            found = keyset.by_ski.get(bytes(ski))
            if found is None:
                raise HsmError(grpc.StatusCode.NOT_FOUND, f"no key with SKI {ski.hex()}")
            return found
        if label is not None:
            matches = [key for key in keys if key.label == label]
            if len(matches) == 1:
                return matches[0]
            if not matches:
                raise HsmError(grpc.StatusCode.NOT_FOUND, f"no key with label {label!r}")
            raise HsmError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{len(matches)} keys have label {label!r}; select by SKI",
            )
        raise HsmError(grpc.StatusCode.INVALID_ARGUMENT, "no key selector given")

    def _note_fault(self, error: HsmError) -> None:
        first = self._fault is None
        self._fault = error
        if first:
            log.error("HSM fault on token %r: %s", getattr(self, "label", "?"), error.message)
        callback = self.on_fault
        if callback is not None:
            try:
                callback(error)
            except Exception:
                log.exception("on_fault callback failed")

    # -- work -------------------------------------------------------------------------

    def _prepare(self, index: int, job: Job, by_ski: dict[bytes, KeyInfo], now: float) -> _Work:
        if job.algorithm and job.decrypt_mode:
            raise HsmError(
                grpc.StatusCode.INVALID_ARGUMENT, "a job is a signature or a decryption, not both"
            )
        if not job.algorithm and not job.decrypt_mode:
            raise HsmError(
                grpc.StatusCode.INVALID_ARGUMENT, "no signing algorithm or decrypt mode given"
            )
        ski = job.key.ski if isinstance(job.key, KeyInfo) else job.key
        if len(ski) != _SKI_LEN:
            raise HsmError(
                grpc.StatusCode.INVALID_ARGUMENT, f"an SKI is {_SKI_LEN} bytes, got {len(ski)}"
            )
        key = by_ski.get(ski if type(ski) is bytes else bytes(ski))
        if key is None:
            raise HsmError(grpc.StatusCode.NOT_FOUND, f"no key with SKI {bytes(ski).hex()}")
        data = job.data if type(job.data) is bytes else bytes(job.data)
        spec: SignSpec | DecryptSpec
        if job.decrypt_mode:
            spec = decrypt_spec(job.decrypt_mode)
            check_decrypt(spec, key, data, self.mechanisms)
        else:
            spec = sign_spec(job.algorithm)
            check_sign(spec, key, data, self.mechanisms)
        if job.deadline is not None and now >= job.deadline:
            raise _deadline_error()
        return _Work(index, spec, key, data, job.deadline)

    def submit(self, batch: Sequence[Job]) -> Future[list[Result]]:
        """Queue a batch; one worker runs its jobs in order.

        The future's result has one entry per job, in order: the output bytes or an
        :class:`HsmError`. Jobs that fail validation (unknown SKI, wrong algorithm,
        wrong length, expired deadline) are answered without reaching the queue.
        Raises :class:`HsmError` RESOURCE_EXHAUSTED when the queue holds ``max_queue``
        jobs, UNAVAILABLE when the token is closing.
        """
        future: Future[list[Result]] = Future()
        if self._closing:
            raise HsmError(grpc.StatusCode.UNAVAILABLE, "the HSM token is closed")
        results: list[Result | None] = [None] * len(batch)
        work: list[_Work] = []
        by_ski = self._keyset.by_ski
        now = time.monotonic()
        for index, job in enumerate(batch):
            try:
                work.append(self._prepare(index, job, by_ski, now))
            except HsmError as exc:
                results[index] = exc
        if not work:
            future.set_result(results)  # type: ignore[arg-type]
            return future
        with self._lock:
            if self._closing or not self._serviceable():
                raise HsmError(grpc.StatusCode.UNAVAILABLE, "the HSM token is closed")
            if self._pending + len(work) > self.max_queue:
                raise HsmError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the signer queue is full ({self._pending} jobs waiting, "
                    f"limit {self.max_queue})",
                )
            self._pending += len(work)
            # Under the lock, so close() cannot slip its stop markers in between the
            # check above and this put.
            self._queue.put(_Batch(work, results, future))
        return future

    def _taken(self, count: int) -> None:
        with self._lock:
            self._pending -= count

    @property
    def busy_sessions(self) -> int:
        """Sessions in an HSM call right now (the rest are idle)."""
        return sum(1 for w in self._workers if w.busy_since is not None and not w.abandoned)

    @property
    def queued_jobs(self) -> int:
        """Jobs waiting for a worker (not counting the ones being run)."""
        return self._pending

    def run(self, job: Job, timeout: float | None = None) -> bytes:
        """Run one job and wait for it (admin tools, tests). Raises :class:`HsmError`."""
        result = self.submit([job]).result(timeout)[0]
        if isinstance(result, HsmError):
            raise result
        return result

    def call(self, fn: Callable[[Any], T], *, rw: bool = False, timeout: float | None = 60.0) -> T:
        """Run ``fn(session)`` on a worker thread and return its result.

        With ``rw=True`` the worker opens a temporary read/write session (already
        logged in: login state is per application) for ``fn``; otherwise ``fn`` gets
        the worker's own session and must not keep objects from it. Control calls
        bypass the queue bound but wait behind queued batches.
        """
        future: Future[T] = Future()
        with self._lock:
            if self._closing or not self._serviceable():
                raise HsmError(grpc.StatusCode.UNAVAILABLE, "the HSM token is closed")
            self._queue.put(_Control(fn, future, rw))
        return future.result(timeout)

    def refresh_keys(self) -> bool:
        """Discover the keys again; returns True (and bumps :attr:`generation`) if the
        set changed. Workers find their objects again before their next batch."""
        keys = self.call(self._discover)
        with self._lock:
            previous = self._keyset
            changed = previous.keys != tuple(keys)
            generation = previous.generation + 1 if changed else previous.generation
            # A new snapshot even when unchanged: handles may differ (key re-imported).
            self._keyset = _KeySet(generation, tuple(keys))
        return changed

    def __repr__(self) -> str:
        state = "closed" if self._closing else ("healthy" if self.healthy else "unhealthy")
        return (
            f"<Token {getattr(self, 'label', '?')!r} sessions={len(self._sessions)} "
            f"keys={len(self._keyset.keys)} {state}>"
        )
