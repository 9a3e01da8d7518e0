"""``keyward bench-suite``: the keyless figures of docs/benchmarks.md, reproducibly.

Starts what ``keyward demo`` starts (a SoftHSM2 token, two signer processes, the
gateway) in a fresh state directory, measures the direct-HSM baseline on the same token
(python-pkcs11 through the signer's Token, in a child process so the gateway package
never loads PKCS#11), then runs ``keyward bench``'s load generator for each case of the
issue's targets and writes the table between the keyless-bench markers.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from gateway.bench import Result, load_public_key, run_load
from gateway.demo import LocalCluster, prepare
from signer.common.benchdoc import write_section
from signer.common.cli import add_logging_flags
from signer.common.runtime import run, settle_heap
from signer.common.tls import keyless_client_context

START, END = "<!-- keyless-bench:start -->", "<!-- keyless-bench:end -->"

# (case, operation, key file, connections, in flight per connection, target ops/s)
CASES = [
    ("ECDSA P-256, 32 connections", "ecdsa-sha256", "p256", 32, 8, 8000.0),
    ("RSA-2048, 32 connections", "rsa-sha256", "rsa2048", 32, 4, 2000.0),
    ("ECDSA P-256, one request at a time", "ecdsa-sha256", "p256", 1, 1, None),
    ("ping, 32 connections (no signer)", "ping", "", 32, 8, None),
]

_DIRECT = r"""
import hashlib, json, sys, threading, time
from signer.hsm.pool import Job, Token
from signer.v1 import signer_pb2 as pb
uri, label, threads, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
alg = pb.ECDSA_SHA256 if "p256" in label else pb.RSA_PKCS1V15_SHA256
with Token(uri, sessions=threads) as token:
    key = next(k for k in token.keys() if k.label == label)
    job = Job.sign(key, alg, hashlib.sha256(b"Hello!").digest())
    counts = [0] * threads
    end = time.monotonic() + seconds
    def run(i):
        while time.monotonic() < end:
            token.submit([job] * 16).result()
            counts[i] += 16
    ts = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    t0 = time.monotonic()
    [t.start() for t in ts]; [t.join() for t in ts]
    print(json.dumps({"ops_per_s": sum(counts) / (time.monotonic() - t0)}))
"""


def direct_baseline(
    uri: str, env: dict[str, str], label: str, threads: int, seconds: float
) -> float:
    out = subprocess.run(
        [sys.executable, "-c", _DIRECT, uri, label, str(threads), str(seconds)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 60,
    )
    value: float = json.loads(out.stdout)["ops_per_s"]
    return value


def register_bench_suite(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "bench-suite",
        help="start a local gateway and two signers and measure the keyless figures "
        "(docs/benchmarks.md)",
    )
    p.add_argument("--duration", type=float, default=10.0, help="seconds per case")
    p.add_argument("--write", type=Path, metavar="FILE", help="e.g. docs/benchmarks.md")
    add_logging_flags(p)
    p.set_defaults(handler=run_bench_suite)


def run_bench_suite(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="keyward-bench-") as tmp:
        demo = prepare(Path(tmp))
        s = demo.state
        direct = {
            "ECDSA P-256, 1 thread": direct_baseline(demo.uri, demo.env, "demo-p256", 1, 5),
            "RSA-2048, 2 threads": direct_baseline(demo.uri, demo.env, "demo-rsa2048", 2, 5),
        }
        results: list[tuple[str, Result, float | None]] = []
        with LocalCluster(demo, 0) as cluster:
            host, _, port = cluster.start().rpartition(":")
            ctx = keyless_client_context(s / "ca.pem", s / "client.pem", s / "client-key.pem")
            settle_heap()  # the load generator tunes its collector as the services do
            for name, operation, key, conns, depth, target in CASES:
                pub = load_public_key(s / "keys" / f"{key}.pubkey") if key else None
                r = run(
                    run_load(
                        host,
                        int(port),
                        ctx,
                        operation=operation,
                        public_key=pub,
                        connections=conns,
                        in_flight=depth,
                        duration=args.duration,
                        server_name="localhost",
                    )
                )
                print(r.text(), flush=True)
                results.append((name, r, target))
    section = render(results, direct, args.duration)
    print(section)
    if args.write:
        write_section(args.write, section, START, END)
    return 0 if all(r.errors == 0 for _, r, _ in results) else 1


def render(
    results: list[tuple[str, Result, float | None]], direct: dict[str, float], duration: float
) -> str:
    cpu = _cpu_model()
    lines = [
        START,
        "## Keyless path: keyless client → gateway → 2 signers → SoftHSM2 (`keyward bench-suite`)",
        "",
        f"- Command: `keyward bench-suite --duration {duration:g} --write docs/benchmarks.md`",
        f"- Date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC; machine: {os.cpu_count()} CPUs"
        f" ({cpu}), Python {platform.python_version()}; load generator on the same machine.",
        "- Every answer counted; 1 in 100 verified against the public key; errors are errors.",
        "",
        "| case | ops/s | p50 ms | p90 ms | p99 ms | max ms | errors | target |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, r, target in results:
        goal = ""
        if target is not None:
            goal = f"≥ {target:,.0f} ops/s: {'met' if r.ops_per_s >= target else '**not met**'}"
        elif r.connections == 1 and r.operation != "ping":
            goal = f"p50 < 1 ms: {'met' if r.p50_ms < 1.0 else '**not met**'}"
        lines.append(
            f"| {name} | {r.ops_per_s:,.0f} | {r.p50_ms:.3f} | {r.p90_ms:.3f} | "
            f"{r.p99_ms:.3f} | {r.max_ms:.3f} | {r.errors} | {goal} |"
        )
    lines += [
        "",
        "Direct-HSM baseline on the same token (python-pkcs11 through `Token`, "
        "batches of 16, no gRPC):",
        "",
    ]
    lines += [f"- {k}: {v:,.0f} signatures/s" for k, v in direct.items()]
    lines += [
        "",
        "Raw results:",
        "",
        "```json",
        json.dumps([asdict(r) for _, r, _ in results], indent=1),
        "```",
        END,
    ]
    return "\n".join(lines)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
