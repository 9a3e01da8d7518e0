"""``keyward init``: the key server's certificate from Cloudflare, as gokeyless does it.

The keyless listener presents a certificate that Cloudflare issues for the key
server's hostname. gokeyless (``cmd/gokeyless/initialize.go``) gets it by generating
an ECDSA P-384 key and a CSR (CN "Keyless Server Authentication Certificate", SAN the
hostname) and POSTing ``{"request_type": "keyless-certificate", "hostnames": [...],
"zone_id": ..., "csr": ...}`` to ``https://api.cloudflare.com/client/v4/certificates/``
with the Origin CA key in ``X-Auth-User-Service-Key``; the answer's
``result.certificate`` is the PEM certificate. This command does the same, with what
gokeyless lacks:

* an existing private key is never overwritten unless ``--force`` is given
  (gokeyless issue #46 regenerates it silently when the certificate is invalid);
  ``--reuse-key`` asks for a new certificate for the key already there;
* the key, CSR and certificate are written only once the API has answered, each
  atomically, so a failed request leaves the old files as they were;
* the Origin CA key comes from a file, an environment variable or a prompt, never the
  command line (argv is visible to every user of the machine);
* the certificate's expiry is reported, with a warning inside 30 days (as gokeyless
  warns at start), and ``--check`` exits 1 then, for a timer or a monitoring check;
* ``--csr-only`` is gokeyless's ``--manual-activation``: key and CSR, no API call.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from signer.common.cli import CommandError, add_logging_flags

DEFAULT_ENDPOINT = "https://api.cloudflare.com/client/v4/certificates/"
CSR_COMMON_NAME = "Keyless Server Authentication Certificate"
KEY_ENV = "KEYWARD_ORIGIN_CA_API_KEY"
GOKEYLESS_KEY_ENV = "KEYLESS_ORIGIN_CA_API_KEY"  # what gokeyless reads, accepted as well
WARN_DAYS = 30
_LOOPBACK = {"127.0.0.1", "::1", "localhost"}


def register_init(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "init",
        # No prefix matching: `--origin-ca-key SECRET` must be an error, not a file
        # name taken from --origin-ca-key-file (and echoed back in a message).
        allow_abbrev=False,
        help="get the key server certificate from Cloudflare's API (gokeyless's "
        "initialisation), or check the one in place",
        description="Generate an ECDSA P-384 key and a CSR for --hostname, have Cloudflare "
        "issue the keyless server certificate with the Origin CA key, and write key, CSR "
        "and certificate. An existing key is kept unless --force. The Origin CA key is "
        f"read from --origin-ca-key-file, from ${KEY_ENV} (or ${GOKEYLESS_KEY_ENV}), or "
        "asked for on a terminal.",
    )
    p.add_argument("--config", "-c", type=Path, help="gateway YAML: hostname, auth_cert, auth_key")
    p.add_argument("--hostname", help="the key server's hostname (the certificate's SAN)")
    p.add_argument("--zone-id", help="Cloudflare zone id")
    p.add_argument("--auth-cert", type=Path, help="certificate to write (default server.pem)")
    p.add_argument("--auth-key", type=Path, help="key to write (default server-key.pem)")
    p.add_argument("--auth-csr", type=Path, help="CSR to write (default server.csr)")
    p.add_argument("--origin-ca-key-file", type=Path, help="file holding the Origin CA key")
    p.add_argument(
        "--endpoint",
        default=DEFAULT_ENDPOINT,
        help="certificates API endpoint (https, or http to a loopback address for tests)",
    )
    p.add_argument("--timeout", type=float, default=30.0)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--force", action="store_true", help="replace the key and certificate even if present"
    )
    mode.add_argument(
        "--reuse-key", action="store_true", help="request a new certificate for the existing key"
    )
    mode.add_argument(
        "--csr-only",
        action="store_true",
        help="write the key (kept if present) and CSR, and stop: for a certificate issued "
        "outside the API (gokeyless --manual-activation)",
    )
    mode.add_argument(
        "--check",
        action="store_true",
        help="only check the certificate: exit 1 if missing, not matching the key, "
        f"expired or expiring within {WARN_DAYS} days",
    )
    add_logging_flags(p)
    p.set_defaults(handler=run_init)


@dataclass(slots=True)
class Files:
    hostname: str | None
    cert: Path
    key: Path
    csr: Path


@dataclass(slots=True)
class CertState:
    key_exists: bool
    cert_exists: bool
    problem: str | None  # why the pair is not usable, or None
    not_after: dt.datetime | None
    hostnames: list[str]

    @property
    def usable(self) -> bool:
        return self.problem is None

    def days_left(self) -> float | None:
        if self.not_after is None:
            return None
        return (self.not_after - dt.datetime.now(dt.UTC)).total_seconds() / 86400


def run_init(args: argparse.Namespace) -> int:
    files = _files(args)
    state = inspect(files.cert, files.key)
    if args.check:
        return _report(files, state, check=True)
    if args.csr_only:
        return _csr_only(files, state)
    if state.usable and not (args.force or args.reuse_key):
        print(f"keyward init: {files.cert} is in place; nothing to do (--force to replace it)")
        return _report(files, state, check=False)
    if state.key_exists and not (args.force or args.reuse_key):
        raise CommandError(
            f"{files.key} exists and the certificate is not usable ({state.problem}); "
            "refusing to overwrite the key: --reuse-key requests a certificate for it, "
            "--force replaces it"
        )
    if args.reuse_key and not state.key_exists:
        raise CommandError(f"--reuse-key: {files.key} does not exist")
    if not files.hostname:
        raise CommandError("--hostname (or hostname in --config) is required")
    if not args.zone_id:
        raise CommandError("--zone-id is required")
    endpoint = _check_endpoint(args.endpoint)
    api_key = _origin_ca_key(args.origin_ca_key_file)

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if args.reuse_key:
        key = _load_key(files.key)
        new_key = False
    else:
        key = ec.generate_private_key(ec.SECP384R1())
        new_key = True
    csr_pem = build_csr(key, files.hostname)
    cert_pem = request_certificate(
        endpoint, api_key, files.hostname, args.zone_id, csr_pem, timeout=args.timeout
    )
    _check_issued(cert_pem, key, files.hostname)
    if new_key:
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        # --force is the only way here with a key present (checked above).
        _write(files.key, key_pem, 0o600, replace=args.force)
        print(f"keyward init: new P-384 key in {files.key}")
    _write(files.csr, csr_pem, 0o600, replace=True)
    _write(files.cert, cert_pem, 0o644, replace=True)
    print(f"keyward init: certificate from {endpoint} in {files.cert}")
    return _report(files, inspect(files.cert, files.key), check=False)


def _csr_only(files: Files, state: CertState) -> int:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if not files.hostname:
        raise CommandError("--hostname (or hostname in --config) is required")
    if state.key_exists:
        key = _load_key(files.key)
        print(f"keyward init: CSR for the existing key {files.key}")
    else:
        key = ec.generate_private_key(ec.SECP384R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        _write(files.key, pem, 0o600, replace=False)
        print(f"keyward init: new P-384 key in {files.key}")
    _write(files.csr, build_csr(key, files.hostname), 0o600, replace=True)
    print(f"keyward init: CSR in {files.csr}; put the certificate issued for it in {files.cert}")
    return 0


def _files(args: argparse.Namespace) -> Files:
    config: dict[str, Any] = {}
    if args.config is not None:
        try:
            loaded = yaml.safe_load(args.config.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise CommandError(f"--config: cannot read {args.config}: {e}") from None
        config = loaded if isinstance(loaded, dict) else {}

    def pick(flag: Path | None, key: str, default: str) -> Path:
        if flag is not None:
            return Path(flag)
        return Path(str(config.get(key) or default)).expanduser()

    return Files(
        hostname=args.hostname or config.get("hostname"),
        cert=pick(args.auth_cert, "auth_cert", "server.pem"),
        key=pick(args.auth_key, "auth_key", "server-key.pem"),
        csr=pick(args.auth_csr, "auth_csr", "server.csr"),
    )


def inspect(cert_path: Path, key_path: Path) -> CertState:
    """What is on disk: key, certificate, whether they match and are in date."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    state = CertState(key_path.exists(), cert_path.exists(), None, None, [])
    if not state.cert_exists:
        state.problem = f"{cert_path} does not exist"
        return state
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError) as e:
        state.problem = f"{cert_path} is not a PEM certificate ({e})"
        return state
    state.not_after = cert.not_valid_after_utc
    state.hostnames = _san_names(cert)
    now = dt.datetime.now(dt.UTC)
    if not state.key_exists:
        state.problem = f"{key_path} does not exist"
    elif now < cert.not_valid_before_utc:
        state.problem = f"the certificate is not valid before {cert.not_valid_before_utc:%Y-%m-%d}"
    elif now >= cert.not_valid_after_utc:
        state.problem = f"the certificate expired on {cert.not_valid_after_utc:%Y-%m-%d}"
    else:
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), None)
        except (OSError, ValueError, TypeError) as e:
            state.problem = f"{key_path} is not an unencrypted PEM private key ({e})"
            return state
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        der = serialization.Encoding.DER
        if key.public_key().public_bytes(der, spki) != cert.public_key().public_bytes(der, spki):
            state.problem = f"{cert_path} is not the certificate of {key_path}"
    return state


