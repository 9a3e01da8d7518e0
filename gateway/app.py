"""The gateway process: router to the signers, keyless listener, signals.

Signals: SIGTERM and SIGINT drain (stop accepting, stop reading, finish what is in
flight within 5 s, close). SIGHUP reloads the configuration file without
dropping a connection: the keyless certificate, key and client CA (new connections get
the new ones; established ones keep theirs), the signer list (``dns:`` names are
resolved again at once), the signer TLS files (replicas reconnect with them, each old
connection serving until its successor is ready), routing and failover settings,
request limits and the log level. A reload that fails (bad YAML, unreadable
certificate) changes nothing and is logged. Listen addresses, the metrics endpoint,
tracing and the event loop need a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
import time
from collections.abc import Callable
from typing import Any

from gateway.config import GatewayConfig
from gateway.discovery import Discovery
from gateway.metrics import GatewayMetrics
from gateway.router import Router, RouterSettings, SignerTLS
from gateway.server import KeylessServer, Limits
from signer.common.config import ConfigError
from signer.common.http import OpsServer
from signer.common.logs import setup_logging
from signer.common.runtime import run, settle_heap, uvloop_installed
from signer.common.telemetry import setup_tracing
from signer.common.tls import TLSConfigError, keyless_server_context

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


Reload = Callable[[], GatewayConfig]

# Settings a SIGHUP cannot change: they name sockets or process-wide machinery.
_RESTART_ONLY = (
    "bind_address",
    "port",
    "unix_socket",
    "metrics_address",
    "metrics_port",
    "tracing",
    "event_loop",
)


def router_settings(config: GatewayConfig) -> RouterSettings:
    return RouterSettings(
        request_timeout=config.request_timeout,
        attempt_timeout=min(config.attempt_timeout, config.request_timeout),
        max_attempts=config.max_attempts,
        eject_after=config.eject_after,
        eject_time=config.eject_time,
        hedge_delay=config.hedge_delay,
        hedge_percentile=config.hedge_percentile,
        hedge_budget=config.hedge_budget,
    )


def signer_tls(config: GatewayConfig) -> SignerTLS:
    tls = config.signer_tls
    return SignerTLS(
        tls.ca,
        tls.cert,
        tls.key,
        insecure=config.signer_insecure,
        server_name=config.signer_server_name,
    )


def keyless_context(config: GatewayConfig) -> ssl.SSLContext:
    assert config.auth_cert and config.auth_key and config.cloudflare_ca_cert
    return keyless_server_context(config.auth_cert, config.auth_key, config.cloudflare_ca_cert)


class ListenerTLS:
    """The listener's TLS context, replaceable for new connections.

    asyncio fixes a server's SSLContext when it starts listening, so the context it
    holds (``base``) never changes; its SNI callback, which OpenSSL runs for every
    handshake (with or without SNI) before the certificate is chosen and the client's
    is verified, moves each new connection onto the current context. Established
    connections keep the context they were made with.
    """

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.base = ctx
        self.current = ctx
        ctx.sni_callback = self._select

    def _select(self, conn: Any, server_name: str | None, ctx: ssl.SSLContext) -> None:
        current = self.current
        if current is not self.base:
            conn.context = current


def _file_state(tls: SignerTLS) -> str:
    try:
        return tls.fingerprint()
    except OSError as e:
        raise TLSConfigError(f"cannot read a signer_tls file: {e}") from None


async def serve(
    config: GatewayConfig, *, announce: bool = True, reload: Reload | None = None
) -> None:
    tls = signer_tls(config)
    _file_state(tls)  # fail at start, naming the file, rather than in a replica task
    router = Router([], tls, router_settings(config))
    discovery = Discovery(
        config.signers,
        interval=config.signer_dns_interval,
        server_name=config.signer_server_name,
        on_change=router.set_targets,
    )
    assert config.auth_cert and config.auth_key and config.cloudflare_ca_cert
    listener_tls = ListenerTLS(keyless_context(config))
    ctx = listener_tls.base
    await discovery.refresh()
    await router.start()
    discovery.start()
    telemetry = setup_tracing("keyward-gateway", config.tracing)
    router.telemetry = telemetry  # one span per attempt on a signer
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
    _failover_metrics(metrics, router)
    ops = OpsServer(metrics.registry.render, lambda: readiness(router))
    loop = asyncio.get_running_loop()
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
        settle_heap()
        if announce:
            host = config.bind_address
            shown = f"[{host}]" if ":" in host else host
            extra = (
                f" metrics={_show(config.metrics_address)}:{metrics_port}" if metrics_port else ""
            )
            print(f"ready gateway listen={shown}:{port}{extra}", flush=True)
        log.info(
            "gateway serving",
            extra={"port": port, "signers": len(router.replicas), "keys": len(router.routes)},
        )
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        hup = asyncio.Event()
        loop.add_signal_handler(signal.SIGHUP, hup.set)
        state = _Reloadable(config, router, discovery, listener_tls, server, metrics, reload)
        reloader = asyncio.create_task(state.run(hup), name="SIGHUP reload")
        await stop.wait()
        reloader.cancel()
        log.info("draining")
        await server.close()
    finally:
        await discovery.close()
        await ops.close()
        await router.close()
        telemetry.shutdown()
    log.info("gateway stopped")


def _failover_metrics(metrics: GatewayMetrics, router: Router) -> None:
    """Per-signer failover state and hedges, beside the per-signer gauges."""
    r = metrics.registry
    hedges = r.counter("keyward_signer_hedges", "Hedge attempts sent to the signer.", ["signer"])
    r.gauge(
        "keyward_signer_ejected",
        "1 while the signer is kept out of rotation after repeated failures.",
        ["signer"],
        read=lambda: {(x.address,): float(x.ejected(time.monotonic())) for x in router.replicas},
    )
    r.gauge(
        "keyward_signer_latency_estimate_seconds",
        "The router's latency estimate for the signer (peak-sensitive EWMA) that weighs "
        "its share of traffic.",
        ["signer"],
        read=lambda: {(x.address,): x.latency(time.monotonic()) for x in router.replicas},
    )
    # Batching on the Stream: operations / messages is the mean batch size, which is
    # what makes Python gRPC's per-message cost affordable under load.
    r.counter(
        "keyward_signer_stream_messages",
        "StreamRequest messages sent to the signer.",
        ["signer"],
        read=lambda: {(x.address,): float(x.messages_sent) for x in router.replicas},
    )
    r.counter(
        "keyward_signer_stream_operations",
        "Operations sent to the signer over its Stream.",
        ["signer"],
        read=lambda: {(x.address,): float(x.operations_sent) for x in router.replicas},
    )
    answers = metrics.signer_answers
    retries = metrics.retries
    router.on_answer = lambda signer, outcome: answers.inc((signer, outcome))
    router.on_retry = retries.inc
    router.on_hedge = lambda signer: hedges.inc((signer,))


class _Reloadable:
    """What SIGHUP re-reads, and how each part is applied."""

    def __init__(
        self,
        config: GatewayConfig,
        router: Router,
        discovery: Discovery,
        listener_tls: ListenerTLS,
        server: KeylessServer,
        metrics: GatewayMetrics,
        reload: Reload | None,
    ) -> None:
        self.config = config
        self.router = router
        self.discovery = discovery
        self.listener_tls = listener_tls
        self.server = server
        self.metrics = metrics
        self.reload = reload

    async def run(self, hup: asyncio.Event) -> None:
        while True:
            await hup.wait()
            hup.clear()
            try:
                await self.apply()
            except Exception:  # a reload bug must not take the gateway down
                log.exception("SIGHUP reload failed; keeping the running configuration")

    async def apply(self) -> None:
        log.info("SIGHUP: reloading the configuration")
        if self.reload is None:
            new = self.config  # no file to re-read: reload the files it names
        else:
            try:
                new = self.reload()
            except (ConfigError, ValueError) as e:
                log.error("SIGHUP reload failed, keeping the running configuration: %s", e)
                return
        try:
            ctx = keyless_context(new)
            tls = signer_tls(new)
            _file_state(tls)
        except (TLSConfigError, OSError) as e:
            log.error("SIGHUP reload failed, keeping the running configuration: %s", e)
            return
        old = self.config
        for name in _RESTART_ONLY:
            if getattr(new, name) != getattr(old, name):
                log.warning("SIGHUP: %s changed; that takes a restart", name)
        setup_logging(new.log_level, new.log_format)
        self.listener_tls.current = ctx
        assert new.auth_cert and new.cloudflare_ca_cert
        self.metrics.certificate("auth_cert", new.auth_cert, "server")
        self.metrics.certificate("cloudflare_ca_cert", new.cloudflare_ca_cert, "ca")
        limits = self.server.limits
        limits.max_conn_pending = new.max_conn_pending_requests
        limits.max_pending = new.max_pending_requests
        limits.idle_timeout = new.tcp_timeout
        self.router.configure(router_settings(new))
        self.router.set_tls(tls)
        self.discovery.interval = new.signer_dns_interval
        self.discovery.configure(new.signers, server_name=new.signer_server_name)
        await self.discovery.refresh()
        self.router.set_targets(self.discovery.targets())
        self.config = new
        log.info(
            "SIGHUP: configuration reloaded",
            extra={"signers": len(self.router.replicas), "keys": len(self.router.routes)},
        )


def main(config: GatewayConfig, reload: Reload | None = None) -> int:
    if config.event_loop == "uvloop" and not uvloop_installed():
        raise ConfigError("gateway.event_loop: uvloop is not installed")
    with contextlib.suppress(KeyboardInterrupt):
        run(serve(config, reload=reload), config.event_loop)
    return 0
