"""Routing keyless operations to signers: key map, replica choice, failover, deadlines.

Every signer that serves an SKI is a replica of it. The router learns each signer's keys
from its WatchKeys feed and its health from grpc.health.v1 Watch, sends operations over
one Signer Stream per signer, and for each operation picks a replica by cost:

    cost = latency estimate x (operations outstanding + 1)

the estimate being a peak-sensitive EWMA of the signer's answer times (it jumps up to a
slow answer at once, comes down gradually, and decays towards zero while a signer gets
no traffic, so an idle or recovered signer is tried again). Between more than two
candidates the choice is power of two choices: two at random, the cheaper wins, which
keeps many gateways from herding onto the same signer.

Failures feed the same machinery. A retryable failure (UNAVAILABLE, RESOURCE_EXHAUSTED,
ABORTED, a broken stream, an attempt deadline) is counted against the replica as a
slow answer, and the operation is tried again on another replica while the request's
own deadline allows: every Signer operation is idempotent. ``eject_after`` failures in
a row (UNAVAILABLE, DEADLINE_EXCEEDED, ABORTED: the replica looks broken) eject the
replica for ``eject_time``, doubling with each ejection in a row up to
``_MAX_EJECT``; when the time is up it is on probation, one operation at a time, until
one succeeds. A signer that reports NOT_SERVING or whose stream breaks is not used at
all until it is connected and SERVING again, which also clears its ejection record.
Ejected replicas are still used when nothing else can serve a key: a guess beats a
certain failure.

Hedging (off by default): when an attempt has not been answered after ``hedge_delay``,
or after the ``hedge_percentile`` of recent answer times (whichever is later), the same
operation is sent to a second replica; the first answer wins and the other is ignored.
Hedges are limited to ``hedge_budget`` (a fraction of requests), so a slow period cannot
double the load.

Tracing: when the request is traced (its traceparent says "sampled"), each attempt is a
CLIENT span of its own under the gateway's request span, naming the signer and the
attempt number, and the signer's span hangs under that attempt: a retried or hedged
request shows every try.

Nothing here blocks or allocates a task per request: an operation is a small ``Call``
object, its completion a callback from the stream's reader task, and attempt deadlines
and hedge timers share one heap, swept every few milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import itertools
import logging
import math
import random
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.trace import SpanKind, Status, StatusCode

from gateway.discovery import Target
from signer.client import OperationStream, SignerClient, SignerError, status_code
from signer.common.spans import ParentIds, start_child
from signer.common.telemetry import Telemetry, parse_traceparent, traceparent
from signer.v1 import signer_pb2 as pb

log = logging.getLogger("keyward.gateway.router")

RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE.value[0],
        grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
        grpc.StatusCode.DEADLINE_EXCEEDED.value[0],
        grpc.StatusCode.ABORTED.value[0],
    }
)
# Failures that say "this replica is broken", as opposed to "busy" (RESOURCE_EXHAUSTED)
# or "this request is wrong" (INVALID_ARGUMENT, ...): only these count towards ejection,
# so no edge request, however malformed, can get a healthy signer ejected.
_BROKEN = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE.value[0],
        grpc.StatusCode.DEADLINE_EXCEEDED.value[0],
        grpc.StatusCode.ABORTED.value[0],
    }
)
_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]
_DEADLINE = grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
_NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]

Done = Callable[[pb.OperationResult], None]

# Latency estimate: what a signer never measured costs (5 ms: a fresh signer gets
# traffic at once, but not all of it before its first answers come back), the floor
# an idle signer's estimate decays to, the decay time constant, and the weight of one
# answer in the moving average.
_DEFAULT_RTT = 0.005
_RTT_FLOOR = 0.0002
_DECAY = 1.0
_ALPHA = 0.1
# A failure counts as an answer this slow (at least), so a signer that fails fast does
# not look fast and attract more traffic.
_FAILURE_PENALTY = 0.1
_MAX_EJECT = 30.0
# A replica removed from the configuration (or replaced after a TLS change) finishes
# its in-flight operations for at most this long before its stream is closed.
_RETIRE_GRACE = 10.0
_SWEEP = 0.02
_SWEEP_HEDGING = 0.005
_LATENCY_SAMPLES = 1024
_HEDGE_BURST = 20.0

_KIND_DEADLINE = 0
_KIND_HEDGE = 1


@dataclass(slots=True)
class SignerTLS:
    ca: Path | None
    cert: Path | None
    key: Path | None
    insecure: bool = False
    server_name: str | None = None

    def fingerprint(self) -> str:
        """A digest of the files' contents: replicas are rebuilt when it changes."""
        h = hashlib.sha256(b"insecure" if self.insecure else b"tls")
        for p in (self.ca, self.cert, self.key):
            h.update(b"\0")
            if p is not None and not self.insecure:
                h.update(p.read_bytes())
        return h.hexdigest()[:16]


