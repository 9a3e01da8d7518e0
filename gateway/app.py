"""The gateway process: router to the signers, keyless listener, signals."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
from typing import Any

from gateway.config import GatewayConfig
from gateway.metrics import GatewayMetrics
from gateway.router import Router, SignerTLS
from gateway.server import KeylessServer, Limits
from signer.common.config import ConfigError
from signer.common.http import OpsServer
from signer.common.telemetry import setup_tracing
from signer.common.tls import keyless_server_context

log = logging.getLogger("keyward.gateway")


def readiness(router: Router) -> tuple[bool, str]:
    """Ready when every key the gateway advertises has at least one usable replica."""
    if not router.routes:
        return False, "no keys known yet"
    missing = [
        ski.hex() for ski, r in router.routes.items() if not any(x.usable for x in r.replicas)
    ]
    if missing:
        return False, f"{len(missing)} keys have no usable signer"
    return True, f"ok: {len(router.routes)} keys"


def _show(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _exception_handler(server: KeylessServer) -> Any:
    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, ssl.SSLError | ConnectionResetError | BrokenPipeError):
            # A refused client certificate or a load balancer's TCP probe: routine,
            # so counted and logged at debug, not dumped as an error.
            server.stats.handshake_failures += 1
            reason = getattr(exc, "reason", None) or type(exc).__name__
            server.metrics.handshake_failures.inc((str(reason).lower(),))
            log.debug("TLS handshake failed: %s", reason)
            return
        loop.default_exception_handler(context)

    return handle


async def serve(config: GatewayConfig, *, announce: bool = True) -> None:
    tls = config.signer_tls
    router = Router(
        config.signers,
        SignerTLS(
            tls.ca,
            tls.cert,
            tls.key,
            insecure=config.signer_insecure,
            server_name=config.signer_server_name,
        ),
        request_timeout=config.request_timeout,
    )
    assert config.auth_cert and config.auth_key and config.cloudflare_ca_cert
    ctx = keyless_server_context(config.auth_cert, config.auth_key, config.cloudflare_ca_cert)
    await router.start()
    telemetry = setup_tracing("keyward-gateway", config.tracing)
    metrics = GatewayMetrics()
    server = KeylessServer(
        router,
        ctx,
        Limits(
            max_conn_pending=config.max_conn_pending_requests,
            max_pending=config.max_pending_requests,
            idle_timeout=config.tcp_timeout,
        ),
        metrics=metrics,
        telemetry=telemetry,
    )
    metrics.certificate("auth_cert", config.auth_cert, "server")
    metrics.certificate("cloudflare_ca_cert", config.cloudflare_ca_cert, "ca")
    metrics.gauges(
        in_flight=lambda: server.stats.in_flight,
        connections=lambda: len(server.connections),
        replicas=lambda: list(router.replicas),
    )
    ops = OpsServer(metrics.registry.render, lambda: readiness(router))
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_exception_handler(server))
    try:
        port = await server.listen_tcp(config.bind_address, config.port)
        if config.unix_socket is not None:
            config.unix_socket.unlink(missing_ok=True)
            await server.listen_unix(str(config.unix_socket))
        metrics_port = None
        if config.metrics_port >= 0:
            metrics_port = await ops.start(config.metrics_address, config.metrics_port)
        if not await router.wait_ready(timeout=10.0):
            log.warning("no signer is usable yet; requests get ErrInternal until one is")
        if announce:
            host = config.bind_address
            shown = f"[{host}]" if ":" in host else host
            extra = (
                f" metrics={_show(config.metrics_address)}:{metrics_port}" if metrics_port else ""
            )
            print(f"ready gateway listen={shown}:{port}{extra}", flush=True)
        log.info(
            "gateway serving",
            extra={"port": port, "signers": len(config.signers), "keys": len(router.routes)},
        )
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("draining")
        await server.close()
    finally:
        await ops.close()
        await router.close()
        telemetry.shutdown()
    log.info("gateway stopped")


def main(config: GatewayConfig) -> int:
    runner: Any = asyncio.run
    if config.event_loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            raise ConfigError("gateway.event_loop: uvloop is not installed") from None
        runner = uvloop.run
    with contextlib.suppress(KeyboardInterrupt):
        runner(serve(config))
    return 0