def _report(files: Files, state: CertState, *, check: bool) -> int:
    days = state.days_left()
    if not state.usable:
        print(f"keyward init: {state.problem}", file=sys.stderr)
        return 1
    assert state.not_after is not None and days is not None
    names = ", ".join(state.hostnames) or "no DNS names"
    until = f"{state.not_after:%Y-%m-%d %H:%M} UTC"
    line = f"{files.cert}: valid until {until} ({days:.0f} days; {names})"
    if days < WARN_DAYS:
        print(
            f"keyward init: warning: {line}: expires within {WARN_DAYS} days; renew with "
            "keyward init --reuse-key (or --force for a new key)",
            file=sys.stderr,
        )
        return 1 if check else 0
    if files.hostname and files.hostname not in state.hostnames:
        print(f"keyward init: warning: {files.hostname} is not among {names}", file=sys.stderr)
    print(f"keyward init: {line}")
    return 0


def _san_names(cert: Any) -> list[str]:
    from cryptography import x509

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    names: list[str] = san.get_values_for_type(x509.DNSName)
    names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return names


def build_csr(key: Any, hostname: str) -> bytes:
    """gokeyless's CSR: CN "Keyless Server Authentication Certificate", SAN the hostname."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    # cfssl (which gokeyless uses) puts an IP-address hostname in an iPAddress SAN.
    san: x509.GeneralName
    try:
        san = x509.IPAddress(ipaddress.ip_address(hostname))
    except ValueError:
        san = x509.DNSName(hostname)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CSR_COMMON_NAME)]))
        .add_extension(x509.SubjectAlternativeName([san]), critical=False)
        .sign(key, hashes.SHA384())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def request_certificate(
    endpoint: str, api_key: str, hostname: str, zone_id: str, csr_pem: bytes, *, timeout: float
) -> bytes:
    """POST the keyless-certificate request; the PEM certificate, or CommandError."""
    import urllib.error
    import urllib.request

    body = json.dumps(
        {
            "request_type": "keyless-certificate",
            "hostnames": [hostname],
            "zone_id": zone_id,
            "csr": csr_pem.decode(),
        }
    ).encode()
    request = urllib.request.Request(  # noqa: S310 - the scheme is checked by _check_endpoint
        endpoint,
        data=body,
        method="POST",
        headers={
            "Content-Type": "application/json",
            "X-Auth-User-Service-Key": api_key,
            "User-Agent": "keyward-init",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:  # noqa: S310
            status, raw = resp.status, resp.read(1 << 20)
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read(1 << 20)
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise CommandError(f"certificates API {endpoint}: {reason}") from None
    try:
        answer = json.loads(raw)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise CommandError(f"certificates API {endpoint}: HTTP {status}, not a JSON object")
    if status != 200 or not answer.get("success"):
        raise CommandError(
            f"certificates API refused the request (HTTP {status}): {_errors(answer)}"
        )
    result = answer.get("result")
    cert = result.get("certificate") if isinstance(result, dict) else None
    if not isinstance(cert, str) or "BEGIN CERTIFICATE" not in cert:
        raise CommandError("certificates API answered success without result.certificate")
    return cert.encode() if cert.endswith("\n") else (cert + "\n").encode()


def _errors(answer: dict[str, Any]) -> str:
    errors = answer.get("errors") or []
    shown = [
        f"{e.get('code', '?')}: {e.get('message', '')}" if isinstance(e, dict) else str(e)
        for e in errors
    ]
    return "; ".join(shown) or "no error given"


def _check_issued(cert_pem: bytes, key: Any, hostname: str) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise CommandError("the certificates API returned an unparsable certificate") from None
    der, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(der, spki) != key.public_key().public_bytes(der, spki):
        raise CommandError(
            "the certificate returned is not for the key in the CSR; nothing written"
        )
    if hostname not in _san_names(cert):
        print(
            f"keyward init: warning: the certificate does not name {hostname} "
            f"({', '.join(_san_names(cert)) or 'no SAN'})",
            file=sys.stderr,
        )


def _check_endpoint(endpoint: str) -> str:
    url = urllib.parse.urlsplit(endpoint)
    if url.scheme == "https" and url.hostname:
        return endpoint
    if url.scheme == "http" and url.hostname in _LOOPBACK:
        return endpoint  # a local stand-in for the API, as in the tests
    raise CommandError(
        f"--endpoint {endpoint!r}: must be https:// (the Origin CA key travels in a header)"
    )


def _origin_ca_key(path: Path | None) -> str:
    if path is not None:
        try:
            value = path.read_text().strip()
        except OSError as e:
            raise CommandError(f"--origin-ca-key-file: cannot read {path}: {e.strerror}") from None
        source = str(path)
    elif os.environ.get(KEY_ENV, "").strip():
        value, source = os.environ[KEY_ENV].strip(), KEY_ENV
    elif os.environ.get(GOKEYLESS_KEY_ENV, "").strip():
        value, source = os.environ[GOKEYLESS_KEY_ENV].strip(), GOKEYLESS_KEY_ENV
    elif sys.stdin.isatty():
        import getpass

        value, source = getpass.getpass("Cloudflare Origin CA key: ").strip(), "the terminal"
    else:
        raise CommandError(f"no Origin CA key: give --origin-ca-key-file, or set {KEY_ENV}")
    if not value:
        raise CommandError(f"the Origin CA key from {source} is empty")
    return value


def _load_key(path: Path) -> Any:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    try:
        key = serialization.load_pem_private_key(path.read_bytes(), None)
    except (OSError, ValueError, TypeError) as e:
        raise CommandError(f"--reuse-key: {path} is not an unencrypted PEM key ({e})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CommandError(f"--reuse-key: {path} is neither an ECDSA nor an RSA key")
    return key


def _write(path: Path, data: bytes, mode: int, *, replace: bool) -> None:
    """Write ``data`` atomically with ``mode``; never clobber unless ``replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not replace:
        # O_EXCL: a key that appeared since the check is kept, not overwritten.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
