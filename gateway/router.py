"""Routing keyless operations to signers: key map, replica choice, retries, deadlines.

Every signer that serves an SKI is a replica of it. The router learns each signer's keys
from its WatchKeys feed and its health from grpc.health.v1, sends operations over one
Signer Stream per signer, and picks the healthy replica with the fewest operations
outstanding. An operation that fails with a retryable status (UNAVAILABLE,
RESOURCE_EXHAUSTED, a broken stream, or an attempt deadline) is tried again on another
replica while the request's own deadline allows: every Signer operation is idempotent.

Nothing here blocks or allocates a task per request: an operation is a small ``Call``
object, its completion a callback from the stream's reader task, and deadlines are
enforced by one sweeper over a heap.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from signer.client import OperationStream, SignerClient, SignerError
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
_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]
_DEADLINE = grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
_NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]

Done = Callable[[pb.OperationResult], None]


@dataclass(slots=True)
class SignerTLS:
    ca: Path | None
    cert: Path | None
    key: Path | None
    insecure: bool = False
    server_name: str | None = None


class Replica:
    """One signer: its connection, stream, key set and health."""

    def __init__(self, address: str, tls: SignerTLS, on_change: Callable[[], None]) -> None:
        self.address = address
        self._tls = tls
        self._on_change = on_change
        self.client: SignerClient | None = None
        self.stream: OperationStream | None = None
        self.keys: dict[bytes, pb.Key] = {}
        self.serving = False
        self.signer_id = ""
        self._task: asyncio.Task[None] | None = None
        self._stream_broken = asyncio.Event()

    @property
    def usable(self) -> bool:
        s = self.stream
        return self.serving and s is not None and not s.closed

    @property
    def outstanding(self) -> int:
        s = self.stream
        return s.in_flight if s is not None else 0

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

    def submit(self, op: pb.Operation, done: Done) -> None:
        stream = self.stream
        if stream is None or stream.closed:
            done(pb.OperationResult(error=pb.Status(code=_UNAVAILABLE, message="no stream")))
            return
        stream.submit(op, done)
        if stream.closed:  # submit found it closed; make the supervisor reconnect
            self._stream_broken.set()

    async def _supervise(self) -> None:
        t = self._tls
        self.client = SignerClient(
            self.address,
            ca=t.ca,
            cert=t.cert,
            key=t.key,
            insecure=t.insecure,
            server_name=t.server_name,
        )
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
                    log.info("signer %s %s", self.address, "serving" if serving else "not serving")
                    self._on_change()
        finally:
            call.cancel()


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

    __slots__ = ("attempt", "deadline", "done", "finished", "op", "replica", "route", "tried")

    def __init__(self, route: Route, op: pb.Operation, deadline: float, done: Done) -> None:
        self.route = route
        self.op = op
        self.deadline = deadline
        self.done = done
        self.attempt = 0
        self.tried: list[Replica] = []
        self.replica: Replica | None = None
        self.finished = False


class Router:
    def __init__(
        self,
        addresses: Sequence[str],
        tls: SignerTLS,
        *,
        request_timeout: float = 5.0,
        attempt_timeout: float | None = None,
        max_attempts: int = 3,
    ) -> None:
        self.replicas = [Replica(a, tls, self._rebuild) for a in addresses]
        self.routes: dict[bytes, Route] = {}
        self.request_timeout = request_timeout
        self.attempt_timeout = attempt_timeout or request_timeout
        self.max_attempts = max_attempts
        self._timers: list[tuple[float, int, Call, int]] = []
        self._seq = itertools.count()
        self._sweeper: asyncio.Task[None] | None = None
        self.retries = 0
        self.known = asyncio.Event()

    async def start(self) -> None:
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
        await asyncio.gather(*(r.close() for r in self.replicas))

    def _rebuild(self) -> None:
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

    def execute(self, route: Route, op: pb.Operation, done: Done) -> None:
        """Run ``op`` on a replica of ``route``; ``done`` gets exactly one result."""
        call = Call(route, op, time.monotonic() + self.request_timeout, done)
        self._attempt(call, time.monotonic())

    def _pick(self, call: Call) -> Replica | None:
        best: Replica | None = None
        best_load = 1 << 62
        for r in call.route.replicas:
            if not r.usable or r in call.tried:
                continue
            load = r.outstanding
            if load < best_load:
                best, best_load = r, load
        if best is None and call.tried:
            # Every usable replica was tried once: allow a second go on the best of them
            # rather than failing while budget remains.
            for r in call.route.replicas:
                if r.usable and r.outstanding < best_load:
                    best, best_load = r, r.outstanding
        return best

    def _attempt(self, call: Call, now: float) -> None:
        replica = self._pick(call)
        if replica is None:
            self._finish(
                call,
                pb.OperationResult(
                    error=pb.Status(code=_UNAVAILABLE, message="no usable signer holds this key")
                ),
            )
            return
        call.attempt += 1
        call.tried.append(replica)
        call.replica = replica
        remaining = call.deadline - now
        attempt_deadline = now + min(remaining, self.attempt_timeout)
        call.op.timeout_us = max(1, int((attempt_deadline - now) * 1e6))
        n = call.attempt
        heapq.heappush(self._timers, (attempt_deadline, next(self._seq), call, n))
        replica.submit(call.op, lambda result: self._on_result(call, n, result))

    def _on_result(self, call: Call, n: int, result: pb.OperationResult) -> None:
        if call.finished or n != call.attempt:
            return  # a late answer to an attempt we already gave up on
        if result.WhichOneof("result") == "error":
            code = result.error.code
            retry = code in RETRYABLE or (code == _NOT_FOUND and len(call.route.replicas) > 1)
            if retry and call.attempt < self.max_attempts:
                now = time.monotonic()
                if call.deadline - now > 0.001:
                    self.retries += 1
                    self._attempt(call, now)
                    return
        self._finish(call, result)

    def _finish(self, call: Call, result: pb.OperationResult) -> None:
        call.finished = True
        call.done(result)

    async def _sweep(self) -> None:
        timers = self._timers
        while True:
            await asyncio.sleep(0.02)
            now = time.monotonic()
            while timers and timers[0][0] <= now:
                _, _, call, n = heapq.heappop(timers)
                if call.finished or n != call.attempt:
                    continue
                self._on_result(
                    call,
                    n,
                    pb.OperationResult(
                        error=pb.Status(code=_DEADLINE, message=f"attempt {n} timed out")
                    ),
                )
