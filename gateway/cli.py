"""``keyward gateway``, ``demo``, ``ping``, ``test-keyserver`` and ``bench``."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from signer.common.cli import CommandError, add_logging_flags
from signer.common.config import load_config
from signer.common.logs import setup_logging
from signer.common.tls import keyless_client_context


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the gateway's subcommands to the ``keyward`` command."""
    g = sub.add_parser(
        "gateway",
        help="run the keyless gateway (Cloudflare's keyless protocol -> Signer API)",
        description="Serve Cloudflare's keyless protocol over mutual TLS and send each "
        "operation to a signer. Settings come from --config, then KEYWARD_* environment "
        "variables, then these flags.",
    )
    g.add_argument("--config", "-c", type=Path, help="YAML config file")
    g.add_argument("--port", type=int, help="keyless port (default 2407)")
    g.add_argument("--bind-address", help="listen address (default 127.0.0.1)")
    g.add_argument(
        "--signer",
        action="append",
        dest="signers",
        metavar="HOST:PORT",
        help="a signer address (repeatable; replaces the config's list)",
    )
    add_logging_flags(g)
    g.set_defaults(handler=run_gateway)

    d = sub.add_parser(
        "demo",
        help="run the whole key server locally on a SoftHSM2 token it creates",
    )
    d.add_argument("--state-dir", type=Path, default=Path(".keyward/demo"))
    d.add_argument("--port", type=int, default=2407, help="gateway port (default 2407)")
    add_logging_flags(d)
    d.set_defaults(handler=run_demo)

    p = sub.add_parser("ping", help="ping a keyless server over mutual TLS")
    p.add_argument("address", metavar="HOST:PORT")
    _client_flags(p)
    p.add_argument("--payload", default="keyward ping")
    p.add_argument("--count", type=int, default=1)
    add_logging_flags(p)
    p.set_defaults(handler=run_ping)

    t = sub.add_parser(
        "test-keyserver",
        help="run and verify every applicable operation for every key against a key server "
        "(works against gokeyless too); prints a JSON summary",
    )
    t.add_argument("--keyserver", required=True, metavar="HOST:PORT")
    t.add_argument(
        "--cert-directory",
        required=True,
        type=Path,
        help="directory of .pubkey (PEM SPKI) and .crt/.pem certificate files",
    )
    _client_flags(t)
    t.add_argument("--repeats", type=int, default=1, help="run the whole set this many times")
    t.add_argument(
        "--skip",
        action="append",
        default=[],
        metavar="PREFIX",
        help="skip operations whose name starts with PREFIX (repeatable), e.g. "
        "--skip rsa-decrypt-raw against gokeyless, which lacks opcode 0x08",
    )
    add_logging_flags(t)
    t.set_defaults(handler=run_test_keyserver)

    from gateway.bench import register_bench
    from gateway.benchsuite import register_bench_suite
    from gateway.devinit import register_dev_init
    from gateway.init import register_init
    from gateway.migrate import register_migrate
    from gateway.probe import register_health
    from gateway.tracecost import register_tracecost

    register_bench(sub)
    register_bench_suite(sub)
    register_tracecost(sub)
    # Deployment commands (deploy/, docs/migrating-from-gokeyless.md).
    for add in (register_dev_init, register_health, register_init, register_migrate):
        add(sub)


def _client_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ca", type=Path, help="CA the key server's certificate chains to")
    p.add_argument("--cert", type=Path, help="client certificate")
    p.add_argument("--key", type=Path, help="client key")
    p.add_argument("--server-name", help="name to verify in the server certificate")
    p.add_argument("--timeout", type=float, default=10.0)


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise CommandError(f"expected HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def client_context(args: argparse.Namespace) -> Any:
    return keyless_client_context(args.ca, args.cert, args.key)


def run_gateway(args: argparse.Namespace) -> int:
    from gateway.app import main
    from gateway.config import GatewayConfig

    overrides: dict[str, Any] = {
        "port": args.port,
        "bind_address": args.bind_address,
        "signers": args.signers,
        "log_level": args.log_level,
        "log_format": args.log_format,
    }
    config = load_config(GatewayConfig, path=args.config, overrides=overrides, section="gateway")
    setup_logging(config.log_level, config.log_format)
    # SIGHUP reads the same sources again: the file, the environment, these flags.
    return main(
        config,
        reload=lambda: load_config(
            GatewayConfig, path=args.config, overrides=overrides, section="gateway"
        ),
    )


def run_demo(args: argparse.Namespace) -> int:
    from gateway.demo import run

    return run(args.state_dir, args.port)


def run_ping(args: argparse.Namespace) -> int:
    from gateway.client import KeylessClient

    host, port = split_address(args.address)

    async def go() -> int:
        import time

        ctx = client_context(args)
        async with await KeylessClient.connect(
            host, port, ctx, server_hostname=args.server_name or host, timeout=args.timeout
        ) as c:
            payload = args.payload.encode()
            for _ in range(args.count):
                t0 = time.perf_counter()
                got = await c.ping(payload, timeout=args.timeout)
                ms = (time.perf_counter() - t0) * 1e3
                if got != payload:
                    print(f"pong from {args.address}: payload differs", file=sys.stderr)
                    return 1
                print(f"pong from {args.address}: {len(got)} bytes in {ms:.2f} ms")
        return 0

    return asyncio.run(go())


def run_test_keyserver(args: argparse.Namespace) -> int:
    from gateway.client import KeylessClient
    from gateway.selfcheck import check_key, load_key_dir

    host, port = split_address(args.keyserver)
    keys = load_key_dir(args.cert_directory)
    if not keys:
        raise CommandError(f"no .pubkey or certificate files in {args.cert_directory}")

    async def go() -> dict[str, Any]:
        ctx = client_context(args)
        summary: dict[str, Any] = {
            "keyserver": args.keyserver,
            "success": 0,
            "failure": 0,
            "ping": False,
            "keys": {},
            "failures": [],
        }
        async with await KeylessClient.connect(
            host, port, ctx, server_hostname=args.server_name or host, timeout=args.timeout
        ) as c:
            try:
                summary["ping"] = (
                    await c.ping(b"keyward test-keyserver") == b"keyward test-keyserver"
                )
            except Exception as e:  # reported, not raised: the summary is the product
                summary["failures"].append({"operation": "ping", "error": str(e)})
            summary["success" if summary["ping"] else "failure"] += 1
            for _ in range(args.repeats):
                for kf in keys:
                    entry = summary["keys"].setdefault(
                        kf.name, {"ski": kf.ski.hex(), "success": 0, "failure": 0}
                    )
                    checks = await check_key(c, kf, timeout=args.timeout, skip=tuple(args.skip))
                    for check in checks:
                        key = "success" if check.ok else "failure"
                        entry[key] += 1
                        summary[key] += 1
                        if not check.ok:
                            summary["failures"].append(
                                {"key": kf.name, "operation": check.operation, "error": check.error}
                            )
        return summary

    summary = asyncio.run(go())
    print(json.dumps(summary, indent=2))
    return 0 if summary["failure"] == 0 else 1
