"""``keyward bench``: a keyless load generator.

Opens N mutual-TLS connections to a key server, keeps a fixed number of requests in
flight on each, and runs for a set time. A sample of the answers is verified against
the key's public half; a wrong answer or an error reply counts as an error, never as
throughput. Reports ops/s and p50/p90/p99/max latency as text, or JSON with --json.

With ``--rate N`` it runs open-loop instead (:class:`SteadyLoad`): N requests a second
on a fixed schedule, whatever the answers do, and every request is accounted for (an
answer, an error reply, or lost with its connection). Latency is measured from when a
request was *due*, so a stall on the server side shows in full rather than as a pause
in sending. This is the mode for failure drills: kill a signer while it runs and read
the failures and the worst latency (tests/failover_bench.py does exactly that).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import ssl
import threading
import time
from array import array
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from gateway.client import KeylessClient
from gateway.protocol import ErrorCode, Op, Operation, Response, encode_packet
from gateway.selfcheck import PublicKey, ski_of, verify
from signer.common.benchdoc import percentile
from signer.common.cli import CommandError, add_logging_flags
from signer.common.runtime import run, settle_heap
from signer.common.tls import keyless_client_context

OPERATIONS: dict[str, tuple[int, str]] = {
    "ping": (Op.PING, ""),
    "ecdsa-sha256": (Op.ECDSA_SIGN_SHA256, "sha256"),
    "ecdsa-sha384": (Op.ECDSA_SIGN_SHA384, "sha384"),
    "rsa-sha256": (Op.RSA_SIGN_SHA256, "sha256"),
    "rsa-pss-sha256": (Op.RSA_PSS_SIGN_SHA256, "sha256"),
    "ed25519": (Op.ED25519_SIGN, ""),
}
MESSAGE = b"Hello!"


@dataclass(slots=True)
class Result:
    operation: str
    connections: int
    in_flight: int
    duration_s: float
    ops: int
    errors: int
    verified: int
    ops_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float

    def text(self) -> str:
        return (
            f"{self.operation}: {self.ops_per_s:,.0f} ops/s over {self.duration_s:.1f}s "
            f"({self.connections} connections x {self.in_flight} in flight); "
            f"latency p50 {self.p50_ms:.3f} ms, p90 {self.p90_ms:.3f} ms, "
            f"p99 {self.p99_ms:.3f} ms, max {self.max_ms:.3f} ms; "
            f"{self.errors} errors, {self.verified} answers verified"
        )


class _Worker:
    """One connection: keeps ``depth`` requests in flight until ``stop_at``."""

    def __init__(
        self,
        client: KeylessClient,
        body: bytes,
        depth: int,
        stop_at: float,
        check: Any,
        verify_every: int,
        latencies: array[float],
    ) -> None:
        self.client = client
        self.body = body  # the packet with a zero id; the id is patched per request
        self.depth = depth
        self.stop_at = stop_at
        self.check = check
        self.verify_every = verify_every
        self.latencies = latencies
        self.sent: dict[int, float] = {}
        self.next_id = 0
        self.errors = 0
        self.verified = 0
        self.done = asyncio.get_running_loop().create_future()
        self.count = 0

    def start(self) -> None:
        for _ in range(self.depth):
            self._send()

    def _send(self) -> None:
        rid = self.next_id
        self.next_id = (rid + 1) & 0xFFFFFFFF
        b = self.body
        packet = b[:4] + rid.to_bytes(4, "big") + b[8:]
        self.sent[rid] = time.perf_counter()
        self.client.submit(rid, packet, self._on_response)

    def _on_response(self, resp: Response | None) -> None:
        now = time.perf_counter()
        if resp is None:
            self.errors += 1
            if not self.done.done():
                self.done.set_result(None)
            return
        t0 = self.sent.pop(resp.request_id, now)
        self.latencies.append(now - t0)
        self.count += 1
        if resp.opcode not in (Op.RESPONSE, Op.PONG):
            self.errors += 1
        elif self.count % self.verify_every == 0:
            if self.check(resp.payload):
                self.verified += 1
            else:
                self.errors += 1
        if now < self.stop_at:
            self._send()
        elif not self.sent and not self.done.done():
            self.done.set_result(None)


async def run_load(
    host: str,
    port: int,
    ctx: ssl.SSLContext,
    *,
    operation: str,
    public_key: PublicKey | None,
    connections: int,
    in_flight: int,
    duration: float,
    warmup: float = 1.0,
    server_name: str | None = None,
    verify_every: int = 100,
) -> Result:
    body, check = request_body(operation, public_key)

    clients = [
        await KeylessClient.connect(host, port, ctx, server_hostname=server_name or host)
        for _ in range(connections)
    ]
    try:
        if warmup > 0:
            await _phase(clients, body, in_flight, warmup, check, verify_every)
        latencies, errors, verified, elapsed = await _phase(
            clients, body, in_flight, duration, check, verify_every
        )
    finally:
        await asyncio.gather(*(c.close() for c in clients))
    ms = sorted(x * 1e3 for x in latencies)
    return Result(
        operation=operation,
        connections=connections,
        in_flight=in_flight,
        duration_s=round(elapsed, 3),
        ops=len(ms),
        errors=errors,
        verified=verified,
        ops_per_s=round(len(ms) / elapsed, 1) if elapsed else 0.0,
        p50_ms=round(percentile(ms, 0.50), 3),
        p90_ms=round(percentile(ms, 0.90), 3),
        p99_ms=round(percentile(ms, 0.99), 3),
        max_ms=round(ms[-1], 3) if ms else 0.0,
    )


async def _phase(
    clients: list[KeylessClient],
    body: bytes,
    depth: int,
    duration: float,
    check: Any,
    verify_every: int,
) -> tuple[array[float], int, int, float]:
    latencies: array[float] = array("d")
    start = time.perf_counter()
    workers = [
        _Worker(c, body, depth, start + duration, check, verify_every, latencies) for c in clients
    ]
    for w in workers:
        w.start()
    await asyncio.wait_for(asyncio.gather(*(w.done for w in workers)), duration + 30)
    elapsed = time.perf_counter() - start
    return (
        latencies,
        sum(w.errors for w in workers),
        sum(w.verified for w in workers),
        elapsed,
    )


@dataclass(slots=True)
class SteadyResult:
    operation: str
    rate: float
    duration_s: float
    sent: int
    ok: int
    failed: int  # error replies, wrong answers, and requests lost with a connection
    verified: int
    errors: dict[str, int]
    p50_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float

    def text(self) -> str:
        errors = ", ".join(f"{k} {v}" for k, v in sorted(self.errors.items())) or "none"
        return (
            f"{self.operation} at {self.rate:,.0f} ops/s for {self.duration_s:.1f}s: "
            f"{self.sent} sent, {self.ok} ok, {self.failed} failed ({errors}); latency from "
            f"due time p50 {self.p50_ms:.2f} ms, p99 {self.p99_ms:.2f} ms, "
            f"p99.9 {self.p999_ms:.2f} ms, max {self.max_ms:.2f} ms; "
            f"{self.verified} answers verified"
        )


class SteadyLoad:
    """Requests at a fixed rate, round-robin over ``clients``, each one accounted for.

    Open loop: request *i* is due at ``start + i / rate`` and leaves at the first tick
    (2 ms) after that, unless ``max_in_flight`` requests are already waiting, in which
    case it waits too (and its latency, counted from the due time, says so). ``stop``
    (a ``threading.Event``, so another thread can end the run) ends it early. When the
    sending ends, answers are awaited for ``drain`` seconds; what is still missing then
    counts as failed ("unanswered").
    """

    def __init__(
        self,
        clients: list[KeylessClient],
        body: bytes,
        rate: float,
        *,
        check: Any,
        operation: str = "",
        verify_every: int = 50,
        max_in_flight: int = 8192,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.clients = clients
        self.body = body
        self.rate = rate
        self.check = check
        self.operation = operation
        self.verify_every = verify_every
        self.max_in_flight = max_in_flight
        self.latencies: array[float] = array("d")
        self.due: array[float] = array("d")  # when each answered request was due
        self.started = 0.0
        self.sent = 0
        self.ok = 0
        self.failed = 0
        self.verified = 0
        self.errors: dict[str, int] = {}
        self.in_flight = 0
        self._next_ids = [0] * len(clients)
        self._pending: list[dict[int, float]] = [{} for _ in clients]

    def _send(self, index: int, due: float) -> None:
        c = index % len(self.clients)
        rid = self._next_ids[c]
        self._next_ids[c] = (rid + 1) & 0xFFFFFFFF
        b = self.body
        self._pending[c][rid] = due
        self.in_flight += 1
        self.sent += 1
        self.clients[c].submit(
            rid, b[:4] + rid.to_bytes(4, "big") + b[8:], lambda r: self._answer(c, rid, r)
        )

    def _answer(self, c: int, rid: int, resp: Response | None) -> None:
        due = self._pending[c].pop(rid, None)
        if due is None:
            return
        self.in_flight -= 1
        self.latencies.append(time.perf_counter() - due)
        self.due.append(due)
        if resp is None:
            self._fail("connection closed")
        elif resp.opcode == Op.ERROR:
            code = resp.payload[0] if resp.payload else 0
            try:
                name = ErrorCode(code).name
            except ValueError:
                name = f"0x{code:02x}"
            self._fail(name)
        elif resp.opcode not in (Op.RESPONSE, Op.PONG):
            self._fail("unexpected opcode")
        else:
            self.ok += 1
            if self.ok % self.verify_every == 0:
                if self.check(resp.payload):
                    self.verified += 1
                else:
                    self.ok -= 1
                    self._fail("wrong answer")

    def _fail(self, why: str) -> None:
        self.failed += 1
        self.errors[why] = self.errors.get(why, 0) + 1

    async def run(
        self, duration: float, *, stop: threading.Event | None = None, drain: float = 15.0
    ) -> SteadyResult:
        start = self.started = time.perf_counter()
        i = 0
        rate = self.rate
        while True:
            now = time.perf_counter()
            elapsed = now - start
            if elapsed >= duration or (stop is not None and stop.is_set()):
                break
            due_count = int(elapsed * rate) + 1
            while i < due_count and self.in_flight < self.max_in_flight:
                self._send(i, start + i / rate)
                i += 1
            await asyncio.sleep(0.002)
        sending = time.perf_counter() - start
        end = time.perf_counter() + drain
        while self.in_flight and time.perf_counter() < end:
            await asyncio.sleep(0.01)
        for pending in self._pending:
            for _ in range(len(pending)):
                self._fail("unanswered")
            pending.clear()
        self.in_flight = 0
        ms = sorted(x * 1e3 for x in self.latencies)
        return SteadyResult(
            operation=self.operation,
            rate=rate,
            duration_s=round(sending, 3),
            sent=self.sent,
            ok=self.ok,
            failed=self.failed,
            verified=self.verified,
            errors=dict(self.errors),
            p50_ms=round(percentile(ms, 0.50), 3),
            p99_ms=round(percentile(ms, 0.99), 3),
            p999_ms=round(percentile(ms, 0.999), 3),
            max_ms=round(ms[-1], 3) if ms else 0.0,
        )


def request_body(operation: str, public_key: PublicKey | None) -> tuple[bytes, Any]:
    """The packet (id 0) for ``operation`` on ``public_key``, and its answer check."""
    opcode, hash_name = OPERATIONS[operation]
    ski = ski_of(public_key) if public_key is not None else b""
    if opcode == Op.PING:
        payload = MESSAGE
    elif hash_name:
        payload = hashlib.new(hash_name, MESSAGE).digest()
    else:
        payload = MESSAGE
    if opcode != Op.PING and public_key is None:
        raise CommandError(f"--public-key is required for {operation}")
    body = encode_packet(0, Operation(opcode=opcode, ski=ski, payload=payload))

    def check(output: bytes) -> bool:
        if opcode == Op.PING:
            return output == payload
        assert public_key is not None
        try:
            verify(public_key, operation, MESSAGE, output, b"")
        except Exception:
            return False
        return True

    return body, check


async def run_steady(
    host: str,
    port: int,
    ctx: ssl.SSLContext,
    *,
    operation: str,
    public_key: PublicKey | None,
    connections: int,
    rate: float,
    duration: float,
    server_name: str | None = None,
    stop: threading.Event | None = None,
    keep: list[SteadyLoad] | None = None,
) -> SteadyResult:
    """``keep``, if given, receives the SteadyLoad (for its per-request timeline)."""
    body, check = request_body(operation, public_key)
    clients = [
        await KeylessClient.connect(host, port, ctx, server_hostname=server_name or host)
        for _ in range(connections)
    ]
    try:
        load = SteadyLoad(clients, body, rate, check=check, operation=operation)
        if keep is not None:
            keep.append(load)
        return await load.run(duration, stop=stop)
    finally:
        await asyncio.gather(*(c.close() for c in clients))


def load_public_key(path: Path) -> PublicKey:
    from cryptography import x509

    data = path.read_bytes()
    key: object
    if b"CERTIFICATE" in data:
        key = x509.load_pem_x509_certificate(data).public_key()
    else:
        key = serialization.load_pem_public_key(data)
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey):
        raise CommandError(f"{path}: not an RSA, EC or Ed25519 public key")
    return key


def register_bench(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    b = sub.add_parser("bench", help="keyless load generator: ops/s and latency percentiles")
    b.add_argument("--keyserver", required=True, metavar="HOST:PORT")
    b.add_argument("--operation", choices=sorted(OPERATIONS), default="ecdsa-sha256")
    b.add_argument(
        "--public-key", type=Path, help="the key to use: its .pubkey (PEM) or certificate"
    )
    b.add_argument("--connections", type=int, default=32)
    b.add_argument("--in-flight", type=int, default=8, help="requests in flight per connection")
    b.add_argument("--duration", type=float, default=10.0, help="seconds (after a 1 s warm-up)")
    b.add_argument(
        "--rate",
        type=float,
        help="steady mode: this many requests a second on a fixed schedule (no warm-up); "
        "reports failures and latency from each request's due time",
    )
    b.add_argument("--ca", type=Path)
    b.add_argument("--cert", type=Path)
    b.add_argument("--key", type=Path, help="client certificate's key")
    b.add_argument("--server-name")
    b.add_argument("--json", action="store_true")
    add_logging_flags(b)
    b.set_defaults(handler=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    from gateway.cli import split_address

    host, port = split_address(args.keyserver)
    ctx = keyless_client_context(args.ca, args.cert, args.key)
    pub = load_public_key(args.public_key) if args.public_key else None
    settle_heap()  # the load generator tunes its collector as the services do
    if args.rate is not None:
        if args.rate <= 0:
            raise CommandError("--rate must be positive")
        steady = run(
            run_steady(
                host,
                port,
                ctx,
                operation=args.operation,
                public_key=pub,
                connections=args.connections,
                rate=args.rate,
                duration=args.duration,
                server_name=args.server_name,
            )
        )
        print(json.dumps(asdict(steady)) if args.json else steady.text())
        return 0 if steady.failed == 0 else 1
    result = run(
        run_load(
            host,
            port,
            ctx,
            operation=args.operation,
            public_key=pub,
            connections=args.connections,
            in_flight=args.in_flight,
            duration=args.duration,
            server_name=args.server_name,
        )
    )
    print(json.dumps(asdict(result)) if args.json else result.text())
    return 0 if result.errors == 0 else 1


def cpu_count() -> int:
    return os.cpu_count() or 1
