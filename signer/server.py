"""The signer process: one token, the Signer API, health and reflection.

Start-up order matters: the token is opened (module loaded, login, keys found) before
the port is bound, so a signer that answers at all can sign. Health goes SERVING only
then, and NOT_SERVING first thing on SIGTERM, so routers stop sending new work before
in-flight work is drained.

Signals: SIGTERM and SIGINT drain: NOT_SERVING, operations that still arrive are
answered UNAVAILABLE (the gateway retries them elsewhere), accepted ones are finished
(within ``drain_timeout``), then the server stops; it does not wait out the idle
streams and health watches that gateways keep open. SIGHUP reloads without dropping
a connection: the key set is searched again at once, the TLS certificate, key and
client CA are re-read for new connections (gRPC's dynamic server credentials;
established connections keep theirs), and the config file is re-read for
``allowed_clients``, ``key_refresh_interval``, ``drain_timeout`` and the log level.
Settings naming the token, sockets or threads need a restart. A reload that fails
changes nothing and is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from signer.common.http import OpsServer
from signer.common.logs import setup_logging
from signer.common.runtime import settle_heap
from signer.common.telemetry import Telemetry, setup_tracing
from signer.common.tls import (
    TLSConfigError,
    grpc_reloadable_server_credentials,
    grpc_server_certificate,
)
from signer.config import SignerConfig
from signer.metrics import SignerMetrics
from signer.service import SignerService, stream_response_serializer
from signer.v1 import signer_pb2 as pb
from signer.v1 import signer_pb2_grpc as pb_grpc

log = logging.getLogger("keyward.signer")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Signer"].full_name
# Keep streams healthy through idle periods and notice dead peers within seconds.
SERVER_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.so_reuseport", 0),
]


Reload = Callable[[], SignerConfig]

# Settings a SIGHUP cannot change: they name the token, sockets or threads.
_RESTART_ONLY = (
    "pkcs11_uri",
    "listen",
    "unix_socket",
    "insecure",
    "sessions",
    "max_queue",
    "hsm_call_timeout",
    "metrics_listen",
    "tracing",
    "test_fault_file",
)


class ServerTLS:
    """The Signer API's certificate, replaceable for new connections (SIGHUP)."""

    def __init__(self, config: SignerConfig) -> None:
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self.initial = grpc_server_certificate(*config.tls.require("tls"))

    def credentials(self) -> grpc.ServerCredentials:
        return grpc_reloadable_server_credentials(self.initial, self._fetch)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # Called by gRPC before every new handshake, on its own thread: hand over a
        # new configuration once; None means "keep the current one".
        pending, self._pending = self._pending, None
        return pending

    def reload(self, config: SignerConfig) -> None:
        """Read the files now (raising TLSConfigError), use them from the next handshake."""
        self._pending = grpc_server_certificate(*config.tls.require("tls"))


@dataclass(slots=True)
class Running:
    server: grpc.aio.Server
    service: SignerService
    health: HealthServicer
    port: int
    ops: OpsServer | None = None
    metrics_address: str = ""
    serving: bool = True
    tls: ServerTLS | None = None


async def serve(
    config: SignerConfig, *, announce: bool = True, reload: Reload | None = None
) -> None:
    from signer.hsm.pool import Token  # needs python-pkcs11: only imported when serving

    loop = asyncio.get_running_loop()
    injector = None
    if config.test_fault_file is not None:
        from signer.faults import FileFaultInjector

        log.warning("HSM fault injection is on (test_fault_file): not for production")
        injector = FileFaultInjector(config.test_fault_file)
    telemetry = setup_tracing("keyward-signer", config.tracing)
    token = await loop.run_in_executor(
        None,
        lambda: Token(
            config.pkcs11_uri,
            sessions=config.sessions,
            max_queue=config.max_queue,
            fault_injector=injector,
            call_timeout=config.hsm_call_timeout,
        ),
    )
    try:
        running = await _start(config, token, telemetry)
        settle_heap()
        if announce:
            # One machine-readable line for supervisors and tests (port 0 → real port).
            extra = f" metrics={running.metrics_address}" if running.metrics_address else ""
            print(f"ready signer listen={_host(config.listen)}:{running.port}{extra}", flush=True)
        log.info(
            "signer serving",
            extra={
                "listen": f"{_host(config.listen)}:{running.port}",
                "token": token.description,
                "keys": len(token.keys()),
                "sessions": token.session_count,
            },
        )
        await _run_until_signal(config, token, running, reload)
    finally:
        await loop.run_in_executor(None, token.close)
        telemetry.shutdown()


