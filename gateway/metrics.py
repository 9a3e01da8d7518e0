"""The gateway's metrics: gokeyless's names where they apply, and what gokeyless lacks.

gokeyless (PEERS.md A6): ``keyless_requests{opcode}``,
``keyless_request_exec_duration_per_opcode{type,error}`` (time spent executing, here the
Signer round trip including retries), ``keyless_request_total_duration_per_opcode``
(from the packet's arrival to its answer being written), ``keyless_failed_connection``
and ``certificate_expiration_timestamp_seconds``. Added: requests in flight, connections,
TLS handshake failures by reason, and per-signer health, load, answers, latency,
retries and failovers.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from gateway.protocol import error_name
from signer.common.metrics import Labels, Registry

NO_ERROR = "no error"


class GatewayMetrics:
    def __init__(self) -> None:
        r = self.registry = Registry()
        self.requests = r.counter("keyless_requests", "Keyless requests received.", ["opcode"])
        self.exec_duration = r.histogram(
            "keyless_request_exec_duration_per_opcode",
            "Time executing a request (the Signer round trip, retries included), seconds.",
            ["type", "error"],
        )
        self.total_duration = r.histogram(
            "keyless_request_total_duration_per_opcode",
            "Time from reading a request to writing its answer, seconds.",
            ["type", "error"],
        )
        self.failed_connection = r.counter(
            "keyless_failed_connection", "Connections that failed after the TLS handshake."
        )
        self.handshake_failures = r.counter(
            "keyward_tls_handshake_failures", "TLS handshakes that failed, by reason.", ["reason"]
        )
        self.cert_expiry = r.gauge(
            "certificate_expiration_timestamp_seconds",
            "Expiry (Unix time) of the certificates in use and of client certificates seen.",
            ["source", "serial_no", "cn", "hostnames", "ca", "server", "client"],
        )
        self.retries = r.counter(
            "keyward_signer_retries", "Operations retried on another signer after a failure."
        )
        self.signer_answers = r.counter(
            "keyward_signer_answers", "Signer answers by signer and outcome.", ["signer", "outcome"]
        )
        self._error_names: dict[int, str] = {}
        self._peers_seen: set[str] = set()

    def gauges(
        self,
        in_flight: Callable[[], float],
        connections: Callable[[], float],
        replicas: Callable[[], list[Any]],
    ) -> None:
        r = self.registry
        r.gauge(
            "keyward_requests_in_flight",
            "Keyless requests being worked on.",
            read=lambda: {(): in_flight()},
        )
        r.gauge(
            "keyward_connections", "Open keyless connections.", read=lambda: {(): connections()}
        )
        r.gauge(
            "keyward_signer_up",
            "1 when the signer is connected and SERVING.",
            ["signer"],
            read=lambda: {(x.address,): float(x.usable) for x in replicas()},
        )
        r.gauge(
            "keyward_signer_outstanding",
            "Operations waiting on the signer.",
            ["signer"],
            read=lambda: {(x.address,): float(x.outstanding) for x in replicas()},
        )
        r.gauge(
            "keyward_signer_keys",
            "Keys the signer advertises.",
            ["signer"],
            read=lambda: {(x.address,): float(len(x.keys)) for x in replicas()},
        )

    def error_label(self, code: int) -> str:
        name = self._error_names.get(code)
        if name is None:
            name = self._error_names[code] = error_name(code)
        return name

    def certificate(self, source: str, pem_or_der: bytes | Path, role: str) -> None:
        """Record a certificate's expiry (role: server, ca or client)."""
        data = pem_or_der.read_bytes() if isinstance(pem_or_der, Path) else pem_or_der
        try:
            certs = (
                x509.load_pem_x509_certificates(data)
                if b"-----BEGIN" in data
                else [x509.load_der_x509_certificate(data)]
            )
        except ValueError:
            return
        for cert in certs:
            cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            try:
                san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
                hosts = ",".join(san.value.get_values_for_type(x509.DNSName))
            except x509.ExtensionNotFound:
                hosts = ""
            labels: Labels = (
                source,
                f"{cert.serial_number:x}",
                str(cns[0].value) if cns else "",
                hosts,
                str(role == "ca").lower(),
                str(role == "server").lower(),
                str(role == "client").lower(),
            )
            self.cert_expiry.set(labels, cert.not_valid_after_utc.timestamp())

    def peer_certificate(self, der: bytes | None) -> None:
        if not der:
            return
        key = der[-32:]  # cheap identity; the full parse happens once per certificate
        marker = key.hex()
        if marker in self._peers_seen or len(self._peers_seen) > 10_000:
            return
        self._peers_seen.add(marker)
        self.certificate("peer", der, "client")


def seconds_until(timestamp: float) -> float:
    return timestamp - dt.datetime.now(dt.UTC).timestamp()
