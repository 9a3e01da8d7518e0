"""Test-only HSM fault injection, switched on by the ``test_fault_file`` setting.

Failure tests must exercise the real code path (real token, real sessions, real
error classification), so instead of faking the HSM they make the signer's calls
into it slow or failing. The signer reads a small JSON file, at most every 100 ms:

    {"delay_ms": 50, "calls": ["sign", "decrypt"]}
    {"error": "CKR_DEVICE_ERROR", "calls": ["sign", "probe"]}

``calls`` defaults to every call. An absent or empty file means no fault. The hook
runs on the worker threads just before each PKCS#11 call, raising the python-pkcs11
exception that the module would raise for that return code. Never set this in
production: it exists for the test suite and for game days.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import pkcs11.exceptions as p11e

log = logging.getLogger("keyward.signer.faults")

# Return codes a test may ask for, by name, with the exception python-pkcs11 raises.
ERRORS: dict[str, type[Exception]] = {
    "CKR_DEVICE_ERROR": p11e.DeviceError,
    "CKR_DEVICE_REMOVED": p11e.DeviceRemoved,
    "CKR_TOKEN_NOT_PRESENT": p11e.TokenNotPresent,
    "CKR_SESSION_HANDLE_INVALID": p11e.SessionHandleInvalid,
    "CKR_USER_NOT_LOGGED_IN": p11e.UserNotLoggedIn,
    "CKR_GENERAL_ERROR": p11e.GeneralError,
}


class FileFaultInjector:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._checked = 0.0
        self._mtime: float | None = None
        self._delay = 0.0
        self._error: type[Exception] | None = None
        self._calls: frozenset[str] | None = None

    def _reload(self) -> None:
        now = time.monotonic()
        if now - self._checked < 0.1:
            return
        with self._lock:
            self._checked = now
            try:
                mtime = self.path.stat().st_mtime
            except OSError:
                mtime = None
            if mtime == self._mtime:
                return
            self._mtime = mtime
            spec: dict[str, Any] = {}
            if mtime is not None:
                try:
                    text = self.path.read_text().strip()
                    spec = json.loads(text) if text else {}
                except (OSError, ValueError):
                    log.warning("fault file %s is not valid JSON; ignoring it", self.path)
            self._delay = float(spec.get("delay_ms", 0)) / 1000
            error = spec.get("error")
            self._error = ERRORS.get(error) if isinstance(error, str) else None
            calls = spec.get("calls")
            self._calls = frozenset(calls) if isinstance(calls, list) else None
            log.warning("injected HSM faults now: %s", spec or "none")

    def __call__(self, call: str) -> None:
        self._reload()
        if self._calls is not None and call not in self._calls:
            return
        if self._delay:
            time.sleep(self._delay)
        if self._error is not None:
            raise self._error()
