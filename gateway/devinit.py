"""``keyward dev-init``: the state a development deployment starts from.

What ``keyward demo`` prepares for itself, laid out for services that run apart (the
one-shot ``init`` service of compose.yaml, or a developer's machine), in three
directories under ``--state-dir`` so each service mounts only what it needs:

``hsm/``
    ``softhsm2.conf``, the SoftHSM2 token directory, and ``token-pin`` (mode 0600),
    the token's user PIN, created at random. Mounted by the signers only.
``ca/``
    The development CA's certificate and private key. Mounted by nothing but init:
    whoever holds the CA key can mint certificates every service trusts.
``pki/``
    ``ca.pem``; the keyless server certificate ``gateway.pem`` (SANs: the
    ``--gateway-name`` values, localhost, 127.0.0.1, ::1); ``client.pem``, the
    keyless client certificate that stands in for Cloudflare's edge;
    ``gateway-signer-client.pem`` (CN keyward-gateway), the gateway's Signer API
    client certificate; ``NAME.pem`` for each ``--signer-name`` (SANs: NAME,
    localhost, 127.0.0.1); each with its ``-key.pem``; and ``keys/*.pubkey``, the
    public halves of the token's keys, for ``keyward test-keyserver``.

Everything is reused when present, so running it again (every ``docker compose up``)
changes nothing. This is development state: the PIN is random but sits in a file next
to the token, and the CA is local. Production brings its HSM, PINs and certificates.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from signer.common.cli import add_logging_flags

if TYPE_CHECKING:
    pass


def register_dev_init(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    d = sub.add_parser(
        "dev-init",
        help="create a SoftHSM2 token, demo keys and a local PKI for a development "
        "deployment (compose.yaml's init service), then exit",
    )
    d.add_argument("--state-dir", type=Path, default=Path(".keyward/dev"))
    d.add_argument(
        "--gateway-name",
        action="append",
        default=[],
        metavar="DNS",
        help="extra DNS name in the keyless server certificate (repeatable)",
    )
    d.add_argument(
        "--signer-name",
        action="append",
        default=[],
        metavar="NAME",
        help="issue NAME.pem with NAME as DNS SAN, for one signer (repeatable; default: signer)",
    )
    add_logging_flags(d)
    d.set_defaults(handler=run_dev_init)


def run_dev_init(args: argparse.Namespace) -> int:
    from gateway.demo import TOKEN_LABEL, export_public_keys, init_token

    state: Path = args.state_dir.resolve()
    demo = init_token(state / "hsm")
    keys = export_public_keys(demo, state / "pki" / "keys")
    init_pki(state, gateway_names=args.gateway_name, signer_names=args.signer_name or ["signer"])
    print(f"keyward dev-init: state in {state}")
    print(f"  token {TOKEN_LABEL!r}: {len(keys)} keys ({', '.join(sorted(keys))})")
    print(f"  SOFTHSM2_CONF={demo.env['SOFTHSM2_CONF']}")
    print(f"  pkcs11_uri: {demo.uri}")
    print(f"  certificates in {state / 'pki'}")
    return 0


def init_pki(state: Path, *, gateway_names: list[str], signer_names: list[str]) -> Path:
    from signer.common.pki import LocalCA

    pki = state / "pki"
    pki.mkdir(parents=True, exist_ok=True)
    ca = LocalCA.load_or_create(state / "ca", "Keyward Development CA")
    os.chmod(state / "ca", 0o700)
    shutil.copyfile(ca.cert_path, pki / "ca.pem")
    ca.issue(
        pki,
        "gateway",
        common_name="localhost",
        dns=(*gateway_names, "localhost"),
        ips=("127.0.0.1", "::1"),
        server=True,
    )
    ca.issue(pki, "client", common_name="keyless-client", client=True)
    ca.issue(pki, "gateway-signer-client", common_name="keyward-gateway", client=True)
    for name in signer_names:
        ca.issue(
            pki,
            name,
            common_name=name,
            dns=(name, "localhost"),
            ips=("127.0.0.1",),
            server=True,
        )
    return pki
