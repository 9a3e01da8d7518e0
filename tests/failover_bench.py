"""The failover figure: a signer killed (SIGKILL) under a steady keyless load.

    .venv/bin/python tests/failover_bench.py --rate 2000 --duration 20 \
        [--json] [--write docs/benchmarks.md]

Builds everything on this machine, as the test suite does: a fresh SoftHSM2 token
with one P-256 key, a local PKI, two ``keyward signer`` processes (2 sessions each)
and one ``keyward gateway``, all real processes with mutual TLS. Then it runs
``keyward bench``'s steady mode (``gateway.bench.SteadyLoad``: requests on a fixed
schedule over ``--connections`` connections, latency counted from each request's due
time, a sample of signatures verified) and, half-way through, kills one signer with
SIGKILL: no drain, no NOT_SERVING, its streams simply break. It reports the requests
that failed (the target is 0) and the latency of the whole run and of the requests
due around the kill, beside a baseline run of the same length with no kill. With
``--write`` it replaces its section of docs/benchmarks.md (between the
``failover-bench`` markers), keeping the others.

Not collected by pytest (no ``test_`` prefix); it lives here to reuse the test
harness. The load generator shares the machine with the services it measures.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import threading
import time
from bisect import bisect_left, bisect_right
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import grpc
from harness import Cluster, make_pki, split
from softhsm import create_token, unavailable_reason

from gateway.bench import SteadyLoad, run_steady
from signer.common.benchdoc import percentile, write_section
from signer.common.tls import keyless_client_context
from signer.hsm import admin
from signer.hsm.pool import Token

START_MARKER = "<!-- failover-bench:start -->"
END_MARKER = "<!-- failover-bench:end -->"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _window(load: SteadyLoad, start: float, end: float) -> dict[str, float]:
    """Latency of the requests due between ``start`` and ``end`` (perf_counter)."""
    pairs = sorted(zip(load.due, load.latencies, strict=True))
    dues = [d for d, _ in pairs]
    chosen = sorted(lat * 1e3 for _, lat in pairs[bisect_left(dues, start):bisect_right(dues, end)])
    return {
        "requests": len(chosen),
        "p50_ms": round(percentile(chosen, 0.5), 3),
        "p99_ms": round(percentile(chosen, 0.99), 3),
        "max_ms": round(chosen[-1], 3) if chosen else 0.0,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    reason = unavailable_reason()
    if reason is not None:
        raise SystemExit(f"cannot run: {reason}")
    work = Path(tempfile.mkdtemp(prefix="keyward-failover-"))
    token = create_token(work / "softhsm")
    os.environ["SOFTHSM2_CONF"] = str(token.conf_path)
    with Token(token.uri(), sessions=1) as tok:
        public_key = admin.generate_key(tok, "p256", "failover-p256").public_key()
    pki = make_pki(work / "pki")
    ctx = keyless_client_context(pki.ca_pem, pki.client.cert, pki.client.key)
    report: dict[str, Any] = {
        "machine": f"{os.cpu_count()} CPUs, {_cpu_model()}, {platform.system()} "
                   f"{platform.machine()}",
        "python": platform.python_version(),
        "rate": args.rate,
        "duration_s": args.duration,
        "connections": args.connections,
        "signers": 2,
        "signer_sessions": 2,
    }
    for phase in ("baseline", "kill"):
        cluster = Cluster(work / phase, pki, token)
        cluster.directory.mkdir()
        try:
            # Key refresh at its production default (10 s), not the tests' 1 s.
            signers = [cluster.start_signer(sessions=2, key_refresh_interval="10s",
                                            log_level="info") for _ in range(2)]
            gw = cluster.start_gateway([s.address for s in signers], log_level="info")
            host, port = split(gw.address)
            loads: list[SteadyLoad] = []
            out: dict[str, Any] = {}

            def drive(host: str = host, port: int = port, loads: list[SteadyLoad] = loads,
                      out: dict[str, Any] = out) -> None:
                out["result"] = asyncio.run(run_steady(
                    host, port, ctx, operation="ecdsa-sha256", public_key=public_key,
                    connections=args.connections, rate=args.rate, duration=args.duration,
                    server_name="localhost", keep=loads))

            thread = threading.Thread(target=drive)
            thread.start()
            time.sleep(args.duration / 2)
            killed_at = time.perf_counter()
            if phase == "kill":
                signers[1].kill()
            thread.join()
            result = out["result"]
            entry: dict[str, Any] = asdict(result)
            entry["around_kill"] = _window(loads[0], killed_at - 0.5, killed_at + 2.0)
            report[phase] = entry
            print(f"{phase}: {result.text()}", file=sys.stderr)
            print(f"{phase}: requests due from 0.5 s before to 2 s after the "
                  f"{'kill' if phase == 'kill' else 'half-way mark'}: {entry['around_kill']}",
                  file=sys.stderr)
        finally:
            cluster.stop_all()
    return report


def markdown(report: dict[str, Any], command: str) -> str:
    base, kill = report["baseline"], report["kill"]

    def row(name: str, r: dict[str, Any], window: str) -> str:
        w = r["around_kill"]
        return (
            f"| {name} | {r['sent']:,} | **{r['failed']}** | {r['p50_ms']:.1f} | "
            f"{r['p99_ms']:.1f} | {r['p999_ms']:.1f} | **{r['max_ms']:.0f}** | "
            f"{w['requests']:,} {window}: p99 {w['p99_ms']:.1f}, max {w['max_ms']:.0f} |"
        )

    met = "met" if kill["failed"] == 0 else "**not met**"
    lines = [
        START_MARKER,
        "## Failover: a signer killed under a steady load (`tests/failover_bench.py`)",
        "",
        f"- Command: `{command}`",
        f"- Date: {report['date']}",
        f"- Machine: {report['machine']}; Python {report['python']}, grpcio {grpc.__version__}",
        f"- Setup: 2 `keyward signer` processes ({report['signer_sessions']} HSM sessions "
        "each, one SoftHSM2 token, the same P-256 key) behind one `keyward gateway`, all on "
        "127.0.0.1 with mutual TLS. Load: ECDSA P-256 signatures at a steady "
        f"{report['rate']:,.0f} ops/s over {report['connections']} keyless connections for "
        f"{report['duration_s']:.0f} s (`keyward bench --rate`'s open-loop mode, "
        "`gateway.bench.SteadyLoad`); latency counted from each request's *due* time, so "
        "a stall shows in full; every 50th signature verified. Half-way through, one "
        "signer gets SIGKILL (no drain, no NOT_SERVING: its streams just break). The "
        "baseline is the same run without the kill. The load generator, the gateway and "
        "both signers share the machine's cores.",
        "",
        "| run | requests | failed | p50 ms | p99 ms | p99.9 ms | max ms | requests due "
        "0.5 s before to 2 s after the kill (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
        row("baseline (no kill)", base, "at the half-way mark"),
        row("one signer killed", kill, "around the kill"),
        "",
        f"Target: 0 failed requests during the kill: {met}. After the kill the surviving "
        f"signer carries all {report['rate']:,.0f} ops/s; the worst latency of the run "
        "is the figure to compare with the baseline's, which shows what this machine "
        "does without any failure.",
        END_MARKER,
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=2000.0, help="requests a second")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per run")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--write", type=Path, metavar="MARKDOWN",
                        help="replace this file's failover-bench section with the figures")
    args = parser.parse_args()
    report = run(args)
    report["date"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    if args.json:
        print(json.dumps(report, indent=2))
    if args.write is not None:
        command = (f".venv/bin/python tests/failover_bench.py --rate {args.rate:g} "
                   f"--duration {args.duration:g} --connections {args.connections} "
                   f"--write {args.write}")
        write_section(args.write, markdown(report, command), START_MARKER, END_MARKER)
    return 0 if report["kill"]["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
