"""The signer process: one token, the Signer API, health and reflection.

Start-up order matters: the token is opened (module loaded, login, keys found) before
the port is bound, so a signer that answers at all can sign. Health goes SERVING only
then, and NOT_SERVING first thing on SIGTERM, so routers stop sending new work before
in-flight work is drained.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import uuid
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from signer.common.http import OpsServer
from signer.common.telemetry import Telemetry, setup_tracing
from signer.common.tls import grpc_server_credentials
from signer.config import SignerConfig
from signer.metrics import SignerMetrics
from signer.service import SignerService
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


@dataclass(slots=True)
class Running:
    server: grpc.aio.Server
    service: SignerService
    health: HealthServicer
    port: int
    ops: OpsServer | None = None
    metrics_address: str = ""
    serving: bool = True


async def serve(config: SignerConfig, *, announce: bool = True) -> None:
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
        ),
    )
    try:
        running = await _start(config, token, telemetry)
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
        await _run_until_signal(config, token, running)
    finally:
        await loop.run_in_executor(None, token.close)
        telemetry.shutdown()


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
    pb_grpc.add_SignerServicer_to_server(service, server)  # type: ignore[no-untyped-call]
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
    if config.insecure:
        port = server.add_insecure_port(config.listen)
    else:
        cert, key, ca = config.tls.require("tls")
        port = server.add_secure_port(config.listen, grpc_server_credentials(cert, key, ca))
    if config.unix_socket is not None:
        # Local callers only; the socket's file permissions are its access control.
        config.unix_socket.unlink(missing_ok=True)
        server.add_insecure_port(f"unix:{config.unix_socket}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    running = Running(server, service, health_servicer, port)
    metrics.gauges(
        serving=lambda: running.serving and not service.draining,
        sessions=lambda: token.session_count,
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


async def _run_until_signal(config: SignerConfig, token: object, running: Running) -> None:
    from signer.hsm.pool import Token

    assert isinstance(token, Token)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    refresh_now = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, refresh_now.set)

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
                await asyncio.wait_for(refresh_now.wait(), timeout=config.key_refresh_interval)
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

    tasks = [asyncio.create_task(refresher()), asyncio.create_task(watch_health())]
    await stop.wait()
    log.info("draining", extra={"grace_s": config.drain_timeout})
    for task in tasks:
        task.cancel()
    running.service.draining = True
    await running.health.enter_graceful_shutdown()
    await running.service.notify_key_change()
    await running.server.stop(grace=config.drain_timeout)
    if running.ops is not None:
        await running.ops.close()
    log.info("signer stopped")


def _host(listen: str) -> str:
    return listen.rpartition(":")[0]


def main(config: SignerConfig) -> int:
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(config))
    return 0


if __name__ == "__main__":  # pragma: no cover - use `keyward signer`
    sys.exit(1)
