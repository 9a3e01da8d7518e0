"""The Signer API client: what the gateway and other applications import.

    async with SignerClient("signer.internal:2410", ca=..., cert=..., key=...) as c:
        sig = await c.sign(ski, pb.ECDSA_SHA256, digest)

``SignerClient`` is asyncio-first; ``SyncSignerClient`` offers the same calls for
threaded code. Both speak mutual TLS (plain TCP only with ``insecure=True``), and both
ride out an unavailable signer on unary calls: by default a call waits, within its
deadline, for the channel to (re)connect (``wait_for_ready``), and a call that fails
with UNAVAILABLE is retried by gRPC's own retry policy. Both are safe because every
Signer operation is idempotent. Pass ``wait_for_ready=False`` to fail fast instead.

``OperationStream`` is the high-throughput path over the Stream method: operations
submitted in the same event-loop iteration travel in one message, results come back
as they complete, and a broken stream fails every pending operation with UNAVAILABLE
so the caller can retry elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from signer.common.tls import grpc_channel_credentials
from signer.encoding import stream_entry
from signer.v1 import signer_pb2 as pb
from signer.v1 import signer_pb2_grpc as pb_grpc

log = logging.getLogger("keyward.signer.client")

SERVICE = "keyward.signer.v1.Signer"
STREAM_METHOD = f"/{SERVICE}/Stream"

_RETRY_POLICY = json.dumps(
    {
        "methodConfig": [
            {
                "name": [
                    {"service": SERVICE, "method": m} for m in ("Sign", "Decrypt", "ListKeys")
                ],
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)

CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.enable_retries", 1),
    ("grpc.service_config", _RETRY_POLICY),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # Reconnect fast after a signer restart; the router decides where traffic goes.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


class SignerError(Exception):
    """A Signer call failed; ``code`` is the gRPC status (see the proto's error table)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message

    @classmethod
    def from_rpc(cls, e: grpc.RpcError) -> SignerError:
        code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
        details = e.details() if hasattr(e, "details") else str(e)
        return cls(code, details or "")


_CODES = {c.value[0]: c for c in grpc.StatusCode}


def status_code(value: int) -> grpc.StatusCode:
    return _CODES.get(value, grpc.StatusCode.UNKNOWN)


def selector(key: bytes | str) -> pb.KeySelector:
    """An SKI (bytes) or a label (str)."""
    return pb.KeySelector(ski=key) if isinstance(key, bytes) else pb.KeySelector(label=key)


def _options(server_name: str | None) -> list[tuple[str, Any]]:
    opts = list(CHANNEL_OPTIONS)
    if server_name:
        opts.append(("grpc.ssl_target_name_override", server_name))
    return opts


def _credentials(
    ca: Path | str | None, cert: Path | str | None, key: Path | str | None, insecure: bool
) -> grpc.ChannelCredentials | None:
    if insecure:
        return None
    if ca is None or cert is None or key is None:
        raise ValueError("mutual TLS needs ca, cert and key (or insecure=True for local tests)")
    return grpc_channel_credentials(Path(ca), Path(cert), Path(key))


class SignerClient:
    def __init__(
        self,
        target: str,
        *,
        ca: Path | str | None = None,
        cert: Path | str | None = None,
        key: Path | str | None = None,
        insecure: bool = False,
        server_name: str | None = None,
        options: list[tuple[str, Any]] | None = None,
        wait_for_ready: bool = True,
    ) -> None:
        self.target = target
        self.wait_for_ready = wait_for_ready
        creds = _credentials(ca, cert, key, insecure)
        opts = _options(server_name) + list(options or [])
        if creds is None:
            self.channel = grpc.aio.insecure_channel(target, options=opts)
        else:
            self.channel = grpc.aio.secure_channel(target, creds, options=opts)
        self.stub = pb_grpc.SignerStub(self.channel)  # type: ignore[no-untyped-call]
        self._health = health_pb2_grpc.HealthStub(self.channel)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close(None)

    async def sign(
        self,
        key: bytes | str,
        algorithm: pb.Algorithm,
        data: bytes,
        *,
        timeout: float = 5.0,
    ) -> bytes:
        req = pb.SignRequest(key=selector(key), algorithm=algorithm, data=data)
        try:
            resp: pb.SignResponse = await self.stub.Sign(
                req, timeout=timeout, wait_for_ready=self.wait_for_ready
            )
        except grpc.RpcError as e:
            raise SignerError.from_rpc(e) from None
        return resp.signature

    async def decrypt(
        self,
        key: bytes | str,
        ciphertext: bytes,
        *,
        mode: pb.DecryptMode = pb.DECRYPT_MODE_RAW,
        timeout: float = 5.0,
    ) -> bytes:
        req = pb.DecryptRequest(key=selector(key), mode=mode, ciphertext=ciphertext)
        try:
            resp: pb.DecryptResponse = await self.stub.Decrypt(
                req, timeout=timeout, wait_for_ready=self.wait_for_ready
            )
        except grpc.RpcError as e:
            raise SignerError.from_rpc(e) from None
        return resp.plaintext

    async def list_keys(self, *, timeout: float = 5.0) -> pb.ListKeysResponse:
        try:
            keys: pb.ListKeysResponse = await self.stub.ListKeys(
                pb.ListKeysRequest(), timeout=timeout, wait_for_ready=self.wait_for_ready
            )
        except grpc.RpcError as e:
            raise SignerError.from_rpc(e) from None
        return keys

    async def watch_keys(self) -> AsyncIterator[pb.ListKeysResponse]:
        call = self.stub.WatchKeys(pb.WatchKeysRequest())
        try:
            async for update in call:
                yield update
        except grpc.RpcError as e:
            raise SignerError.from_rpc(e) from None
        finally:
            call.cancel()

    async def health(self, service: str = "", *, timeout: float = 2.0) -> int:
        """The grpc.health.v1 status (health_pb2.HealthCheckResponse.SERVING, ...)."""
        try:
            resp = await self._health.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as e:
            raise SignerError.from_rpc(e) from None
        return int(resp.status)

    def stream(self) -> OperationStream:
        return OperationStream(self.channel)


Callback = Callable[[pb.OperationResult], None]

# The signer refuses a StreamRequest of more operations than this (INVALID_ARGUMENT for
# every one of them: signer/service.py MAX_BATCH), so the outbox leaves in messages of
# at most this many. It fills that far when the signer falls behind, e.g. after a
# failover sends it the traffic of two.
MAX_OPERATIONS_PER_MESSAGE = 1024


class OperationStream:
    """Many operations over one Stream call, batched adaptively.

    ``submit`` never blocks and never raises for a remote failure: every submitted
    operation gets exactly one callback with its OperationResult, an UNAVAILABLE one if
    the stream breaks first. Ids are assigned here; callers keep their own context in
    the callback's closure.

    An operation is a ``pb.Operation`` or, on the fast path, its body already encoded
    with :mod:`signer.encoding` (``sign_body``/``decrypt_body``); either way the
    stream appends the id, ``timeout_us`` and ``traceparent`` given to ``submit`` and
    never modifies the caller's message, so one operation can be submitted again (a
    retry, a hedge) as it is. Messages are written as bytes, with no per-operation
    protobuf objects on the way out.

    Batching needs no timer. The outbox is sent as one message whenever the signer has
    at most ``low_water`` of this stream's operations left to answer; operations
    submitted meanwhile wait and leave together. A lone operation goes out at once;
    under load, each message carries what arrived during the previous one's round trip,
    which is what makes Python gRPC's per-message cost (some 300 µs of CPU between the
    two ends, measured) affordable. Refilling at a low-water mark rather than when a
    message is fully answered keeps the signer supplied while the last few results
    travel back, and a slow operation (RSA, or a stuck HSM call) holds back at most
    ``low_water`` places instead of the next message. The signer splits a message
    across its sessions, so one message at a time does not serialise the HSM.
    """

    def __init__(self, channel: grpc.aio.Channel, *, low_water: int = 4) -> None:
        self._method = channel.stream_stream(
            STREAM_METHOD,
            request_serializer=None,  # the outbox is already bytes
            response_deserializer=pb.StreamResponse.FromString,
        )
        self._call: Any = None
        self._pending: dict[int, Callback] = {}
        self._outbox: list[bytes] = []  # encoded StreamRequest.operations entries
        self._outbox_calls: list[tuple[int, Callback]] = []  # their ids and callbacks
        self._next_id = 1
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._low_water = low_water
        self.closed = False
        self.failure: str | None = None
        self.messages_sent = 0
        self.operations_sent = 0

    @property
    def in_flight(self) -> int:
        return len(self._pending) + len(self._outbox)

    async def start(self) -> None:
        self._call = self._method()  # type: ignore[call-arg]  # requests are written, not iterated
        self._tasks = [
            asyncio.create_task(self._writer(), name="signer-stream-writer"),
            asyncio.create_task(self._reader(), name="signer-stream-reader"),
        ]

    def submit(
        self,
        op: pb.Operation | bytes,
        callback: Callback,
        *,
        timeout_us: int = 0,
        traceparent: str = "",
    ) -> None:
        """Queue ``op`` (a message, or a body from :mod:`signer.encoding`); a non-zero
        ``timeout_us`` or non-empty ``traceparent`` overrides the message's own."""
        op_id = self._next_id
        self._next_id = op_id + 1 if op_id < 0xFFFF_FFFF_FFFF else 1
        if self.closed:
            callback(_unavailable(op_id, self.failure or "stream closed"))
            return
        body = op if isinstance(op, bytes) else op.SerializeToString()
        self._outbox.append(stream_entry(body, op_id, timeout_us, traceparent))
        self._outbox_calls.append((op_id, callback))
        if len(self._pending) <= self._low_water:
            self._wake.set()

    async def _writer(self) -> None:
        try:
            while not self.closed:
                await self._wake.wait()
                self._wake.clear()
                if not self._outbox or len(self._pending) > self._low_water:
                    continue
                cut = MAX_OPERATIONS_PER_MESSAGE
                entries, self._outbox = self._outbox[:cut], self._outbox[cut:]
                calls, self._outbox_calls = self._outbox_calls[:cut], self._outbox_calls[cut:]
                if self._outbox:
                    self._wake.set()  # the rest goes next, as the low-water mark allows
                self._pending.update(calls)
                self.messages_sent += 1
                self.operations_sent += len(entries)
                await self._call.write(b"".join(entries))
        except (grpc.RpcError, asyncio.InvalidStateError) as e:
            self._fail(f"stream write failed: {_describe(e)}")
        except asyncio.CancelledError:
            pass

    async def _reader(self) -> None:
        try:
            async for response in self._call:
                pending = self._pending
                for result in response.results:
                    cb = pending.pop(result.id, None)
                    if cb is not None:
                        cb(result)
                if self._outbox and len(pending) <= self._low_water:
                    self._wake.set()
            self._fail("signer ended the stream")
        except grpc.RpcError as e:
            self._fail(f"stream broken: {_describe(e)}")
        except asyncio.CancelledError:
            pass

    def _fail(self, why: str) -> None:
        if not self.closed:
            self.closed = True
            self.failure = why
            log.debug("signer stream failed: %s", why)
        self._wake.set()
        failed = [*self._pending.items(), *self._outbox_calls]
        self._pending, self._outbox, self._outbox_calls = {}, [], []
        for op_id, cb in failed:
            cb(_unavailable(op_id, why))

    async def close(self) -> None:
        self._fail("stream closed by caller")
        if self._call is not None:
            self._call.cancel()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, grpc.RpcError):
                await t


