"""Real processes for multi-service tests: a local PKI, signers, gateways.

Everything here starts the same ``keyward`` commands an operator runs, with YAML
configs written to a temporary directory, and waits for their ``ready`` line.
"""

from __future__ import annotations

import http.client
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from softhsm import SoftHsmToken

from signer.common.pki import Issued, LocalCA
from signer.common.process import Service, keyward_argv


@dataclass
class Pki:
    directory: Path
    ca: LocalCA
    gateway: Issued
    client: Issued
    gateway_signer_client: Issued
    signer: Issued
    other_ca: LocalCA
    stranger: Issued  # a client certificate from another CA

    @property
    def ca_pem(self) -> Path:
        return self.ca.cert_path


def make_pki(directory: Path) -> Pki:
    ca = LocalCA.load_or_create(directory, "Keyward Test CA")
    other = LocalCA.load_or_create(directory / "other", "Some Other CA")
    return Pki(
        directory=directory,
        ca=ca,
        gateway=ca.issue(directory, "gateway", common_name="localhost", dns=("localhost",),
                         ips=("127.0.0.1", "::1"), server=True),
        client=ca.issue(directory, "client", common_name="keyless-client", client=True),
        gateway_signer_client=ca.issue(directory, "gw-client", common_name="keyward-gateway",
                                       client=True),
        signer=ca.issue(directory, "signer", common_name="signer", dns=("localhost",),
                        ips=("127.0.0.1",), server=True),
        other_ca=other,
        stranger=other.issue(directory / "other", "stranger", common_name="stranger",
                             client=True),
    )


@dataclass
class Cluster:
    """Signers and gateways started for one test; stopped by ``stop_all``."""

    directory: Path
    pki: Pki
    token: SoftHsmToken
    services: list[Service] = field(default_factory=list)
    counter: int = 0

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.token.env())
        env.update(extra or {})
        return env

    def start_signer(self, *, sessions: int = 2, listen: str = "127.0.0.1:0",
                     token: SoftHsmToken | None = None, env: dict[str, str] | None = None,
                     wrap: tuple[str, ...] = (), **settings: Any) -> Service:
        """``wrap`` prefixes the command (``("ip", "netns", "exec", NS)``)."""
        self.counter += 1
        name = f"signer-{self.counter}"
        tok = token or self.token
        cfg: dict[str, Any] = {
            "pkcs11_uri": tok.uri(),
            "listen": listen,
            "sessions": sessions,
            "tls": {"cert": str(self.pki.signer.cert), "key": str(self.pki.signer.key),
                    "ca": str(self.pki.ca_pem)},
            "key_refresh_interval": "1s",
            "metrics_listen": "127.0.0.1:0",
            "log_level": "debug",
        }
        cfg.update(settings)
        path = self.directory / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        svc = Service(name, [*wrap, *keyward_argv("signer", "--config", str(path))],
                      self.env(env), self.directory / f"{name}.log")
        self.services.append(svc)
        svc.wait_ready(60)
        return svc

    def start_gateway(self, signers: list[str], *, env: dict[str, str] | None = None,
                      **settings: Any) -> Service:
        self.counter += 1
        name = f"gateway-{self.counter}"
        cfg: dict[str, Any] = {
            "port": 0,
            "bind_address": "127.0.0.1",
            "auth_cert": str(self.pki.gateway.cert),
            "auth_key": str(self.pki.gateway.key),
            "cloudflare_ca_cert": str(self.pki.ca_pem),
            "signers": signers,
            "signer_tls": {"cert": str(self.pki.gateway_signer_client.cert),
                           "key": str(self.pki.gateway_signer_client.key),
                           "ca": str(self.pki.ca_pem)},
            "signer_server_name": "localhost",
            "metrics_port": 0,
            "log_level": "debug",
        }
        cfg.update(settings)
        path = self.directory / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        svc = Service(name, keyward_argv("gateway", "--config", str(path)),
                      self.env(env), self.directory / f"{name}.log")
        self.services.append(svc)
        svc.wait_ready(60)
        return svc

    def stop_all(self) -> None:
        for svc in reversed(self.services):
            svc.stop(timeout=10)
        self.services.clear()


def split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


T = TypeVar("T")


def http_get(address: str, path: str) -> tuple[int, str]:
    host, port = split(address)
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def eventually(check: Callable[[], T | None], what: str, timeout: float = 30.0) -> T:
    """Poll ``check`` until it returns something other than None (or fail)."""
    end = time.monotonic() + timeout
    while True:
        got = check()
        if got is not None:
            return got
        if time.monotonic() > end:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)