@dataclass(slots=True)
class RouterSettings:
    """The knobs of routing and failover (gateway settings of the same names)."""

    request_timeout: float = 5.0
    attempt_timeout: float = 2.0
    max_attempts: int = 3
    eject_after: int = 5
    eject_time: float = 1.0
    hedge_delay: float = 0.0
    hedge_percentile: float = 0.0
    hedge_budget: float = 0.1

    @property
    def hedging(self) -> bool:
        return self.hedge_delay > 0 or self.hedge_percentile > 0


class Replica:
    """One signer: its connection, stream, key set, health and failure record."""

    def __init__(
        self,
        target: Target,
        tls: SignerTLS,
        tls_id: str,
        on_change: Callable[[], None],
        settings: RouterSettings,
    ) -> None:
        self.address = target.address
        self.server_name = target.server_name or tls.server_name
        self.source = target.source
        self.identity = (self.address, self.server_name, tls_id)
        self._tls = tls
        self._on_change = on_change
        self.client: SignerClient | None = None
        self.stream: OperationStream | None = None
        self.keys: dict[bytes, pb.Key] = {}
        self.serving = False
        self.signer_id = ""
        self._task: asyncio.Task[None] | None = None
        self._stream_broken = asyncio.Event()
        # Balancing and failure detection; all on the event loop thread.
        self._rtt = _DEFAULT_RTT
        self._stamp = time.monotonic()
        self.failures_in_a_row = 0
        self.ejections = 0  # ejections in a row, for the back-off
        self.ejected_until = 0.0
        self.probation = False
        self.probe_in_flight = False
        self.replaced_by: Replica | None = None
        self.eject_after = settings.eject_after
        self.eject_time = settings.eject_time
        # Counters, for metrics and the operator.
        self._sent_before = (0, 0)  # (messages, operations) of streams already closed
        self.answered = 0
        self.failed = 0
        self.hedges = 0

    @property
    def usable(self) -> bool:
        """Connected and SERVING (ejection is separate: see :meth:`healthy`)."""
        s = self.stream
        return self.serving and s is not None and not s.closed

    @property
    def outstanding(self) -> int:
        s = self.stream
        return s.in_flight if s is not None else 0

    @property
    def messages_sent(self) -> int:
        s = self.stream
        return self._sent_before[0] + (s.messages_sent if s is not None else 0)

    @property
    def operations_sent(self) -> int:
        s = self.stream
        return self._sent_before[1] + (s.operations_sent if s is not None else 0)

    def ejected(self, now: float) -> bool:
        return self.ejected_until > now

    def healthy(self, now: float) -> bool:
        """Usable, not ejected, and (on probation) with no probe already out."""
        if self.ejected_until > now:
            return False
        return not (self.probation and self.probe_in_flight)

    def latency(self, now: float) -> float:
        """The estimate, decayed for the time since the last answer."""
        rtt = self._rtt * math.exp((self._stamp - now) / _DECAY)
        return rtt if rtt > _RTT_FLOOR else _RTT_FLOOR

    def cost(self, now: float) -> float:
        return self.latency(now) * (self.outstanding + 1)

    def record(self, elapsed: float, code: int, now: float) -> str:
        """Account for one answer (``code`` 0 for success); returns the outcome label."""
        if code in RETRYABLE:
            self.failed += 1
            self._observe(max(elapsed, _FAILURE_PENALTY), now)
            if code in _BROKEN:
                self.failures_in_a_row += 1
                if self.ejected_until <= now and (
                    self.probation or self.failures_in_a_row >= self.eject_after
                ):
                    self._eject(now, code)
            return "retryable_error"
        # An answer, even a request-level error (NOT_FOUND, INVALID_ARGUMENT): the
        # replica works.
        self.answered += 1
        self._observe(elapsed, now)
        self.failures_in_a_row = 0
        if self.probation or self.ejections:
            if self.probation:
                log.info("signer %s answers again: back in rotation", self.address)
            self.probation = False
            self.ejections = 0
        return "ok" if code == 0 else "error"

    def _observe(self, rtt: float, now: float) -> None:
        est = self._rtt * math.exp((self._stamp - now) / _DECAY)
        self._rtt = rtt if rtt > est else est + (rtt - est) * _ALPHA
        self._stamp = now

    def _eject(self, now: float, code: int) -> None:
        self.ejections += 1
        period = min(self.eject_time * (2 ** (self.ejections - 1)), _MAX_EJECT)
        self.ejected_until = now + period
        self.probation = True  # when the period ends: one operation at a time
        self.failures_in_a_row = 0
        log.warning(
            "signer %s ejected for %.1fs after repeated failures",
            self.address,
            period,
            extra={"status": status_code(code).name, "ejections": self.ejections},
        )

    def readmit(self) -> None:
        """A fresh connection that reports SERVING: forget the failure record."""
        if self.ejected_until or self.probation:
            log.info("signer %s is SERVING on a new connection: back in rotation", self.address)
        self.ejected_until = 0.0
        self.ejections = 0
        self.probation = False
        self.probe_in_flight = False
        self.failures_in_a_row = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name=f"replica {self.address}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.stream is not None:
            await self.stream.close()
        if self.client is not None:
            await self.client.close()

    def submit(self, body: bytes, done: Done, timeout_us: int, traceparent: str) -> None:
        stream = self.stream
        if stream is None or stream.closed:
            done(pb.OperationResult(error=pb.Status(code=_UNAVAILABLE, message="no stream")))
            return
        stream.submit(body, done, timeout_us=timeout_us, traceparent=traceparent)
        if stream.closed:  # submit found it closed; make the supervisor reconnect
            self._stream_broken.set()

    async def _supervise(self) -> None:
        t = self._tls
        try:
            self.client = SignerClient(
                self.address,
                ca=t.ca,
                cert=t.cert,
                key=t.key,
                insecure=t.insecure,
                server_name=self.server_name,
            )
        except Exception:
            log.exception("signer %s: cannot set up the channel", self.address)
            return
        backoff = 0.1
        while True:
            watchers: list[asyncio.Task[None]] = []
            try:
                self.stream = self.client.stream()
                await self.stream.start()
                watchers = [
                    asyncio.create_task(self._watch_keys()),
                    asyncio.create_task(self._watch_health()),
                    asyncio.create_task(self._watch_stream()),
                ]
                done, _ = await asyncio.wait(watchers, return_when=asyncio.FIRST_COMPLETED)
                for d in done:
                    if not d.cancelled() and d.exception() is None:
                        backoff = 0.1  # ran fine for a while
            except (SignerError, grpc.RpcError) as e:
                log.debug("signer %s: %s", self.address, e)
            finally:
                for w in watchers:
                    w.cancel()
                for w in watchers:
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await w
                was_serving = self.serving
                self.serving = False
                if self.stream is not None:
                    await self.stream.close()
                    self._sent_before = (self.messages_sent, self.operations_sent)
                    self.stream = None
                if was_serving:
                    log.warning("signer %s unavailable; reconnecting", self.address)
                self._on_change()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    async def _watch_stream(self) -> None:
        while True:
            self._stream_broken.clear()
            s = self.stream
            if s is None or s.closed:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stream_broken.wait(), timeout=0.5)

    async def _watch_keys(self) -> None:
        assert self.client is not None
        async for update in self.client.watch_keys():
            self.keys = {k.ski: k for k in update.keys}
            self.signer_id = update.signer_id
            log.info(
                "signer %s serves %d keys (generation %d)",
                self.address,
                len(self.keys),
                update.generation,
            )
            self._on_change()

    async def _watch_health(self) -> None:
        assert self.client is not None
        stub = health_pb2_grpc.HealthStub(self.client.channel)
        call = stub.Watch(health_pb2.HealthCheckRequest(service=""))
        try:
            async for resp in call:
                serving = resp.status == health_pb2.HealthCheckResponse.SERVING
                if serving != self.serving:
                    self.serving = serving
                    if serving:
                        self.readmit()
                    log.info("signer %s %s", self.address, "serving" if serving else "not serving")
                    self._on_change()
        finally:
            call.cancel()

    def describe(self, now: float) -> dict[str, Any]:
        return {
            "address": self.address,
            "signer_id": self.signer_id,
            "serving": self.serving,
            "usable": self.usable,
            "ejected": self.ejected(now),
            "probation": self.probation,
            "outstanding": self.outstanding,
            "latency_ms": round(self.latency(now) * 1e3, 3),
            "answered": self.answered,
            "failed": self.failed,
            "hedges": self.hedges,
            "keys": len(self.keys),
        }


