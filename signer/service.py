"""The Signer gRPC servicer: turns Signer API calls into HSM jobs.

The HSM work itself runs on the token's worker threads (signer.hsm.pool), one PKCS#11
session each; this module stays on the event loop and never blocks it. The Stream
method is the fast path: each StreamRequest batch becomes one job batch for one worker
(so the thread hand-off is paid once per batch, not once per signature), and results
are written back as they complete, coalesced into as few messages as the writer can.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry.trace import SpanKind, Status, StatusCode

from signer.common.spans import span_ids, start_child
from signer.common.telemetry import DISABLED, Telemetry, parse_traceparent
from signer.encoding import result_entry, result_entry_message
from signer.hsm.errors import HsmError
from signer.hsm.keys import KeyInfo
from signer.hsm.mechanisms import decrypt_spec, mechanism_name, sign_spec
from signer.hsm.pool import Job, Result, Token
from signer.metrics import SignerMetrics, algorithm_label
from signer.v1 import signer_pb2 as pb
from signer.v1 import signer_pb2_grpc as pb_grpc

log = logging.getLogger("keyward.signer")

# One StreamRequest may carry at most this many operations; more is a caller bug that
# would otherwise let one message monopolise a worker.
MAX_BATCH = 1024
# A message is split into one chunk per session, of at most this many jobs: each
# chunk's results go back as one StreamResponse, and every response costs both ends
# a gRPC message (some 150 µs of CPU each in Python, measured), so chunks are as
# large as keeps every session busy. The cap keeps answers flowing back while a
# very long message (a backlog after failover) is still being worked through.
MAX_CHUNK = 64


class KeyIndex:
    """SKI and label lookup over the token's current key set."""

    __slots__ = ("by_label", "by_ski", "generation", "keys")

    def __init__(self, keys: Sequence[KeyInfo], generation: int) -> None:
        self.keys = list(keys)
        self.generation = generation
        self.by_ski = {k.ski: k for k in keys}
        self.by_label: dict[str, KeyInfo] = {}
        for k in keys:
            # A label shared by several keys is ambiguous: such keys are reachable by
            # SKI only.
            if k.label in self.by_label:
                self.by_label[k.label] = None  # type: ignore[assignment]
            else:
                self.by_label[k.label] = k

    def find(self, selector: pb.KeySelector) -> KeyInfo:
        which = selector.WhichOneof("selector")
        if which == "ski":
            if len(selector.ski) != 20:
                raise HsmError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"an SKI is 20 bytes, got {len(selector.ski)}",
                )
            key = self.by_ski.get(selector.ski)
            if key is None:
                raise HsmError(grpc.StatusCode.NOT_FOUND, f"no key with SKI {selector.ski.hex()}")
            return key
        if which == "label":
            if selector.label not in self.by_label:
                raise HsmError(grpc.StatusCode.NOT_FOUND, f"no key labelled {selector.label!r}")
            found = self.by_label[selector.label]
            if found is None:
                raise HsmError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"several keys are labelled {selector.label!r}: choose one by SKI",
                )
            return found
        raise HsmError(grpc.StatusCode.INVALID_ARGUMENT, "no key selected (set ski or label)")


def _deadline(timeout_us: int, now: float) -> float | None:
    return now + timeout_us / 1e6 if timeout_us else None


