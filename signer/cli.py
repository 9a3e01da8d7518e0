"""``keyward signer`` and ``keyward keys``."""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from signer.common.cli import CommandError, add_logging_flags
from signer.common.config import load_config
from signer.common.logs import setup_logging
from signer.config import SignerConfig

KEY_KINDS = ("rsa2048", "rsa3072", "p256", "p384", "ed25519")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "signer",
        help="run a signer: the Signer gRPC API over one PKCS#11 token",
        description="Serve the Signer API over one PKCS#11 token. Settings come from "
        "--config, then KEYWARD_* environment variables, then these flags.",
    )
    _token_flags(p)
    p.add_argument("--listen", help="host:port for the Signer API (default 127.0.0.1:2410)")
    p.add_argument("--unix-socket", type=Path, help="also serve on this Unix socket")
    p.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="plain TCP without TLS (local experiments only)",
    )
    p.add_argument("--tls-cert", type=Path)
    p.add_argument("--tls-key", type=Path)
    p.add_argument("--tls-ca", type=Path, help="CA that callers' certificates chain to")
    p.add_argument("--sessions", type=int, help="HSM sessions / worker threads")
    add_logging_flags(p)
    p.set_defaults(handler=run_signer)

    k = sub.add_parser("keys", help="generate, import and list keys on the signer's token")
    ksub = k.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    g = ksub.add_parser("generate", help="generate a key pair inside the token")
    g.add_argument("--type", required=True, choices=KEY_KINDS, dest="kind")
    g.add_argument("--label", required=True)
    _token_flags(g)
    g.set_defaults(handler=run_keys_generate)
    i = ksub.add_parser(
        "import",
        help="import a PEM/DER private key (e.g. from a gokeyless key directory) into the "
        "token as sensitive, non-extractable, with CKA_ID set to its SKI",
    )
    i.add_argument("--pem", required=True, type=Path)
    i.add_argument("--label", required=True)
    i.add_argument(
        "--password-env",
        metavar="NAME",
        help="environment variable holding the PEM's passphrase, if encrypted",
    )
    _token_flags(i)
    i.set_defaults(handler=run_keys_import)
    ls = ksub.add_parser("list", help="list the keys the signer would serve")
    ls.add_argument("--json", action="store_true")
    _token_flags(ls)
    ls.set_defaults(handler=run_keys_list)
    for parser in (g, i, ls):
        add_logging_flags(parser)

    from signer.bench import register as register_signer_bench

    register_signer_bench(sub)


def _token_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", type=Path, help="YAML config file")
    p.add_argument(
        "--pkcs11-uri",
        help="pkcs11: URI of the token (PIN via pin-source=file:... or env:..., never here)",
    )


def load_signer_config(args: argparse.Namespace) -> SignerConfig:
    uri = getattr(args, "pkcs11_uri", None)
    if uri and "pin-value=" in uri:
        # argv is visible to every user of the machine (ps, /proc): no PINs there.
        raise CommandError(
            "--pkcs11-uri: do not put pin-value on the command line; use "
            "pin-source=file:/path or pin-source=env:NAME, or the config file"
        )
    overrides: dict[str, Any] = {
        "pkcs11_uri": uri,
        "listen": getattr(args, "listen", None),
        "unix_socket": getattr(args, "unix_socket", None),
        "insecure": getattr(args, "insecure", None),
        "tls.cert": getattr(args, "tls_cert", None),
        "tls.key": getattr(args, "tls_key", None),
        "tls.ca": getattr(args, "tls_ca", None),
        "sessions": getattr(args, "sessions", None),
        "log_level": getattr(args, "log_level", None),
        "log_format": getattr(args, "log_format", None),
    }
    return load_config(SignerConfig, path=args.config, overrides=overrides, section="signer")


def _need_pkcs11() -> None:
    try:
        import pkcs11  # noqa: F401
    except ImportError:
        raise CommandError(
            "python-pkcs11 is not installed: install keyward[signer] on signer hosts"
        ) from None


def _hsm_errors(
    handler: Callable[[argparse.Namespace], int],
) -> Callable[[argparse.Namespace], int]:
    """Report HSM, PIN and key-file failures in one line, as every CLI error is."""

    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        _need_pkcs11()
        from signer.hsm.admin import KeyImportError
        from signer.hsm.errors import HsmError
        from signer.hsm.uri import UriError

        try:
            return handler(args)
        except (HsmError, UriError, KeyImportError) as e:
            raise CommandError(str(e)) from None

    return run


@_hsm_errors
def run_signer(args: argparse.Namespace) -> int:
    config = load_signer_config(args)
    setup_logging(config.log_level, config.log_format)
    from signer.server import main

    # SIGHUP reads the same sources again: the file, the environment, these flags.
    return main(config, reload=lambda: load_signer_config(args))


def _open_admin(args: argparse.Namespace) -> Any:
    _need_pkcs11()
    config = load_signer_config(args)
    from signer.hsm.pool import Token

    return Token(config.pkcs11_uri, sessions=1)


@_hsm_errors
def run_keys_generate(args: argparse.Namespace) -> int:
    from signer.hsm import admin

    token = _open_admin(args)
    try:
        info = admin.generate_key(token, args.kind, args.label)
    finally:
        token.close()
    print(json.dumps(_describe(info)))
    return 0


@_hsm_errors
def run_keys_import(args: argparse.Namespace) -> int:
    from signer.hsm import admin

    password = None
    if args.password_env:
        value = os.environ.get(args.password_env)
        if value is None:
            raise CommandError(f"--password-env: {args.password_env} is not set")
        password = value.encode()
    try:
        pem = args.pem.read_bytes()
    except OSError as e:
        raise CommandError(f"--pem: cannot read {args.pem}: {e.strerror}") from None
    token = _open_admin(args)
    try:
        info = admin.import_pem(token, pem, args.label, password=password)
    finally:
        token.close()
    print(json.dumps(_describe(info)))
    return 0


@_hsm_errors
def run_keys_list(args: argparse.Namespace) -> int:
    token = _open_admin(args)
    try:
        keys = token.keys()
    finally:
        token.close()
    if args.json:
        print(json.dumps([_describe(k) for k in keys], indent=2))
    else:
        for k in keys:
            d = _describe(k)
            print(f"{d['ski']}  {d['type']:<8} {d['size']:<10} {d['label']}")
        if not keys:
            print("no keys on this token", file=sys.stderr)
    return 0


def _describe(info: Any) -> dict[str, Any]:
    from cryptography.hazmat.primitives import serialization

    from signer.v1 import signer_pb2 as pb

    size = info.curve or f"{info.bits} bits"
    return {
        "ski": info.ski.hex(),
        "label": info.label,
        "type": pb.KeyType.Name(info.key_type).removeprefix("KEY_TYPE_").lower(),
        "size": size,
        "algorithms": [pb.Algorithm.Name(a) for a in info.algorithms],
        "public_key_pem": serialization.load_der_public_key(info.spki)
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode(),
    }