class _Handlers:
    """Stands in for a server to catch what the generated registration adds."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        pass  # the same table arrives below

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        self.service, self.handlers = service, dict(handlers)


def add_signer_service(service: SignerService, server: grpc.aio.Server) -> None:
    """The generated registration, except that the Stream method's responses are
    taken as encoded bytes (signer.encoding) rather than serialised from messages:
    the per-operation result objects cost more than the rest of the answer."""
    caught = _Handlers()
    pb_grpc.add_SignerServicer_to_server(service, caught)  # type: ignore[no-untyped-call]
    stream = caught.handlers["Stream"]
    assert stream.stream_stream is not None
    caught.handlers["Stream"] = grpc.stream_stream_rpc_method_handler(
        stream.stream_stream,
        request_deserializer=stream.request_deserializer,
        response_serializer=stream_response_serializer,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(caught.service, caught.handlers),)
    )
    # (grpc-stubs predates add_registered_method_handlers, which grpcio has had since 1.63.)
    server.add_registered_method_handlers(  # type: ignore[attr-defined]
        caught.service, caught.handlers
    )


async def _start(config: SignerConfig, token: object, telemetry: Telemetry) -> Running:
    from signer.hsm.pool import Token

    assert isinstance(token, Token)
    server = grpc.aio.server(options=SERVER_OPTIONS)
    metrics = SignerMetrics()
    service = SignerService(
        token,
        signer_id=uuid.uuid4().hex,
        allowed_clients=config.allowed_clients,
        metrics=metrics,
        telemetry=telemetry,
    )
    add_signer_service(service, server)
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [
            SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    server_tls: ServerTLS | None = None
    if config.insecure:
        port = server.add_insecure_port(config.listen)
    else:
        server_tls = ServerTLS(config)
        port = server.add_secure_port(config.listen, server_tls.credentials())
    if config.unix_socket is not None:
        # Local callers only; the socket's file permissions are its access control.
        config.unix_socket.unlink(missing_ok=True)
        server.add_insecure_port(f"unix:{config.unix_socket}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    running = Running(server, service, health_servicer, port, tls=server_tls)
    metrics.gauges(
        serving=lambda: running.serving and not service.draining,
        sessions=lambda: token.session_count,
        busy=lambda: token.busy_sessions,
        queued=lambda: token.queued_jobs,
        in_flight=lambda: service.in_flight,
        keys=lambda: len(token.keys()),
    )
    if config.metrics_listen:
        running.ops = OpsServer(metrics.registry.render, lambda: _readiness(running, token))
        host, _, mport = config.metrics_listen.rpartition(":")
        bound = await running.ops.start(host.strip("[]"), int(mport))
        running.metrics_address = f"{host}:{bound}"
    return running


def _readiness(running: Running, token: Any) -> tuple[bool, str]:
    if running.service.draining:
        return False, "draining"
    if not token.healthy:
        return False, "HSM unusable: recovering"
    if not running.serving:
        return False, "not serving"
    return True, f"ok: {len(token.keys())} keys, HSM logged in"


async def _run_until_signal(
    config: SignerConfig, token: object, running: Running, reload: Reload | None = None
) -> None:
    from signer.hsm.pool import Token

    assert isinstance(token, Token)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    refresh_now = asyncio.Event()
    hup = asyncio.Event()
    current = [config]  # the configuration in force; SIGHUP replaces it
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, hup.set)

    fault_seen = asyncio.Event()

    # Called on a worker thread the moment a job hits an HSM fault.
    def on_fault(error: object) -> None:
        loop.call_soon_threadsafe(fault_seen.set)

    token.on_fault = on_fault

    async def set_health(serving: bool) -> None:
        running.serving = serving
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            await running.health.set(name, status)

    async def recover() -> None:
        """NOT_SERVING at once, then log in again and find the keys, with backoff."""
        await set_health(False)
        fault = token.last_fault
        log.error(
            "HSM fault: not serving until the token is back",
            extra={"ckr": getattr(fault, "ckr", None) or "", "error": str(fault or "")},
        )
        delay = 0.5
        while not token.healthy:
            try:
                await loop.run_in_executor(None, token.recover)
            except Exception as e:
                log.warning("HSM recovery failed; retrying in %.1fs: %s", delay, e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
        fault_seen.clear()
        log.info("HSM recovered: serving", extra={"keys": len(token.keys())})
        await running.service.notify_key_change()
        await set_health(True)

    async def watch_health() -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(fault_seen.wait(), timeout=1.0)
            if not token.healthy:
                await recover()

    async def refresher() -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(refresh_now.wait(), timeout=current[0].key_refresh_interval)
            refresh_now.clear()
            if not token.healthy:
                continue  # watch_health is on it
            before = token.generation
            try:
                await loop.run_in_executor(None, token.refresh_keys)
            except Exception:
                log.warning("key refresh failed", exc_info=True)
            if token.generation != before:
                log.info(
                    "key set changed",
                    extra={"keys": len(token.keys()), "generation": token.generation},
                )
                await running.service.notify_key_change()

    def reread() -> None:
        """SIGHUP: apply what can change while serving; a failure changes nothing."""
        log.info("SIGHUP: reloading keys, certificates and configuration")
        refresh_now.set()  # the key set, whatever happens to the rest
        old = current[0]
        try:
            new = reload() if reload is not None else old
        except Exception as e:  # ConfigError, or a CLI check: named in the message
            log.error("SIGHUP: configuration not reloaded (%s); keeping the running one", e)
            return
        try:
            if running.tls is not None and not new.insecure:
                running.tls.reload(new)
        except TLSConfigError as e:
            log.error("SIGHUP: configuration not reloaded (%s); keeping the running one", e)
            return
        for name in _RESTART_ONLY:
            if getattr(new, name) != getattr(old, name):
                log.warning("SIGHUP: %s changed; that takes a restart", name)
        setup_logging(new.log_level, new.log_format)
        # The service reads its allow-list on every call; a new set applies to the next.
        running.service._allowed = frozenset(new.allowed_clients)
        current[0] = new
        log.info(
            "SIGHUP: reloaded",
            extra={"tls": running.tls is not None, "allowed_clients": len(new.allowed_clients)},
        )

    async def on_hup() -> None:
        while True:
            await hup.wait()
            hup.clear()
            reread()

    tasks = [
        asyncio.create_task(refresher()),
        asyncio.create_task(watch_health()),
        asyncio.create_task(on_hup()),
    ]
    await stop.wait()
    drain_timeout = current[0].drain_timeout
    log.info("draining", extra={"grace_s": drain_timeout})
    for task in tasks:
        task.cancel()
    running.service.draining = True
    await running.health.enter_graceful_shutdown()
    await running.service.notify_key_change()
    # Finish what was accepted; what arrives now is refused with UNAVAILABLE. The
    # gateways' streams and health watches stay open until the server stops, so
    # waiting for the RPCs themselves would always take the whole drain_timeout.
    end = loop.time() + drain_timeout
    while running.service.in_flight and loop.time() < end:
        await asyncio.sleep(0.02)
    if running.service.in_flight:
        log.warning("drain timeout: %d operations unfinished", running.service.in_flight)
    # A moment for the last answers to be written before the streams are cancelled.
    await running.server.stop(grace=max(0.0, min(0.5, end - loop.time())))
    if running.ops is not None:
        await running.ops.close()
    log.info("signer stopped")


def _host(listen: str) -> str:
    return listen.rpartition(":")[0]


def main(config: SignerConfig, reload: Reload | None = None) -> int:
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(config, reload=reload))
    return 0


if __name__ == "__main__":  # pragma: no cover - use `keyward signer`
    sys.exit(1)
