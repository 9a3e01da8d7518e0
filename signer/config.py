"""The signer's settings (loaded by signer.common.config)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from signer.common.config import Duration, at_least, host_port, one_of, setting
from signer.common.logs import level_check
from signer.common.telemetry import TracingConfig
from signer.common.tls import TLSFiles

DEFAULT_LISTEN = "127.0.0.1:2410"


def _pkcs11_store(stores: Any) -> str:
    """gokeyless's ``private_key_stores``: a signer serves one ``- uri: pkcs11:...``."""
    uris = [s.get("uri") for s in stores if isinstance(s, dict)] if isinstance(stores, list) else []
    if len(uris) != 1 or not isinstance(uris[0], str) or not uris[0].startswith("pkcs11:"):
        raise ValueError(
            "exactly one entry `- uri: pkcs11:...` (a signer serves one token; "
            "`keyward migrate` splits other gokeyless key stores)"
        )
    return uris[0]


@dataclasses.dataclass(slots=True)
class SignerConfig:
    pkcs11_uri: str = setting(
        aliases={"private_key_stores": _pkcs11_store},
        check=lambda v: None if v.startswith("pkcs11:") else "a pkcs11: URI",
        help="RFC 7512 URI of the token and keys: pkcs11:token=...;id=...?module-path=..."
        "&pin-source=file:/run/secrets/pin (pin-value works too but puts the PIN in the file)",
        secret=True,
    )
    listen: str = setting(
        DEFAULT_LISTEN, help="host:port for the Signer API (gRPC)", check=host_port
    )
    unix_socket: Path | None = setting(None, help="also serve the Signer API on this Unix socket")
    insecure: bool = setting(
        False, help="plain TCP without TLS on `listen`: local experiments only"
    )
    tls: TLSFiles = setting(
        default_factory=TLSFiles,
        help="server certificate and key, and the CA that callers' certificates chain to",
    )
    allowed_clients: list[str] = setting(
        default_factory=list,
        help="certificate common names allowed to call; empty allows any certificate from tls.ca",
    )
    sessions: int | None = setting(
        None,
        help="HSM sessions, one worker thread each (default: the URI's max-sessions, else 2)",
        check=at_least(1),
    )
    max_queue: int = setting(
        4096, help="operations waiting for a session before RESOURCE_EXHAUSTED", check=at_least(1)
    )
    key_refresh_interval: Duration = setting(
        Duration(10.0),
        help="how often the token is searched for added or removed keys",
        check=at_least(0.1),
    )
    drain_timeout: Duration = setting(
        Duration(10.0), help="on SIGTERM, how long in-flight work may take", check=at_least(0)
    )
    hsm_call_timeout: Duration = setting(
        Duration(10.0),
        help="an HSM call running longer than this is abandoned: its operations are answered "
        "UNAVAILABLE and a new session takes its place (PKCS#11 cannot cancel a call); more "
        "stuck calls than sessions at once is an HSM fault",
        check=at_least(0.01),
    )
    metrics_listen: str | None = setting(
        "127.0.0.1:2411",
        help="host:port of the /metrics, /healthz and /readyz HTTP endpoint (empty: off)",
        check=host_port,
    )
    tracing: TracingConfig = setting(
        default_factory=TracingConfig, help="OpenTelemetry tracing (OTEL_* variables win)"
    )
    test_fault_file: Path | None = setting(
        None,
        help="TEST ONLY: a JSON file of HSM faults to inject (see signer/faults.py); "
        "never set in production",
    )
    log_level: str = setting("info", check=level_check, aliases={"loglevel": None})
    log_format: str = setting("text", check=one_of("text", "json"))
