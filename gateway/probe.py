"""``keyward health``: one health probe for container HEALTHCHECKs and exec probes.

Container images have no curl or grpc_health_probe, and the kubelet's built-in gRPC
probe cannot present a client certificate, while every Signer API port demands one.
So the probe is the ``keyward`` command itself:

* ``keyward health --signer unix:/run/keyward/signer.sock`` asks grpc.health.v1 over
  the signer's local Unix socket (plain gRPC; the socket's file permissions are its
  access control), or over mutual TLS on a TCP address with ``--ca/--cert/--key``;
* ``keyward health --http http://127.0.0.1:2406/healthz`` fetches an HTTP endpoint
  (the services' /healthz and /readyz).

Exit status 0 means healthy and 1 anything else, including a usage mistake: Docker
reserves status 2 for itself, so nothing here returns it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register_health(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    h = sub.add_parser(
        "health",
        help="probe a signer's gRPC health or an HTTP health endpoint (exit 0 when healthy)",
    )
    what = h.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--signer", metavar="ADDRESS", help="unix:/path (plain) or HOST:PORT (mutual TLS)"
    )
    what.add_argument("--http", metavar="URL", help="http://HOST:PORT/healthz or /readyz")
    h.add_argument("--service", default="", help="gRPC health service name (default: server)")
    h.add_argument("--ca", type=Path, help="CA the signer's certificate chains to")
    h.add_argument("--cert", type=Path, help="client certificate for the Signer API")
    h.add_argument("--key", type=Path, help="key of --cert")
    h.add_argument("--server-name", help="name to verify in the signer's certificate")
    h.add_argument("--timeout", type=float, default=3.0)
    h.add_argument("--quiet", "-q", action="store_true", help="print nothing when healthy")
    h.set_defaults(handler=run_health)


def run_health(args: argparse.Namespace) -> int:
    try:
        healthy, detail = _signer(args) if args.signer else _http(args.http, args.timeout)
    except Exception as e:  # a probe reports, it never raises: any failure is "unhealthy"
        healthy, detail = False, f"{type(e).__name__}: {e}"
    if not healthy or not args.quiet:
        print(
            f"{'healthy' if healthy else 'unhealthy'}: {detail}",
            file=sys.stdout if healthy else sys.stderr,
        )
    return 0 if healthy else 1


def _signer(args: argparse.Namespace) -> tuple[bool, str]:
    from grpc_health.v1 import health_pb2

    from signer.client import SyncSignerClient

    address: str = args.signer
    tls = (args.ca, args.cert, args.key)
    if address.startswith("unix:"):
        insecure = True
    elif all(tls):
        insecure = False
    else:
        return False, f"{address}: TCP needs --ca, --cert and --key (the Signer API is mTLS)"
    with SyncSignerClient(
        address,
        ca=args.ca,
        cert=args.cert,
        key=args.key,
        insecure=insecure,
        server_name=args.server_name,
        wait_for_ready=False,
    ) as client:
        status = client.health(args.service, timeout=args.timeout)
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    return status == health_pb2.HealthCheckResponse.SERVING, f"{address} {name}"


def _http(url: str, timeout: float) -> tuple[bool, str]:
    import urllib.error
    import urllib.request

    if not url.startswith(("http://", "https://")):
        return False, f"{url}: not an http:// or https:// URL"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - scheme checked
            body = resp.read(512).decode(errors="replace").strip()
            return resp.status == 200, f"{url} {resp.status} {body}"
    except urllib.error.HTTPError as e:
        body = e.read(512).decode(errors="replace").strip()
        return False, f"{url} {e.code} {body}"
