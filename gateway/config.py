"""The gateway's settings (loaded by signer.common.config).

Names follow gokeyless where they mean the same thing (``port``, ``auth_cert``,
``auth_key``, ``cloudflare_ca_cert``, ``max_conn_pending_requests``, ``tcp_timeout``),
so a gokeyless operator recognises them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from signer.common.config import Duration, at_least, host_port, in_range, one_of, setting
from signer.common.logs import level_check
from signer.common.telemetry import TracingConfig
from signer.common.tls import TLSFiles


def _signer_list(value: list[str]) -> str | None:
    for v in value:
        if host_port(v) is not None:
            return f"host:port entries (bad entry {v!r})"
    return None


@dataclasses.dataclass(slots=True)
class GatewayConfig:
    signers: list[str] = setting(
        default_factory=list,
        help="Signer API addresses (host:port); every signer's keys are learned from it",
        check=_signer_list,
    )
    hostname: str | None = setting(None, help="the key server's hostname (SAN of auth_cert)")
    bind_address: str = setting(
        "127.0.0.1",
        help="address the keyless listener binds; 0.0.0.0 or :: to listen on every interface",
    )
    port: int = setting(2407, help="keyless listener port", check=in_range(0, 65535))
    unix_socket: Path | None = setting(None, help="also serve keyless (with TLS) on this socket")
    auth_cert: Path | None = setting(None, help="key-server certificate presented to the edge")
    auth_key: Path | None = setting(None, help="private key of auth_cert")
    cloudflare_ca_cert: Path | None = setting(
        None, help="CA that the edge's client certificates must chain to"
    )
    max_conn_pending_requests: int = setting(
        1024, help="requests in flight per connection before reads pause", check=at_least(1)
    )
    max_pending_requests: int = setting(
        65536,
        help="requests in flight across all connections before reads pause",
        check=at_least(1),
    )
    tcp_timeout: Duration = setting(
        Duration(30.0),
        help="close a connection idle this long (after in-flight work drains)",
        check=at_least(0.1),
    )
    request_timeout: Duration = setting(
        Duration(5.0),
        help="total time budget of one keyless request, retries included",
        check=at_least(0.01),
    )
    signer_tls: TLSFiles = setting(
        default_factory=TLSFiles,
        help="client certificate and key for the Signer API, and the CA signers chain to",
    )
    signer_insecure: bool = setting(False, help="plain TCP to signers (local experiments only)")
    signer_server_name: str | None = setting(
        None, help="name to verify in signer certificates, when it differs from the address"
    )
    metrics_address: str = setting(
        "127.0.0.1", help="address of the /metrics, /healthz and /readyz HTTP endpoint"
    )
    metrics_port: int = setting(
        2406,
        help="port of that endpoint (gokeyless's metrics_port); -1 turns it off",
        check=in_range(-1, 65535),
    )
    tracing: TracingConfig = setting(
        default_factory=TracingConfig, help="OpenTelemetry tracing (OTEL_* variables win)"
    )
    event_loop: str = setting(
        "asyncio",
        help="asyncio, or uvloop if installed (measured ~10% slower here once TLS is on)",
        check=one_of("asyncio", "uvloop"),
    )
    log_level: str = setting("info", check=level_check)
    log_format: str = setting("text", check=one_of("text", "json"))

    def __post_init__(self) -> None:
        missing = [
            n for n in ("auth_cert", "auth_key", "cloudflare_ca_cert") if getattr(self, n) is None
        ]
        if missing:
            raise ValueError(
                f"{', '.join('gateway.' + m for m in missing)}: required "
                "(the keyless listener always uses mutual TLS)"
            )
        if not self.signers:
            raise ValueError("gateway.signers: at least one signer address is required")
