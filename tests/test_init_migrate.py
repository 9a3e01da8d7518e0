"""``keyward init`` and ``keyward migrate``, run as an operator runs them.

``keyward init`` talks to a local HTTP server that answers like Cloudflare's
certificates API (``POST /client/v4/certificates/``, the ``{"success", "errors",
"messages", "result"}`` envelope) and really issues the certificate for the CSR it
gets, from a test CA. ``keyward migrate`` reads gokeyless configurations; the
migrated configs then run a real signer and gateway on a SoftHSM2 token, with the
gokeyless key files imported into it, and answer keyless requests.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from softhsm import SoftHsmToken

from gateway.client import KeylessClient
from gateway.config import GatewayConfig
from gateway.selfcheck import check_key, load_key_dir
from signer.common.config import load_config
from signer.common.pki import LocalCA
from signer.common.process import Service, keyward_argv
from signer.common.tls import keyless_client_context
from signer.config import SignerConfig

ORIGIN_CA_KEY = "v1.0-0123456789abcdef-test-origin-ca-key"  # a test value, not a key
HOSTNAME = "keyless.example.test"
ZONE = "023e105f4ecef8ad9ca31a8372d0c353"


def keyward(*args: str, env: dict[str, str] | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("KEYWARD_", "KEYLESS_"))}
    base.update(env or {})
    return subprocess.run(keyward_argv(*args), capture_output=True, text=True, timeout=180,
                          env=base, cwd=cwd, stdin=subprocess.DEVNULL, check=False)


# -- a stand-in for Cloudflare's certificates API -----------------------------------------


@dataclass
class FakeCloudflare:
    """POST /client/v4/certificates/ with X-Auth-User-Service-Key, as the API answers."""

    ca: LocalCA
    ca_key: ec.EllipticCurvePrivateKey
    validity_days: int = 365
    refuse: bool = False
    requests: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""

    def answer(self, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, Any]]:
        request = json.loads(body)
        self.requests.append({"headers": headers, "body": request})
        if headers.get("x-auth-user-service-key") != ORIGIN_CA_KEY or self.refuse:
            return 403, {"success": False, "result": None, "messages": [],
                         "errors": [{"code": 10000, "message": "Authentication error"}]}
        csr = x509.load_pem_x509_csr(request["csr"].encode())
        assert csr.is_signature_valid
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(csr.subject)
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                       "Test Origin CA")]))
            .public_key(csr.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(days=self.validity_days))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName(h) for h in request["hostnames"]]), critical=False)
            .sign(self.ca_key, hashes.SHA256())
        )
        pem = cert.public_bytes(serialization.Encoding.PEM).decode()
        return 200, {
            "success": True, "errors": [], "messages": [],
            "result": {
                "id": "328578533902268680212849205732770752308931942346",
                "certificate": pem,
                "hostnames": request["hostnames"],
                "expires_on": cert.not_valid_after_utc.strftime("%Y-%m-%d %H:%M:%S +0000 UTC"),
                "request_type": request["request_type"],
                "requested_validity": self.validity_days,
                "csr": request["csr"],
            },
        }


@pytest.fixture
def api(tmp_path: Path) -> Iterator[FakeCloudflare]:
    ca = LocalCA.load_or_create(tmp_path / "origin-ca", "Test Origin CA")
    ca_key = serialization.load_pem_private_key(ca.key_path.read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    fake = FakeCloudflare(ca, ca_key)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            if self.path != "/client/v4/certificates/":
                self.send_error(404)
                return
            body = self.rfile.read(int(self.headers["Content-Length"]))
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, answer = fake.answer(headers, body)
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    fake.url = f"http://127.0.0.1:{server.server_address[1]}/client/v4/certificates/"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()


def init(api: FakeCloudflare, directory: Path, *extra: str,
         key_file: bool = True) -> subprocess.CompletedProcess[str]:
    args = ["init", "--hostname", HOSTNAME, "--zone-id", ZONE, "--endpoint", api.url]
    if key_file:
        secret = directory / "origin-ca-key"
        if not secret.exists():
            secret.write_text(ORIGIN_CA_KEY + "\n")
            secret.chmod(0o600)
        args += ["--origin-ca-key-file", str(secret)]
    result = keyward(*args, *extra, cwd=directory)
    # The Origin CA key never shows, whatever happened.
    assert ORIGIN_CA_KEY not in result.stdout + result.stderr
    return result


def public_der(key: Any) -> bytes:
    return bytes(key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo))


# -- keyward init -------------------------------------------------------------------------


def test_init_gets_the_certificate_the_gokeyless_way(api: FakeCloudflare, tmp_path: Path) -> None:
    result = init(api, tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(api.requests) == 1
    sent = api.requests[0]
    assert sent["headers"]["x-auth-user-service-key"] == ORIGIN_CA_KEY
    assert sent["headers"]["content-type"] == "application/json"
    body = sent["body"]
    assert set(body) == {"request_type", "hostnames", "zone_id", "csr"}
    assert body["request_type"] == "keyless-certificate"
    assert body["hostnames"] == [HOSTNAME]
    assert body["zone_id"] == ZONE
    csr = x509.load_pem_x509_csr(body["csr"].encode())
    assert csr.subject.rfc4514_string() == "CN=Keyless Server Authentication Certificate"
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [HOSTNAME]
    # gokeyless's default file names, in the working directory.
    key = serialization.load_pem_private_key((tmp_path / "server-key.pem").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert (tmp_path / "server-key.pem").stat().st_mode & 0o777 == 0o600
    cert = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    assert public_der(cert.public_key()) == public_der(key.public_key())
    assert public_der(csr.public_key()) == public_der(key.public_key())
    assert (tmp_path / "server.csr").read_bytes() == body["csr"].encode()
    assert "valid until" in result.stdout and "365 days" in result.stdout

    # Run again: the pair is in place, nothing is requested or changed.
    before = (tmp_path / "server-key.pem").read_bytes()
    again = init(api, tmp_path)
    assert again.returncode == 0, again.stderr
    assert "nothing to do" in again.stdout
    assert len(api.requests) == 1
    assert (tmp_path / "server-key.pem").read_bytes() == before
    # --check agrees.
    check = keyward("init", "--check", cwd=tmp_path)
    assert check.returncode == 0, check.stderr


def test_init_never_overwrites_an_existing_key_without_force(
    api: FakeCloudflare, tmp_path: Path
) -> None:
    """gokeyless issue #46: an invalid certificate made it regenerate the key silently."""
    assert init(api, tmp_path).returncode == 0
    key_before = (tmp_path / "server-key.pem").read_bytes()
    (tmp_path / "server.pem").unlink()  # certificate lost (or expired)

    refused = init(api, tmp_path)
    assert refused.returncode == 2
    assert "refusing to overwrite the key" in refused.stderr
    assert "--reuse-key" in refused.stderr and "--force" in refused.stderr
    assert len(api.requests) == 1  # nothing was asked for
    assert (tmp_path / "server-key.pem").read_bytes() == key_before

    # --reuse-key: a new certificate for the same key.
    reused = init(api, tmp_path, "--reuse-key")
    assert reused.returncode == 0, reused.stderr
    assert (tmp_path / "server-key.pem").read_bytes() == key_before
    cert = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    key = serialization.load_pem_private_key(key_before, None)
    assert public_der(cert.public_key()) == public_der(key.public_key())

    # --force: a new key, deliberately.
    forced = init(api, tmp_path, "--force")
    assert forced.returncode == 0, forced.stderr
    assert (tmp_path / "server-key.pem").read_bytes() != key_before
    assert (tmp_path / "server-key.pem").stat().st_mode & 0o777 == 0o600
    assert len(api.requests) == 3


