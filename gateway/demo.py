"""``keyward demo``: the whole key server on one machine, on a SoftHSM2 token it makes.

State lives in one directory (default ``.keyward/demo``) and is reused on the next run:
the SoftHSM2 token and its PIN file, the keys, a local PKI, the services' YAML configs.
Two signer processes share the token; the gateway listens on 127.0.0.1:2407. Every
service is a real process started with the same ``keyward`` commands an operator runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gateway.client import KeylessClient
from gateway.selfcheck import check_key, load_key_dir
from signer.common.cli import CommandError
from signer.common.pki import LocalCA
from signer.common.process import Service, keyward_argv
from signer.common.tls import keyless_client_context

TOKEN_LABEL = "keyward-demo"  # noqa: S105 - a label, not a secret
DEMO_KEYS = {
    "rsa2048": "demo-rsa2048",
    "p256": "demo-p256",
    "p384": "demo-p384",
    "ed25519": "demo-ed25519",
}
SOFTHSM_PATHS = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)


def find_softhsm() -> Path:
    for p in SOFTHSM_PATHS:
        if Path(p).exists():
            return Path(p)
    raise CommandError("SoftHSM2 is not installed (apt-get install softhsm2)")


@dataclass(slots=True)
class Demo:
    state: Path
    module: Path
    env: dict[str, str]

    @property
    def pin_file(self) -> Path:
        return self.state / "token-pin"

    @property
    def uri(self) -> str:
        return (
            f"pkcs11:token={TOKEN_LABEL}?module-path={self.module}&pin-source=file:{self.pin_file}"
        )


def init_token(directory: Path) -> Demo:
    """The SoftHSM2 configuration, token, PIN file and demo keys under ``directory``
    (reused when present). ``keyward dev-init`` calls this too."""
    module = find_softhsm()
    (directory / "tokens").mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    conf = directory / "softhsm2.conf"
    if not conf.exists():
        conf.write_text(
            f"directories.tokendir = {directory / 'tokens'}\nobjectstore.backend = file\n"
            "log.level = ERROR\nslots.removable = false\n"
        )
    demo = Demo(directory, module, dict(os.environ, SOFTHSM2_CONF=str(conf)))
    if not demo.pin_file.exists():
        util = shutil.which("softhsm2-util")
        if util is None:
            raise CommandError("softhsm2-util not found (apt-get install softhsm2)")
        pin, so_pin = secrets.token_hex(8), secrets.token_hex(8)
        # softhsm2-util only takes PINs as arguments; this runs once, on a demo token.
        init = [util, "--init-token", "--free", "--label", TOKEN_LABEL]
        subprocess.run(
            [*init, "--pin", pin, "--so-pin", so_pin],
            env=demo.env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        fd = os.open(demo.pin_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(pin + "\n")
    existing = {k["label"] for k in _keys_list(demo)}
    for kind, label in DEMO_KEYS.items():
        if label not in existing:
            _keyward(
                demo, "keys", "generate", "--type", kind, "--label", label, "--pkcs11-uri", demo.uri
            )
    return demo


def export_public_keys(demo: Demo, keys_dir: Path) -> list[str]:
    """Write ``NAME.pubkey`` for each demo key (what test-keyserver reads)."""
    keys_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for k in _keys_list(demo):
        if k["label"] in DEMO_KEYS.values():
            name = k["label"].removeprefix("demo-")
            (keys_dir / f"{name}.pubkey").write_text(k["public_key_pem"])
            names.append(name)
    return names


def prepare(state: Path) -> Demo:
    """Create (or reuse) token, keys and PKI under ``state``."""
    state = state.resolve()
    demo = init_token(state)
    export_public_keys(demo, state / "keys")
    ca = LocalCA.load_or_create(state, "Keyward Demo CA")
    ca.issue(
        state,
        "gateway",
        common_name="localhost",
        dns=("localhost",),
        ips=("127.0.0.1", "::1"),
        server=True,
    )
    ca.issue(state, "client", common_name="keyless-client", client=True)
    ca.issue(state, "gateway-signer-client", common_name="keyward-gateway", client=True)
    for n in (1, 2):
        ca.issue(
            state,
            f"signer-{n}",
            common_name=f"signer-{n}",
            dns=("localhost",),
            ips=("127.0.0.1",),
            server=True,
        )
    return demo


def _keyward(demo: Demo, *args: str) -> str:
    proc = subprocess.run(
        keyward_argv(*args), env=demo.env, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise CommandError(f"keyward {' '.join(args[:2])} failed: {proc.stderr.strip()}")
    return proc.stdout


def _keys_list(demo: Demo) -> list[dict[str, Any]]:
    out = _keyward(demo, "keys", "list", "--json", "--pkcs11-uri", demo.uri)
    data: list[dict[str, Any]] = json.loads(out)
    return data


def write_configs(demo: Demo, port: int, signer_addresses: list[str] | None = None) -> None:
    s = demo.state
    for n in (1, 2):
        cfg = {
            "pkcs11_uri": demo.uri,
            "listen": "127.0.0.1:0",
            "tls": {
                "cert": str(s / f"signer-{n}.pem"),
                "key": str(s / f"signer-{n}-key.pem"),
                "ca": str(s / "ca.pem"),
            },
            "sessions": 2,
            "metrics_listen": "127.0.0.1:0",
        }
        (s / f"signer-{n}.yaml").write_text(yaml.safe_dump(cfg))
    gateway = {
        "bind_address": "127.0.0.1",
        "port": port,
        "auth_cert": str(s / "gateway.pem"),
        "auth_key": str(s / "gateway-key.pem"),
        "cloudflare_ca_cert": str(s / "ca.pem"),
        "signers": signer_addresses or [],
        "signer_tls": {
            "cert": str(s / "gateway-signer-client.pem"),
            "key": str(s / "gateway-signer-client-key.pem"),
            "ca": str(s / "ca.pem"),
        },
        "signer_server_name": "localhost",
        "metrics_port": 0,
    }
    (s / "gateway.yaml").write_text(yaml.safe_dump(gateway))


async def self_check(demo: Demo, address: str) -> list[str]:
    host, _, port = address.rpartition(":")
    s = demo.state
    ctx = keyless_client_context(s / "ca.pem", s / "client.pem", s / "client-key.pem")
    failures: list[str] = []
    async with await KeylessClient.connect(
        host.strip("[]"), int(port), ctx, server_hostname="localhost"
    ) as client:
        if await client.ping(b"keyward demo") != b"keyward demo":
            failures.append("ping: payload not echoed")
        for kf in load_key_dir(s / "keys"):
            for c in await check_key(client, kf):
                if not c.ok:
                    failures.append(f"{c.key} {c.operation}: {c.error}")
    return failures


class LocalCluster:
    """Two signers on the demo token and a gateway in front of them, as processes.

    ``keyward demo`` runs one until stopped; the benchmarks start one per run.
    ``env`` is added to every service's environment (the benchmarks use it for
    OTEL_* settings).
    """

    def __init__(
        self, demo: Demo, port: int, *, signers: int = 2, env: dict[str, str] | None = None
    ) -> None:
        self.demo = demo
        self.port = port
        self.count = signers
        self.env = dict(demo.env, **(env or {}))
        self.signers: list[Service] = []
        self.gateway: Service | None = None

    @property
    def services(self) -> list[Service]:
        return [*self.signers, *([self.gateway] if self.gateway else [])]

    def start(self) -> str:
        """Start everything; returns the gateway's keyless address."""
        demo = self.demo
        logs = demo.state / "logs"
        logs.mkdir(exist_ok=True)
        write_configs(demo, self.port)
        for n in range(1, self.count + 1):
            self.signers.append(
                Service(
                    f"signer-{n}",
                    keyward_argv(
                        "signer", "--config", str(demo.state / f"signer-{(n - 1) % 2 + 1}.yaml")
                    ),
                    self.env,
                    logs / f"signer-{n}.log",
                )
            )
        addresses = [svc.wait_ready(60) for svc in self.signers]
        write_configs(demo, self.port, addresses)
        self.gateway = Service(
            "gateway",
            keyward_argv("gateway", "--config", str(demo.state / "gateway.yaml")),
            self.env,
            logs / "gateway.log",
        )
        return self.gateway.wait_ready(60)

    def stop(self) -> None:
        for svc in reversed(self.services):
            with contextlib.suppress(Exception):
                svc.stop()

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run(state: Path, port: int) -> int:
    demo = prepare(state)
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with LocalCluster(demo, port) as cluster:
        gateway_address = cluster.start()
        signers = cluster.signers
        gw = cluster.gateway
        assert gw is not None
        services = cluster.services
        failures = asyncio.run(self_check(demo, gateway_address))
        if failures:
            raise CommandError("self-check failed: " + "; ".join(failures))
        info = {
            "gateway": gateway_address,
            "gateway_metrics": gw.fields.get("metrics", ""),
            "signers": [
                {
                    "name": svc.name,
                    "address": svc.address,
                    "metrics": svc.fields.get("metrics", ""),
                    "pid": svc.proc.pid,
                    "log": str(svc.log),
                }
                for svc in signers
            ],
            "ca": str(demo.state / "ca.pem"),
            "client_cert": str(demo.state / "client.pem"),
            "client_key": str(demo.state / "client-key.pem"),
            "signer_api": {
                "ca": str(demo.state / "ca.pem"),
                "cert": str(demo.state / "gateway-signer-client.pem"),
                "key": str(demo.state / "gateway-signer-client-key.pem"),
                "server_name": "localhost",
            },
            "keys": str(demo.state / "keys"),
            "token": {
                "label": TOKEN_LABEL,
                "softhsm2_conf": demo.env["SOFTHSM2_CONF"],
                "pin_file": str(demo.pin_file),
            },
        }
        (demo.state / "demo.json").write_text(json.dumps(info, indent=2) + "\n")
        s = demo.state
        print(f"keyward demo: state in {s}")
        for svc in signers:
            print(f"  {svc.name}: Signer API on {svc.address} (pid {svc.proc.pid}, log {svc.log})")
        print(f"  gateway:  keyless on {gateway_address} (pid {gw.proc.pid}, log {gw.log})")
        print(
            f"  metrics:  gateway http://{gw.fields.get('metrics', '')}/metrics; signers "
            + ", ".join(f"http://{svc.fields.get('metrics', '')}/metrics" for svc in signers)
        )
        print("  self-check: ping and every operation of every key verified")
        print("try it:")
        print(
            f"  keyward ping {gateway_address} --ca {s}/ca.pem --cert {s}/client.pem "
            f"--key {s}/client-key.pem"
        )
        print(
            f"  keyward test-keyserver --keyserver {gateway_address} --cert-directory {s}/keys "
            f"--ca {s}/ca.pem --cert {s}/client.pem --key {s}/client-key.pem"
        )
        print(f"ready gateway={gateway_address} state={s}", flush=True)
        while not stop:
            for svc in services:
                if svc.proc.poll() is not None:
                    raise CommandError(
                        f"{svc.name} exited with {svc.proc.returncode}; see {svc.log}"
                    )
            time.sleep(0.2)
        print("keyward demo: stopping")
        return 0