def _end_span(span: Any, error: str | None) -> None:
    if span is None:
        return
    if error is not None:
        span.set_status(Status(StatusCode.ERROR, error))
    span.end()


class Route:
    """The replicas of one key, and what the key can do."""

    __slots__ = ("algorithms", "decrypt", "key", "replicas")

    def __init__(self, key: pb.Key, replicas: list[Replica]) -> None:
        self.key = key
        self.replicas = replicas
        self.algorithms = frozenset(key.algorithms)
        self.decrypt = bool(key.decrypt_modes)


class Call:
    """One keyless operation on its way through one or more replicas."""

    __slots__ = (
        "attempt",
        "body",
        "deadline",
        "done",
        "finished",
        "hedged",
        "live",
        "parent",
        "probes",
        "route",
        "spans",
        "traceparent",
        "tried",
    )

    def __init__(
        self, route: Route, body: bytes, traceparent: str, deadline: float, done: Done
    ) -> None:
        self.route = route
        self.body = body  # the encoded operation (signer.encoding), the same every attempt
        self.traceparent = traceparent  # the request's, sent when attempts are not traced
        self.deadline = deadline
        self.done = done
        self.attempt = 0
        self.tried: list[Replica] = []
        self.finished = False
        self.live = 0  # bit n set while attempt n is waiting for its answer
        self.probes = 0  # bit n set if attempt n was a replica's probation probe
        self.hedged = 0  # the number of the hedge attempt, if one was sent
        # Tracing only: the request span (parsed from its traceparent), and the open
        # attempt spans.
        self.parent: ParentIds | None = None
        self.spans: dict[int, Any] | None = None