def _describe(e: BaseException) -> str:
    if isinstance(e, grpc.RpcError) and hasattr(e, "code"):
        return f"{e.code().name}: {e.details()}"
    return type(e).__name__


def _unavailable(op_id: int, why: str) -> pb.OperationResult:
    return pb.OperationResult(
        id=op_id, error=pb.Status(code=grpc.StatusCode.UNAVAILABLE.value[0], message=why)
    )


class SyncSignerClient:
    """The same calls as SignerClient, blocking, for threaded applications."""

    def __init__(
        self,
        target: str,
        *,
        ca: Path | str | None = None,
        cert: Path | str | None = None,
        key: Path | str | None = None,
        insecure: bool = False,
        server_name: str | None = None,
        wait_for_ready: bool = True,
    ) -> None:
        self.wait_for_ready = wait_for_ready
        creds = _credentials(ca, cert, key, insecure)
        opts = _options(server_name)
        if creds is None:
            self.channel = grpc.insecure_channel(target, options=opts)
        else:
            self.channel = grpc.secure_channel(target, creds, options=opts)
        self.stub = pb_grpc.SignerStub(self.channel)  # type: ignore[no-untyped-call]
        self._health = health_pb2_grpc.HealthStub(self.channel)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def sign(
        self,
        key: bytes | str,
        algorithm: pb.Algorithm,
        data: bytes,
        *,
        timeout: float = 5.0,
    ) -> bytes:
        req = pb.SignRequest(key=selector(key), algorithm=algorithm, data=data)
        try:
            resp: pb.SignResponse = self.stub.Sign(
                req, timeout=timeout, wait_for_ready=self.wait_for_ready
            )
            return resp.signature
        except grpc.RpcError as e:
            raise SignerError.from_rpc(e) from None

    def decrypt(
        self,
        key: bytes | str,
        ciphertext: bytes,
        *,
        mode: pb.DecryptMode = pb.DECRYPT_MODE_RAW,
        timeout: float = 5.0,
    ) -> bytes:
        req = pb.DecryptRequest(key=selector(key), mode=mode, ciphertext=ciphertext)
        try:
            resp: pb.DecryptResponse = self.stub.Decrypt(
                req, timeout=timeout, wait_for_ready=self.wait_for_ready
            )
            return resp.plaintext
        except grpc.RpcError as e:
            raise SignerError.from_rpc(e) from None

    def list_keys(self, *, timeout: float = 5.0) -> pb.ListKeysResponse:
        try:
            keys: pb.ListKeysResponse = self.stub.ListKeys(
                pb.ListKeysRequest(), timeout=timeout, wait_for_ready=self.wait_for_ready
            )
            return keys
        except grpc.RpcError as e:
            raise SignerError.from_rpc(e) from None

    def health(self, service: str = "", *, timeout: float = 2.0) -> int:
        try:
            resp = self._health.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as e:
            raise SignerError.from_rpc(e) from None
        return int(resp.status)
