"""Child services that announce themselves with one ``ready NAME listen=ADDR`` line.

``keyward demo``, the benchmark suite and the multi-process tests start signers and
gateways as real processes with the same commands an operator runs; this is how they
wait for one to serve and stop it cleanly.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path


class ServiceError(RuntimeError):
    """A child service failed to start."""


def keyward_argv(*args: str) -> list[str]:
    """The ``keyward`` command as this interpreter runs it (no PATH lookup)."""
    return [sys.executable, "-m", "signer.common.cli", *args]


class Service:
    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.log = log
        self._logf = log.open("ab")
        self.proc = subprocess.Popen(
            argv, env=env, stdout=subprocess.PIPE, stderr=self._logf, start_new_session=True
        )
        self.address = ""
        self.fields: dict[str, str] = {}

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 60.0) -> str:
        assert self.proc.stdout is not None
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            line = self.proc.stdout.readline().decode(errors="replace")
            if not line:
                break
            if line.startswith("ready "):
                # ready NAME key=value key=value ...
                self.fields = dict(part.split("=", 1) for part in line.split()[2:] if "=" in part)
                self.address = self.fields.get("listen", "")
                return self.address
        self.stop()
        tail = self.log.read_text(errors="replace").strip().splitlines()[-8:]
        raise ServiceError(f"{self.name} did not start: " + " | ".join(tail))

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._close()

    def _close(self) -> None:
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._logf.close()