class SignerService(pb_grpc.SignerServicer):
    def __init__(
        self,
        token: Token,
        *,
        signer_id: str,
        allowed_clients: Sequence[str] = (),
        key_changes: asyncio.Condition | None = None,
        metrics: SignerMetrics | None = None,
        telemetry: Telemetry = DISABLED,
    ) -> None:
        self._token = token
        self.metrics = metrics or SignerMetrics()
        self.telemetry = telemetry
        self.in_flight = 0  # operations accepted and not yet answered, all callers
        self._signer_id = signer_id
        self._allowed = frozenset(allowed_clients)
        self._index = KeyIndex(token.keys(), token.generation)
        self.key_changes = key_changes or asyncio.Condition()
        self.draining = False

    # -- key set -------------------------------------------------------------------

    def index(self) -> KeyIndex:
        if self._index.generation != self._token.generation:
            self._index = KeyIndex(self._token.keys(), self._token.generation)
        return self._index

    def _key_set(self) -> pb.ListKeysResponse:
        index = self.index()
        return pb.ListKeysResponse(
            keys=[k.to_proto() for k in index.keys],
            generation=index.generation,
            signer_id=self._signer_id,
            token=self._token.description,
        )

    async def notify_key_change(self) -> None:
        async with self.key_changes:
            self.key_changes.notify_all()

    # -- access --------------------------------------------------------------------

    async def _authorize(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if not self._allowed:
            return
        auth = context.auth_context()
        names = {n.decode(errors="replace") for n in auth.get("x509_common_name", [])}
        if not names & self._allowed:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                "this client certificate is not in allowed_clients",
            )

    async def _check_serving(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "signer is shutting down")

    # -- building jobs ---------------------------------------------------------------

    def _job(self, op: pb.Operation | pb.SignRequest | pb.DecryptRequest, now: float) -> Job:
        """A job for one request; raises HsmError for requests that cannot be run."""
        timeout_us = 0
        if isinstance(op, pb.Operation):
            timeout_us = op.timeout_us
            which = op.WhichOneof("op")
            if which == "sign":
                op = op.sign
            elif which == "decrypt":
                op = op.decrypt
            else:
                raise HsmError(
                    grpc.StatusCode.INVALID_ARGUMENT, "operation has neither sign nor decrypt"
                )
        key = self.index().find(op.key)
        if isinstance(op, pb.SignRequest):
            return Job(
                key=key, algorithm=op.algorithm, data=op.data, deadline=_deadline(timeout_us, now)
            )
        return Job(
            key=key, decrypt_mode=op.mode, data=op.ciphertext, deadline=_deadline(timeout_us, now)
        )

    async def _run_one(self, job: Job, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        deadline = context.time_remaining()
        if deadline is not None and job.deadline is None:
            job.deadline = time.monotonic() + deadline
        spans = None
        if self.telemetry.enabled:
            # W3C trace context arrives in the call's metadata for unary calls.
            metadata = dict(context.invocation_metadata() or ())
            parent = metadata.get("traceparent", "")
            spans = self._start_spans([parent if isinstance(parent, str) else ""], [job])
        chunk = Chunk([0], [job], time.monotonic(), spans)
        self.in_flight += 1
        started: float | None = None
        try:
            submitted = self._token.submit([job])
            done: list[Result] = await asyncio.wrap_future(submitted)
            started = getattr(submitted, "hsm_started", None)
        except HsmError as e:
            done = [e]
        finally:
            self.in_flight -= 1
        results: Sequence[Result] = done
        self._record(chunk, results, None if started is None else started - chunk.arrived)
        result = results[0]
        if isinstance(result, HsmError):
            await context.abort(result.code, result.message)
        assert isinstance(result, bytes)
        return result

    # -- unary RPCs ----------------------------------------------------------------

    async def _unary(
        self,
        request: pb.SignRequest | pb.DecryptRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> bytes:
        await self._authorize(context)
        await self._check_serving(context)
        try:
            job = self._job(request, time.monotonic())
        except HsmError as e:
            await context.abort(e.code, e.message)
        return await self._run_one(job, context)

    async def Sign(
        self, request: pb.SignRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.SignResponse:
        return pb.SignResponse(signature=await self._unary(request, context))

    async def Decrypt(
        self, request: pb.DecryptRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.DecryptResponse:
        return pb.DecryptResponse(plaintext=await self._unary(request, context))

    async def ListKeys(
        self, request: pb.ListKeysRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListKeysResponse:
        await self._authorize(context)
        return self._key_set()

    async def WatchKeys(
        self, request: pb.WatchKeysRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.ListKeysResponse]:
        await self._authorize(context)
        sent = -1
        while not self.draining:
            current = self.index().generation
            if current != sent:
                sent = current
                yield self._key_set()
            async with self.key_changes:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.key_changes.wait(), timeout=30.0)

    # -- the streaming fast path ---------------------------------------------------

    async def Stream(
        self,
        request_iterator: AsyncIterator[pb.StreamRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.StreamResponse]:
        await self._authorize(context)
        loop = asyncio.get_running_loop()
        ready: list[bytes] = []
        wakeup = asyncio.Event()
        pending = 0
        reading = True

        def deliver(chunk: Chunk, fut: Future[list[bytes | HsmError]]) -> None:
            # Runs on the event loop (via call_soon_threadsafe).
            nonlocal pending
            pending -= len(chunk.ids)
            self.in_flight -= len(chunk.ids)
            for op_id, out in zip(chunk.ids, self._outputs(chunk, fut), strict=True):
                if isinstance(out, bytes):
                    ready.append(result_entry(op_id, out))
                else:
                    ready.append(_error_entry(op_id, out))
            wakeup.set()

        def on_done(chunk: Chunk) -> Callable[[Future[list[bytes | HsmError]]], None]:
            def done(fut: Future[list[bytes | HsmError]]) -> None:
                loop.call_soon_threadsafe(deliver, chunk, fut)

            return done

        async def read() -> None:
            nonlocal pending, reading
            try:
                async for request in request_iterator:
                    ops = request.operations
                    if len(ops) > MAX_BATCH:
                        err = HsmError(
                            grpc.StatusCode.INVALID_ARGUMENT,
                            f"a StreamRequest carries at most {MAX_BATCH} operations",
                        )
                        ready.extend(_error_entry(op.id, err) for op in ops)
                        wakeup.set()
                        continue
                    now = time.monotonic()
                    jobs: list[Job] = []
                    ids: list[int] = []
                    parents: list[str] = []
                    tracing = self.telemetry.enabled
                    for op in ops:
                        if self.draining:
                            ready.append(_error_entry(op.id, DRAINING))
                            continue
                        try:
                            jobs.append(self._job(op, now))
                            ids.append(op.id)
                            if tracing:
                                parents.append(op.traceparent)
                        except HsmError as e:
                            self._count_rejected(e)
                            ready.append(_error_entry(op.id, e))
                    # Split the message across the workers: one batch per worker
                    # would make a slow job (RSA, or any call to a network HSM) delay
                    # every fast one behind it, and leave the other sessions idle.
                    size = min(MAX_CHUNK, -(-len(jobs) // self._token.session_count))
                    for start in range(0, len(jobs), size or 1):
                        chunk = Chunk(
                            ids[start : start + size],
                            jobs[start : start + size],
                            now,
                            self._start_spans(
                                parents[start : start + size], jobs[start : start + size]
                            )
                            if tracing
                            else None,
                        )
                        try:
                            fut = self._token.submit(chunk.jobs)
                        except HsmError as e:
                            self._record(chunk, [e] * len(chunk.jobs))
                            ready.extend(_error_entry(i, e) for i in chunk.ids)
                        else:
                            pending += len(chunk.jobs)
                            self.in_flight += len(chunk.jobs)
                            fut.add_done_callback(on_done(chunk))
                    if ready:
                        wakeup.set()
            finally:
                reading = False
                wakeup.set()

        reader = asyncio.create_task(read())
        try:
            while True:
                await wakeup.wait()
                wakeup.clear()
                if ready:
                    # Encoded StreamResponse.results entries (signer.encoding): the
                    # response goes out as bytes (see stream_response_serializer).
                    batch = b"".join(ready)
                    ready.clear()
                    yield batch  # type: ignore[misc]
                if not reading and pending == 0 and not ready:
                    break
        finally:
            reader.cancel()

    # -- metrics and spans ---------------------------------------------------------

    def _outputs(self, chunk: Chunk, fut: Future[list[bytes | HsmError]]) -> Sequence[Result]:
        try:
            outputs: Sequence[Result] = fut.result()
        except HsmError as e:
            outputs = [e] * len(chunk.ids)
        except Exception as e:  # a worker bug must not kill the stream
            log.exception("HSM batch failed unexpectedly")
            outputs = [
                HsmError(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}")
            ] * len(chunk.ids)
        started = getattr(fut, "hsm_started", None)
        self._record(chunk, outputs, None if started is None else started - chunk.arrived)
        return outputs

    def _record(
        self, chunk: Chunk, outputs: Sequence[Result], session_wait: float | None = None
    ) -> None:
        m = self.metrics
        elapsed = time.monotonic() - chunk.arrived
        if session_wait is not None:
            m.session_wait.observe((), max(0.0, session_wait))
            chunk.session_wait = session_wait
        # Every job of a chunk took the same time; operations are counted per distinct
        # (key, algorithm, outcome), which for a busy stream is one or two per chunk.
        counts: dict[tuple[str, str, str], int] = {}
        spans = chunk.spans
        for i, (job, out) in enumerate(zip(chunk.jobs, outputs, strict=True)):
            key = job.key
            label = key.label if isinstance(key, KeyInfo) else key.hex()
            if isinstance(out, bytes):
                outcome = "ok"
            else:
                outcome = out.code.name
                if out.ckr:
                    m.hsm_errors.inc((out.ckr,))
            labels = (label, algorithm_label(job.algorithm, job.decrypt_mode), outcome)
            counts[labels] = counts.get(labels, 0) + 1
            if spans is not None and spans[i] is not None:
                self._end_spans(spans[i], job, out, chunk.session_wait)
        for labels, n in counts.items():
            m.operations.inc(labels, n)
            m.duration.observe((labels[1],), elapsed, n)

    def _count_rejected(self, error: HsmError) -> None:
        self.metrics.operations.inc(("-", "-", error.code.name))

    def _start_spans(self, parents: list[str], jobs: list[Job]) -> list[Any] | None:
        """The server and HSM spans of each operation whose trace is sampled (its
        traceparent says so, or, with none, the root ratio does), None for the others.
        What is known now goes in as the spans' attributes; the rest at the end."""
        spans: list[Any] = []
        any_span = False
        tracer = self.telemetry.tracer
        token = self._token.description
        for value, job in zip(parents, jobs, strict=True):
            parent = parse_traceparent(value) if value else None
            if (parent[2] & 1 == 0) if parent is not None else not self.telemetry.sample_root():
                spans.append(None)  # not sampled upstream, or a root not sampled here
                continue
            attributes: dict[str, Any] = {
                "signer.algorithm": algorithm_label(job.algorithm, job.decrypt_mode)
            }
            key = job.key
            if isinstance(key, KeyInfo):
                attributes["signer.key.label"] = key.label
                attributes["signer.key.ski"] = key.ski.hex()
            server = start_child(
                tracer, "keyward.signer.v1.Signer/Stream", parent, SpanKind.SERVER, attributes
            )
            assert server is not None  # sampled: checked above
            any_span = True
            hsm = start_child(
                tracer,
                "hsm operation",
                span_ids(server),
                SpanKind.INTERNAL,
                {"hsm.mechanism": mechanism_for(job), "hsm.token": token},
            )
            spans.append((server, hsm))
        return spans if any_span else None

    def _end_spans(
        self, pair: tuple[Any, Any], job: Job, out: Result, session_wait: float | None
    ) -> None:
        server, hsm = pair
        if session_wait is not None:
            hsm.set_attribute("hsm.session_wait_ms", round(max(0.0, session_wait) * 1e3, 3))
        if isinstance(out, HsmError):
            for span in (hsm, server):
                span.set_status(Status(StatusCode.ERROR, out.code.name))
            if out.ckr:
                hsm.set_attribute("hsm.ckr", out.ckr)
        hsm.end()
        server.end()


@dataclass(slots=True)
class Chunk:
    """One hand-off to a worker: the operations' ids, their jobs, when they arrived."""

    ids: list[int]
    jobs: list[Job]
    arrived: float
    spans: list[Any] | None
    session_wait: float | None = None


DRAINING = HsmError(grpc.StatusCode.UNAVAILABLE, "signer is shutting down")


def mechanism_for(job: Job) -> str:
    """The PKCS#11 mechanism's name for a job (for the HSM span), cached per kind."""
    kind = (job.algorithm, job.decrypt_mode)
    name = _MECHANISM_NAMES.get(kind)
    if name is None:
        spec = decrypt_spec(job.decrypt_mode) if job.decrypt_mode else sign_spec(job.algorithm)
        name = _MECHANISM_NAMES[kind] = mechanism_name(spec.mechanism)
    return name


_MECHANISM_NAMES: dict[tuple[int, int], str] = {}  # bounded by the enums' sizes


def _error_entry(op_id: int, err: HsmError) -> bytes:
    """A failed operation's StreamResponse entry (rare: through the generated code)."""
    error = pb.Status(code=err.code.value[0], message=err.message)
    return result_entry_message(pb.OperationResult(id=op_id, error=error))


def stream_response_serializer(response: bytes | pb.StreamResponse) -> bytes:
    """The Stream method's response serializer: the service yields encoded bytes."""
    return response if isinstance(response, bytes) else response.SerializeToString()