def test_init_warns_thirty_days_before_expiry(api: FakeCloudflare, tmp_path: Path) -> None:
    api.validity_days = 10
    result = init(api, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "expires within 30 days" in result.stderr
    check = keyward("init", "--check", cwd=tmp_path)
    assert check.returncode == 1
    assert "expires within 30 days" in check.stderr


def test_init_csr_only_is_the_manual_activation(tmp_path: Path) -> None:
    result = keyward("init", "--hostname", HOSTNAME, "--csr-only", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    key = serialization.load_pem_private_key((tmp_path / "server-key.pem").read_bytes(), None)
    csr = x509.load_pem_x509_csr((tmp_path / "server.csr").read_bytes())
    assert public_der(csr.public_key()) == public_der(key.public_key())
    assert not (tmp_path / "server.pem").exists()
    # Again: the key stays, the CSR is for it.
    before = (tmp_path / "server-key.pem").read_bytes()
    again = keyward("init", "--hostname", HOSTNAME, "--csr-only", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "server-key.pem").read_bytes() == before


def test_init_api_errors_leave_nothing_behind(api: FakeCloudflare, tmp_path: Path) -> None:
    api.refuse = True
    result = init(api, tmp_path)
    assert result.returncode == 2
    assert "HTTP 403" in result.stderr and "10000: Authentication error" in result.stderr
    assert not (tmp_path / "server-key.pem").exists()
    assert not (tmp_path / "server.pem").exists()
    assert not (tmp_path / "server.csr").exists()


def test_init_origin_ca_key_from_the_environment_and_paths_from_the_config(
    api: FakeCloudflare, tmp_path: Path
) -> None:
    (tmp_path / "gateway.yaml").write_text(yaml.safe_dump({
        "hostname": HOSTNAME, "auth_cert": str(tmp_path / "tls" / "ks.pem"),
        "auth_key": str(tmp_path / "tls" / "ks-key.pem")}))
    result = keyward("init", "--config", str(tmp_path / "gateway.yaml"), "--zone-id", ZONE,
                     "--endpoint", api.url, cwd=tmp_path,
                     env={"KEYWARD_ORIGIN_CA_API_KEY": ORIGIN_CA_KEY})
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "tls" / "ks.pem").exists() and (tmp_path / "tls" / "ks-key.pem").exists()
    assert api.requests[0]["body"]["hostnames"] == [HOSTNAME]


def test_init_refuses_a_plain_http_endpoint_and_a_missing_key(
    api: FakeCloudflare, tmp_path: Path
) -> None:
    plain = keyward("init", "--hostname", HOSTNAME, "--zone-id", ZONE, "--endpoint",
                    "http://api.example.com/client/v4/certificates/", cwd=tmp_path,
                    env={"KEYWARD_ORIGIN_CA_API_KEY": ORIGIN_CA_KEY})
    assert plain.returncode == 2
    assert "must be https://" in plain.stderr
    missing = init(api, tmp_path, key_file=False)
    assert missing.returncode == 2
    assert "no Origin CA key" in missing.stderr
    assert api.requests == []
    # There is no way to give the key as an argument.
    flag = keyward("init", "--origin-ca-key", ORIGIN_CA_KEY, cwd=tmp_path)
    assert flag.returncode == 2 and "unrecognized arguments" in flag.stderr


# -- keyward migrate ------------------------------------------------------------------------


def write_key(path: Path, key: Any, *, der: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    encoding = serialization.Encoding.DER if der else serialization.Encoding.PEM
    fmt = (serialization.PrivateFormat.PKCS8 if der
           else serialization.PrivateFormat.TraditionalOpenSSL)
    path.write_bytes(key.private_bytes(encoding, fmt, serialization.NoEncryption()))


@dataclass
class Gokeyless:
    directory: Path
    config: Path
    client: tuple[Path, Path]
    ca: Path
    public_keys: Path


def gokeyless_setup(tmp_path: Path, token: SoftHsmToken, **overrides: Any) -> Gokeyless:
    """An /etc/keyless as gokeyless's package lays it out, with relative paths."""
    etc = tmp_path / "etc-keyless"
    ca = LocalCA.load_or_create(etc / "ca", "Stand-in Keyless CA")
    ca.issue(etc, "server", common_name=HOSTNAME, dns=(HOSTNAME, "localhost"),
             ips=("127.0.0.1",), server=True)
    (etc / "keyless_cacert.pem").write_bytes(ca.cert_path.read_bytes())
    client = ca.issue(tmp_path / "edge", "edge", common_name="edge", client=True)
    public = tmp_path / "public"
    public.mkdir()
    keys = [
        (etc / "keys" / "example.com.key", rsa.generate_private_key(65537, 2048), False),
        (etc / "keys" / "zone2" / "example.net.key", ec.generate_private_key(ec.SECP256R1()),
         True),
    ]
    for path, key, der in keys:
        write_key(path, key, der=der)
        (public / f"{path.stem}.pubkey").write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    (etc / "keys" / "README").write_text("not a key: only *.key files are loaded\n")
    config: dict[str, Any] = {
        "loglevel": 0,
        "hostname": HOSTNAME,
        "zone_id": ZONE,
        "origin_ca_api_key": ORIGIN_CA_KEY,
        "auth_cert": "server.pem",
        "auth_key": "server-key.pem",
        "cloudflare_ca_cert": "keyless_cacert.pem",
        "private_key_stores": [
            {"dir": "keys"},
            {"uri": token.uri(pin_value=token.user_pin)},
        ],
        "port": 2407,
        "metrics_port": 2406,
        "pid_file": "/var/run/gokeyless.pid",
        "sign_timeout": "1500ms",
        "sign_retry_count": 1,
        "tracing_enabled": True,
        "tracing_address": "localhost:6831",
        "tracing_sample_rate": 0.25,
    }
    config.update(overrides)
    path = etc / "gokeyless.yaml"
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return Gokeyless(etc, path, (client.cert, client.key), ca.cert_path, public)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_migrate_writes_configs_that_run_and_imports_the_key_files(
    softhsm: SoftHsmToken, tmp_path: Path
) -> None:
    gk = gokeyless_setup(tmp_path, softhsm)
    out = tmp_path / "etc-keyward"
    signer_address = f"127.0.0.1:{free_port()}"
    result = keyward("migrate", str(gk.config), "--out-dir", str(out),
                     "--signer-address", signer_address, "--import", env=softhsm.env())
    assert result.returncode == 0, result.stderr + result.stdout
    shown = result.stdout + result.stderr
    # Secrets are neither shown nor copied where they do not belong.
    assert softhsm.user_pin not in shown and ORIGIN_CA_KEY not in shown
    gateway_text = (out / "gateway.yaml").read_text()
    signer_text = (out / "signer.yaml").read_text()
    assert ORIGIN_CA_KEY not in gateway_text + signer_text
    assert softhsm.user_pin not in gateway_text + signer_text

    gateway = load_config(GatewayConfig, path=out / "gateway.yaml", env={}, section="gateway")
    assert gateway.hostname == HOSTNAME
    assert gateway.port == 2407 and gateway.bind_address == "0.0.0.0"
    assert gateway.auth_cert == gk.directory / "server.pem"
    assert gateway.auth_key == gk.directory / "server-key.pem"
    assert gateway.cloudflare_ca_cert == gk.directory / "keyless_cacert.pem"
    assert gateway.log_level == "debug"
    assert gateway.request_timeout == pytest.approx(3.0)  # 1500ms x (1 + 1 retry)
    assert gateway.signers == [signer_address]
    assert gateway.metrics_port == 2406
    assert gateway.tracing.enabled and gateway.tracing.sample_ratio == pytest.approx(0.25)

    signer = load_config(SignerConfig, path=out / "signer.yaml", env={}, section="signer")
    assert "pin-value" not in signer.pkcs11_uri
    assert f"pin-source=file:{out / 'signer.pin'}" in signer.pkcs11_uri
    assert (out / "signer.pin").read_text() == softhsm.user_pin + "\n"
    assert (out / "signer.pin").stat().st_mode & 0o777 == 0o600
    assert signer.listen == signer_address
    assert signer.allowed_clients == ["keyward-gateway"]

    for word in ("pid_file", "tracing_address", "origin_ca_api_key", "pin-value moved",
                 "request_timeout 3s", "keyward init --config"):
        assert word in result.stdout, word
    assert "example.com.key as 'example.com'" in result.stdout
    assert "example.net.key as 'zone2-example.net'" in result.stdout
    assert "README" not in result.stdout

    listed = keyward("keys", "list", "--json", "--config", str(out / "signer.yaml"),
                     env=softhsm.env())
    assert listed.returncode == 0, listed.stderr
    labels = {k["label"] for k in json.loads(listed.stdout)}
    assert {"example.com", "zone2-example.net"} <= labels

    # Run again with --import --force: the keys are on the token already, and that is fine.
    again = keyward("migrate", str(gk.config), "--out-dir", str(out), "--signer-address",
                    signer_address, "--import", "--force", env=softhsm.env())
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("already on the token") == 2

    # The migrated configs, as written, serve the gokeyless keys from the HSM. Only the
    # ports are moved off gokeyless's (2407/2406 may be taken on this machine).
    env = {k: v for k, v in softhsm.env().items() if not k.startswith("KEYWARD_")}
    signer_env = {**env, "KEYWARD_METRICS_LISTEN": "127.0.0.1:0"}
    gateway_env = {**env, "KEYWARD_METRICS_PORT": "0"}
    started = []
    try:
        s = Service("signer", keyward_argv("signer", "--config", str(out / "signer.yaml")),
                    signer_env, tmp_path / "signer.log")
        started.append(s)
        s.wait_ready(60)
        g = Service("gateway", keyward_argv("gateway", "--config", str(out / "gateway.yaml"),
                                            "--port", "0", "--bind-address", "127.0.0.1"),
                    gateway_env, tmp_path / "gateway.log")
        started.append(g)
        port = int(g.wait_ready(60).rpartition(":")[2])

        async def go() -> list[str]:
            ctx = keyless_client_context(gk.ca, *gk.client)
            async with await KeylessClient.connect("127.0.0.1", port, ctx,
                                                   server_hostname="localhost") as c:
                failures = []
                for kf in load_key_dir(gk.public_keys):
                    failures += [f"{x.key} {x.operation}: {x.error}"
                                 for x in await check_key(c, kf) if not x.ok]
                return failures

        assert asyncio.run(go()) == []
    finally:
        for svc in reversed(started):
            svc.stop(timeout=10)


def test_migrate_refuses_key_stores_keyward_cannot_serve(
    softhsm: SoftHsmToken, tmp_path: Path
) -> None:
    gk = gokeyless_setup(tmp_path, softhsm, private_key_stores=[
        {"uri": softhsm.uri()},
        {"uri": "https://example-vault.vault.azure.net/keys/edge/0123456789abcdef"},
        {"uri": "projects/p/locations/global/keyRings/r/cryptoKeys/k/cryptoKeyVersions/1"},
        {"dir": "keys", "file": "keys/example.com.key"},
    ])
    out = tmp_path / "out"
    result = keyward("migrate", str(gk.config), "--out-dir", str(out))
    assert result.returncode == 1
    assert "Azure Key Vault" in result.stderr
    assert "Google Cloud KMS" in result.stderr
    assert "exactly one of dir, file, uri" in result.stderr
    assert "nothing written" in result.stderr
    assert not out.exists()


def test_migrate_key_files_need_a_token(softhsm: SoftHsmToken, tmp_path: Path) -> None:
    gk = gokeyless_setup(tmp_path, softhsm, private_key_stores=[{"dir": "keys"}],
                         cert="server.pem", key="server-key.pem", ca_cert="keyless_cacert.pem")
    out = tmp_path / "out"
    no_token = keyward("migrate", str(gk.config), "--out-dir", str(out))
    assert no_token.returncode == 1
    assert "give --pkcs11-uri" in no_token.stderr
    pin_on_argv = keyward("migrate", str(gk.config), "--out-dir", str(out),
                          "--pkcs11-uri", softhsm.uri(pin_value=softhsm.user_pin))
    assert pin_on_argv.returncode == 2 and "pin-value" in pin_on_argv.stderr
    # With a token (its PIN from a file), and gokeyless's old key names.
    ok = keyward("migrate", str(gk.config), "--out-dir", str(out), "--pkcs11-uri",
                 softhsm.uri())
    assert ok.returncode == 0, ok.stderr
    assert "cert: the old gokeyless name of auth_cert" in ok.stdout
    assert "keyward keys import --pem" in ok.stdout
    signer = yaml.safe_load((out / "signer.yaml").read_text())
    assert signer["pkcs11_uri"] == softhsm.uri()
    # Written once; a second run does not overwrite without --force.
    again = keyward("migrate", str(gk.config), "--out-dir", str(out), "--pkcs11-uri",
                    softhsm.uri())
    assert again.returncode == 2 and "--force" in again.stderr


def test_migrate_several_uris_on_one_token_make_one_signer(
    softhsm: SoftHsmToken, tmp_path: Path
) -> None:
    gk = gokeyless_setup(tmp_path, softhsm, private_key_stores=[
        {"uri": softhsm.uri(object="k1", pin_value=softhsm.user_pin)},
        {"uri": softhsm.uri(id=b"\x02", pin_value=softhsm.user_pin)},
    ], unknown_setting=1)
    out = tmp_path / "out"
    result = keyward("migrate", str(gk.config), "--out-dir", str(out), "--no-signer-pki")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["gateway.yaml", "signer.pin", "signer.yaml"]
    uri = yaml.safe_load((out / "signer.yaml").read_text())["pkcs11_uri"]
    assert "object=" not in uri and "id=" not in uri
    assert "the signer serves every private key on the token" in result.stdout
    assert "unknown_setting: not a gokeyless setting" in result.stdout
    assert yaml.safe_load((out / "signer.yaml").read_text()).get("allowed_clients") is None


def test_go_durations() -> None:
    from gateway.migrate import go_duration

    assert go_duration("1m30s") == 90
    assert go_duration("500ms") == pytest.approx(0.5)
    assert go_duration("2h") == 7200
    with pytest.raises(ValueError):
        go_duration("5 seconds")
