"""The gateway's settings (loaded by signer.common.config).

Names follow gokeyless where they mean the same thing (``port``, ``auth_cert``,
``auth_key``, ``cloudflare_ca_cert``, ``max_conn_pending_requests``, ``tcp_timeout``),
so a gokeyless operator recognises them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from gateway.discovery import dns_entry_problem, is_dns_entry
from signer.common.config import Duration, at_least, host_port, in_range, one_of, setting
from signer.common.logs import level_check
from signer.common.runtime import EVENT_LOOPS
from signer.common.telemetry import TracingConfig
from signer.common.tls import TLSFiles


def _signer_list(value: list[str]) -> str | None:
    for v in value:
        if is_dns_entry(v):
            problem = dns_entry_problem(v)
            if problem is not None:
                return f"{problem} (bad entry {v!r})"
        elif host_port(v) is not None:
            return f"host:port entries (bad entry {v!r})"
    return None


def _percentile(value: float) -> str | None:
    return None if value == 0 or 50 <= value < 100 else "0 (off) or a percentile from 50 to 99.9"


@dataclasses.dataclass(slots=True)
class GatewayConfig:
    signers: list[str] = setting(
        default_factory=list,
        help="Signer API addresses: host:port (one signer), or dns:NAME:PORT (one signer per "
        "address NAME resolves to, re-resolved every signer_dns_interval); every signer's keys "
        "are learned from it. Re-read on SIGHUP",
        check=_signer_list,
    )
    signer_dns_interval: Duration = setting(
        Duration(10.0),
        help="how often dns: entries of signers are resolved again",
        check=at_least(0.1),
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
    attempt_timeout: Duration = setting(
        Duration(2.0),
        # gokeyless's sign_timeout is the same thing: the budget of one attempt.
        aliases={"sign_timeout": None},
        help="time budget of one attempt on one signer; when it passes, the request is tried on "
        "another signer (within request_timeout). Bounds what a hung or partitioned signer "
        "costs a request",
        check=at_least(0.01),
    )
    max_attempts: int = setting(
        3, help="attempts per request (first try, retries and any hedge)", check=at_least(1)
    )
    eject_after: int = setting(
        5,
        help="failures in a row (UNAVAILABLE, DEADLINE_EXCEEDED, ABORTED) that eject a signer",
        check=at_least(1),
    )
    eject_time: Duration = setting(
        Duration(1.0),
        help="how long a first ejection lasts; each further one in a row doubles it (up to 30s)",
        check=at_least(0.01),
    )
    hedge_delay: Duration = setting(
        Duration(0.0),
        help="ask a second signer when the first has not answered after this long; 0 is off",
        check=at_least(0),
    )
    hedge_percentile: float = setting(
        0.0,
        help="ask a second signer when the first is slower than this percentile of recent "
        "answer times (e.g. 95); 0 is off. With hedge_delay too, the later of the two applies",
        check=_percentile,
    )
    hedge_budget: float = setting(
        0.1, help="hedges allowed, as a fraction of requests", check=in_range(0, 1)
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
        "auto",
        help="auto (uvloop where installed, else asyncio), asyncio or uvloop",
        check=one_of(*EVENT_LOOPS),
    )
    log_level: str = setting("info", check=level_check, aliases={"loglevel": None})
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