@dataclass(slots=True)
class _Latencies:
    """Recent answer times, for the hedging percentile."""

    samples: array[float] = field(default_factory=lambda: array("d", [0.0] * _LATENCY_SAMPLES))
    count: int = 0
    threshold: float = 0.0
    computed_at: float = 0.0

    def add(self, value: float) -> None:
        self.samples[self.count % _LATENCY_SAMPLES] = value
        self.count += 1

    def percentile(self, q: float, now: float) -> float:
        if self.count < 100:
            return 0.0  # not enough to say what "slow" is yet
        if now - self.computed_at > 1.0:
            n = min(self.count, _LATENCY_SAMPLES)
            ordered = sorted(self.samples[:n])
            self.threshold = ordered[min(n - 1, int(q / 100 * n))]
            self.computed_at = now
        return self.threshold


# (signer address, outcome) for every answer; outcome is ok, error or retryable_error.
AnswerHook = Callable[[str, str], None]


class Router:
    def __init__(
        self,
        targets: Sequence[str | Target],
        tls: SignerTLS,
        settings: RouterSettings | None = None,
    ) -> None:
        self.settings = settings or RouterSettings()
        self._tls = tls
        self._tls_id = tls.fingerprint()
        self.replicas: list[Replica] = []
        self.routes: dict[bytes, Route] = {}
        self._retiring: set[Replica] = set()
        self._background: set[asyncio.Task[None]] = set()
        # (when, tie-breaker, call, attempt number, kind, when the attempt was sent)
        self._timers: list[tuple[float, int, Call, int, int, float]] = []
        self._seq = itertools.count()
        self._sweeper: asyncio.Task[None] | None = None
        self._started = False
        self._latencies = _Latencies()
        self._hedge_tokens = _HEDGE_BURST
        self.retries = 0
        self.hedges = 0
        self.hedge_wins = 0
        self.on_answer: AnswerHook | None = None
        self.on_retry: Callable[[], None] | None = None
        self.on_hedge: Callable[[str], None] | None = None
        self.telemetry: Telemetry | None = None
        self.known = asyncio.Event()
        self.set_targets([t if isinstance(t, Target) else Target(t, None, t) for t in targets])

    # -- configuration ------------------------------------------------------------------

    def configure(self, settings: RouterSettings) -> None:
        self.settings = settings
        for r in self.replicas:
            r.eject_after, r.eject_time = settings.eject_after, settings.eject_time

    def set_targets(self, targets: Sequence[Target], tls: SignerTLS | None = None) -> None:
        """Make the replica set match ``targets``: new ones start, missing ones are
        drained and closed. With a new ``tls`` whose files changed, every replica is
        replaced; the old one keeps serving until its successor is usable."""
        if tls is not None:
            self.set_tls(tls)
        tls = self._tls
        current = {r.identity: r for r in self.replicas}
        wanted: dict[tuple[str, str | None, str], Target] = {}
        for t in targets:
            wanted.setdefault((t.address, t.server_name or tls.server_name, self._tls_id), t)
        added: list[Replica] = []
        for identity, target in wanted.items():
            if identity not in current:
                r = Replica(target, tls, self._tls_id, self._rebuild, self.settings)
                added.append(r)
                self.replicas.append(r)
                log.info("signer %s added (from %s)", r.address, target.source)
                if self._started:
                    r.start()
        by_address = {r.address: r for r in added}
        for identity, r in current.items():
            if identity in wanted:
                continue
            successor = by_address.get(r.address)
            if successor is not None:
                r.replaced_by = successor  # retired once the successor can serve
            else:
                log.info("signer %s removed from the configuration; draining it", r.address)
                self._retire(r)
        self._rebuild()

    def set_tls(self, tls: SignerTLS) -> None:
        """TLS files for replicas made from now on; :meth:`set_targets` then replaces
        the replicas whose files changed."""
        self._tls, self._tls_id = tls, tls.fingerprint()

    def _retire(self, r: Replica) -> None:
        if r in self._retiring:
            return
        if r in self.replicas:
            self.replicas.remove(r)
        self._retiring.add(r)
        task = asyncio.get_running_loop().create_task(self._drain(r), name=f"retire {r.address}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _drain(self, r: Replica) -> None:
        end = time.monotonic() + _RETIRE_GRACE
        while r.outstanding and time.monotonic() < end:
            await asyncio.sleep(0.05)
        await r.close()
        self._retiring.discard(r)

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        self._started = True
        for r in self.replicas:
            r.start()
        self._sweeper = asyncio.create_task(self._sweep(), name="router deadlines")

    async def wait_ready(self, timeout: float) -> bool:
        """Wait until at least one replica is usable and has told us its keys."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if any(r.usable and r.keys for r in self.replicas):
                return True
            await asyncio.sleep(0.05)
        return False

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for t in list(self._background):
            t.cancel()
        await asyncio.gather(*(r.close() for r in [*self.replicas, *self._retiring]))

    def _rebuild(self) -> None:
        replaced = [
            r
            for r in self.replicas
            if r.replaced_by is not None and r.replaced_by.usable and r.replaced_by.keys
        ]
        for r in replaced:
            log.info("signer %s: new connection ready, closing the old one", r.address)
            self._retire(r)
        routes: dict[bytes, Route] = {}
        holders: dict[bytes, list[Replica]] = {}
        keys: dict[bytes, pb.Key] = {}
        for r in self.replicas:
            for ski, k in r.keys.items():
                holders.setdefault(ski, []).append(r)
                keys.setdefault(ski, k)
        for ski, reps in holders.items():
            routes[ski] = Route(keys[ski], reps)
        self.routes = routes
        if routes:
            self.known.set()

    def route(self, ski: bytes) -> Route | None:
        return self.routes.get(ski)

    def snapshot(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [r.describe(now) for r in self.replicas]

    # -- the request path ---------------------------------------------------------------

    def execute(
        self,
        route: Route,
        body: bytes,
        done: Done,
        traceparent: str = "",
        parent: ParentIds | None = None,
    ) -> None:
        """Run the operation ``body`` (encoded with :mod:`signer.encoding`) on a replica
        of ``route``; ``done`` gets exactly one result. ``traceparent`` is the request
        span's: a sampled one makes each attempt a span of its own under it (``parent``,
        that span's ids if the caller has them, saves parsing it)."""
        now = time.monotonic()
        s = self.settings
        if s.hedging:
            self._hedge_tokens = min(_HEDGE_BURST, self._hedge_tokens + s.hedge_budget)
        call = Call(route, body, traceparent, now + s.request_timeout, done)
        tel = self.telemetry
        if traceparent.endswith("-01") and tel is not None and tel.enabled:
            call.parent = parent or parse_traceparent(traceparent)
            if call.parent is not None:
                call.spans = {}
        self._attempt(call, now, hedge=False)

    def _pick(self, call: Call, now: float, hedge: bool) -> Replica | None:
        """The cheapest replica, preferring, in order: untried healthy ones, tried
        healthy ones, then any usable one (ejected, or on probation with a probe out).
        A hedge only goes to an untried healthy replica."""
        replicas = call.route.replicas
        tried = call.tried
        fresh: list[Replica] = []
        again: Replica | None = None
        again_cost = math.inf
        last: Replica | None = None
        last_cost = math.inf
        for r in replicas:
            if not r.usable:
                continue
            if r.healthy(now):
                if r not in tried:
                    fresh.append(r)
                    continue
                if hedge:
                    continue
                c = r.cost(now)
                if c < again_cost:
                    again, again_cost = r, c
            elif not hedge:
                c = r.cost(now)
                if c < last_cost:
                    last, last_cost = r, c
        if fresh:
            if len(fresh) == 1:
                return fresh[0]
            if len(fresh) > 2:
                fresh = random.sample(fresh, 2)  # load balancing, not crypto
            a, b = fresh
            return a if a.cost(now) <= b.cost(now) else b
        return again if again is not None else last

    def _attempt(self, call: Call, now: float, *, hedge: bool) -> bool:
        replica = self._pick(call, now, hedge)
        if replica is None:
            if not hedge:
                self._finish(
                    call,
                    pb.OperationResult(
                        error=pb.Status(
                            code=_UNAVAILABLE, message="no usable signer holds this key"
                        )
                    ),
                )
            return False
        s = self.settings
        call.attempt += 1
        n = call.attempt
        call.tried.append(replica)
        call.live |= 1 << n
        remaining = call.deadline - now
        attempt_deadline = now + min(remaining, s.attempt_timeout)
        timeout_us = max(1, int((attempt_deadline - now) * 1e6))
        timers = self._timers
        heapq.heappush(timers, (attempt_deadline, next(self._seq), call, n, _KIND_DEADLINE, now))
        if s.hedging and not hedge and not call.hedged and len(call.route.replicas) > 1:
            after = s.hedge_delay
            if s.hedge_percentile:
                after = max(after, self._latencies.percentile(s.hedge_percentile, now))
            if after > 0 and now + after < attempt_deadline:
                heapq.heappush(timers, (now + after, next(self._seq), call, n, _KIND_HEDGE, now))
        probe = replica.probation and not replica.ejected(now)
        if probe:
            replica.probe_in_flight = True
            call.probes |= 1 << n
        parent = call.traceparent
        if call.spans is not None:
            parent = self._start_span(call, n, replica, hedge)
        replica.submit(
            call.body,
            lambda result: self._on_result(call, n, replica, now, probe, result),
            timeout_us,
            parent,
        )
        return True

    def _on_result(
        self,
        call: Call,
        n: int,
        replica: Replica,
        sent: float,
        probe: bool,
        result: pb.OperationResult,
    ) -> None:
        now = time.monotonic()
        if probe:
            # Whatever became of the probe (answered, timed out, outlived by a hedge
            # that won), it is no longer out.
            replica.probe_in_flight = False
        failed = result.WhichOneof("result") == "error"
        code = result.error.code if failed else 0
        bit = 1 << n
        current = not call.finished and bool(call.live & bit)
        # A late answer (after its attempt deadline fired) still tells us about the
        # replica, unless the deadline already accounted for this attempt as a failure.
        if current or not failed:
            outcome = replica.record(now - sent, code, now)
            hook = self.on_answer
            if hook is not None:
                hook(replica.address, outcome)
        if not current:
            return
        call.live &= ~bit
        if call.spans is not None:
            _end_span(call.spans.pop(n, None), result.error.message if failed else None)
        if not failed:
            if n == call.hedged:
                self.hedge_wins += 1
            self._latencies.add(now - sent)
            self._finish(call, result)
            return
        retry = code in RETRYABLE or (code == _NOT_FOUND and len(call.route.replicas) > 1)
        if not retry:
            self._finish(call, result)
            return
        if call.live:
            return  # the other attempt (a hedge) may still answer
        if call.attempt < self.settings.max_attempts and call.deadline - now > 0.001:
            self.retries += 1
            hook_r = self.on_retry
            if hook_r is not None:
                hook_r()
            self._attempt(call, now, hedge=False)
            return
        self._finish(call, result)

    def _finish(self, call: Call, result: pb.OperationResult) -> None:
        call.finished = True
        call.live = 0
        if call.spans:
            for span in call.spans.values():  # a hedge that lost, or its original
                span.set_attribute("keyward.superseded", True)
                span.end()
            call.spans.clear()
        call.done(result)

    def _start_span(self, call: Call, n: int, replica: Replica, hedge: bool) -> str:
        """Open attempt ``n``'s span; returns the traceparent the signer gets."""
        assert self.telemetry is not None and call.parent is not None and call.spans is not None
        span = start_child(
            self.telemetry.tracer,
            "signer operation",
            call.parent,
            SpanKind.CLIENT,
            {
                "rpc.system": "grpc",
                "keyward.signer.address": replica.address,
                "keyward.attempt": n,
                "keyward.hedge": hedge,
            },
        )
        assert span is not None  # the parent is sampled, or there would be no spans
        call.spans[n] = span
        return traceparent(span)  # the signer's span goes under this attempt

    def _hedge(self, call: Call, n: int, now: float) -> None:
        if call.finished or call.hedged or call.attempt != n or not call.live & (1 << n):
            return
        if call.attempt >= self.settings.max_attempts or self._hedge_tokens < 1.0:
            return
        if self._attempt(call, now, hedge=True):
            call.hedged = call.attempt
            self._hedge_tokens -= 1.0
            self.hedges += 1
            replica = call.tried[-1]
            replica.hedges += 1
            hook = self.on_hedge
            if hook is not None:
                hook(replica.address)

    async def _sweep(self) -> None:
        timers = self._timers
        while True:
            await asyncio.sleep(_SWEEP_HEDGING if self.settings.hedging else _SWEEP)
            now = time.monotonic()
            while timers and timers[0][0] <= now:
                _, _, call, n, kind, sent = heapq.heappop(timers)
                if call.finished or not call.live & (1 << n):
                    continue
                if kind == _KIND_HEDGE:
                    self._hedge(call, n, now)
                    continue
                # The attempt's deadline: count it as a failure of that replica, and
                # go on elsewhere. The stream may still hold the operation.
                replica = call.tried[n - 1]
                self._on_result(
                    call,
                    n,
                    replica,
                    sent,
                    bool(call.probes & (1 << n)),
                    pb.OperationResult(
                        error=pb.Status(code=_DEADLINE, message=f"attempt {n} timed out")
                    ),
                )
