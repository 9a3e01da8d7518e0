"""`keyward demo` end to end: the README's first command, on a fresh state directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from softhsm import unavailable_reason


def test_demo_runs_the_whole_path_and_stops_cleanly(tmp_path: Path) -> None:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    state = tmp_path / "state"
    env = dict(os.environ)
    env.pop("SOFTHSM2_CONF", None)  # the demo makes its own
    proc = subprocess.Popen(
        [sys.executable, "-m", "signer.common.cli", "demo", "--state-dir", str(state),
         "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("ready "):
                break
        assert lines and lines[-1].startswith("ready gateway="), "".join(lines) + (
            proc.stderr.read() if proc.poll() is not None and proc.stderr else ""
        )
        gateway = lines[-1].split()[1].removeprefix("gateway=")
        info = json.loads((state / "demo.json").read_text())
        assert info["gateway"] == gateway
        assert len(info["signers"]) == 2 and all(s["address"] for s in info["signers"])
        assert info["gateway_metrics"] and all(s["metrics"] for s in info["signers"])
        for name in ("ca.pem", "client.pem", "client-key.pem"):
            assert (state / name).is_file()
        assert sorted(p.name for p in (state / "keys").iterdir()) == [
            "ed25519.pubkey", "p256.pubkey", "p384.pubkey", "rsa2048.pubkey"]
        assert oct((state / "client-key.pem").stat().st_mode & 0o777) == "0o600"
        # A user's keyless client, pointed as the demo says, gets every operation right.
        tester = subprocess.run(
            [sys.executable, "-m", "signer.common.cli", "test-keyserver", "--keyserver", gateway,
             "--cert-directory", str(state / "keys"), "--ca", info["ca"],
             "--cert", info["client_cert"], "--key", info["client_key"],
             "--server-name", "localhost"],
            capture_output=True, text=True, timeout=60, check=False,
        )
        summary = json.loads(tester.stdout)
        assert tester.returncode == 0, summary
        assert summary["ping"] and summary["failure"] == 0 and summary["success"] == 25
        pids = [s["pid"] for s in info["signers"]]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == 0
    for pid in pids:  # every child service is gone
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    # A second run reuses the token, keys and PKI.
    before = {p.name: p.read_bytes() for p in (state / "keys").iterdir()}
    proc = subprocess.Popen(
        [sys.executable, "-m", "signer.common.cli", "demo", "--state-dir", str(state), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("ready "):
                break
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert {p.name: p.read_bytes() for p in (state / "keys").iterdir()} == before
