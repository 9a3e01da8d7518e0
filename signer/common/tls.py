"""The one place TLS contexts and gRPC credentials are built.

Two kinds of TLS run through Keyward:

* the keyless listener, which Cloudflare's edge reaches: TLS 1.2 restricted to the two
  cipher suites the edge offers (ECDHE-ECDSA/RSA-AES256-GCM-SHA384) plus TLS 1.3, and a
  client certificate that must chain to ``cloudflare_ca_cert``;
* the Signer API, gRPC over mutual TLS between gateway (or any application) and signers.

Both verify the peer; neither has a switch that turns verification off. Plain TCP for
local work is a separate, explicit ``insecure`` setting at the call sites.
"""

from __future__ import annotations

import dataclasses
import ssl
from collections.abc import Callable
from pathlib import Path

import grpc

from signer.common.config import setting

# What Cloudflare's keyless client offers, and all gokeyless accepts (PROTOCOL.md §1).
KEYLESS_TLS12_CIPHERS = "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384"


class TLSConfigError(ValueError):
    """A certificate, key or CA file is missing or unusable."""


@dataclasses.dataclass(slots=True)
class TLSFiles:
    """Certificate, key and peer CA for one side of a mutual-TLS link."""

    cert: Path | None = setting(None, help="PEM certificate (chain) presented to peers")
    key: Path | None = setting(None, help="PEM private key for cert")
    ca: Path | None = setting(None, help="PEM CA bundle that peer certificates must chain to")

    def require(self, what: str) -> tuple[Path, Path, Path]:
        missing = [n for n in ("cert", "key", "ca") if getattr(self, n) is None]
        if missing:
            raise TLSConfigError(f"{what}: missing {', '.join(f'{what}.{m}' for m in missing)}")
        assert self.cert and self.key and self.ca
        return self.cert, self.key, self.ca


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise TLSConfigError(f"cannot read {what} {path}: {e.strerror}") from None


def keyless_server_context(cert: Path, key: Path, client_ca: Path) -> ssl.SSLContext:
    """The keyless listener: mutual TLS as the edge expects it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(KEYLESS_TLS12_CIPHERS)  # TLS 1.3 suites are not affected by this list
    ctx.verify_mode = ssl.CERT_REQUIRED
    _load_chain(ctx, cert, key)
    _load_ca(ctx, client_ca)
    # Tickets would let a stolen ticket key resume sessions; the edge keeps long-lived
    # connections, so resumption buys nothing.
    ctx.options |= ssl.OP_NO_TICKET
    return ctx


def keyless_client_context(
    ca: Path | None, cert: Path | None, key: Path | None, *, check_hostname: bool = True
) -> ssl.SSLContext:
    """A keyless client (our tools, tests, benchmark): verifies the key server."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(KEYLESS_TLS12_CIPHERS)
    ctx.check_hostname = check_hostname
    if ca is not None:
        _load_ca(ctx, ca)
    else:
        ctx.load_default_certs()
    if cert is not None:
        _load_chain(ctx, cert, key or cert)
    return ctx


def _load_chain(ctx: ssl.SSLContext, cert: Path, key: Path) -> None:
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except FileNotFoundError as e:
        raise TLSConfigError(f"cannot read certificate or key: {e.filename}") from None
    except ssl.SSLError as e:
        raise TLSConfigError(
            f"certificate {cert} and key {key} do not form a usable pair ({e.reason})"
        ) from None


def _load_ca(ctx: ssl.SSLContext, ca: Path) -> None:
    try:
        ctx.load_verify_locations(cafile=str(ca))
    except FileNotFoundError:
        raise TLSConfigError(f"cannot read CA file {ca}") from None
    except ssl.SSLError as e:
        raise TLSConfigError(f"CA file {ca} holds no usable certificate ({e.reason})") from None


def grpc_server_credentials(cert: Path, key: Path, client_ca: Path) -> grpc.ServerCredentials:
    """Signer side of the Signer API: a client certificate is required."""
    return grpc.ssl_server_credentials(
        [(_read(key, "key"), _read(cert, "certificate"))],
        root_certificates=_read(client_ca, "client CA"),
        require_client_auth=True,
    )


def grpc_server_certificate(
    cert: Path, key: Path, client_ca: Path
) -> grpc.ServerCertificateConfiguration:
    """The signer's certificate, key and client CA, for reloadable credentials."""
    return grpc.ssl_server_certificate_configuration(
        [(_read(key, "key"), _read(cert, "certificate"))],
        root_certificates=_read(client_ca, "client CA"),
    )


def grpc_reloadable_server_credentials(
    initial: grpc.ServerCertificateConfiguration,
    fetch: Callable[[], grpc.ServerCertificateConfiguration | None],
) -> grpc.ServerCredentials:
    """Like :func:`grpc_server_credentials`, but gRPC calls ``fetch`` before each new
    connection's handshake; a configuration it returns replaces the current one from
    then on (established connections keep theirs), None keeps it."""
    # grpc-stubs types the fetcher without None, which gRPC documents as "no change".
    return grpc.dynamic_ssl_server_credentials(
        initial,
        fetch,  # type: ignore[arg-type]
        require_client_authentication=True,
    )


def grpc_channel_credentials(ca: Path, cert: Path, key: Path) -> grpc.ChannelCredentials:
    """Caller side of the Signer API."""
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca, "CA"),
        private_key=_read(key, "key"),
        certificate_chain=_read(cert, "certificate"),
    )


def peer_identity(der_cert: bytes | None) -> str:
    """A short, log-safe name for a peer certificate: its subject CN and serial."""
    if not der_cert:
        return "-"
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        cert = x509.load_der_x509_certificate(der_cert)
    except ValueError:
        return "unparsable-certificate"
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = cns[0].value if cns else ""
    return f"CN={cn!s} serial={cert.serial_number:x}"
