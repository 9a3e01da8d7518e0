"""The operations HTTP endpoint of every Keyward service: /metrics, /healthz, /readyz.

A deliberately small HTTP/1.1 server on the service's own event loop, so that
readiness reflects the live state of the process that answers (a probe thread could
report ready while the loop is wedged). It serves GETs of three paths, closes each
connection after one answer, and bounds request size and time, since it may be
reachable by more than Prometheus and the kubelet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

log = logging.getLogger("keyward.http")

Readiness = Callable[[], tuple[bool, str]]
MAX_REQUEST = 8192
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


class OpsServer:
    def __init__(self, render_metrics: Callable[[], bytes], ready: Readiness) -> None:
        self.render_metrics = render_metrics
        self.ready = ready
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(self._handle, host, port, limit=MAX_REQUEST)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5.0)
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = line.split(" ")
            if len(parts) != 3 or parts[0] not in ("GET", "HEAD"):
                await self._reply(writer, 405, b"method not allowed\n", "text/plain")
                return
            path = parts[1].split("?", 1)[0]
            head_only = parts[0] == "HEAD"  # a HEAD answer has the headers, not the body
            if path == "/metrics":
                body = self.render_metrics()
                await self._reply(writer, 200, body, PROMETHEUS_TEXT, head_only=head_only)
            elif path == "/healthz":
                await self._reply(writer, 200, b"ok\n", "text/plain", head_only=head_only)
            elif path == "/readyz":
                ok, why = self.ready()
                await self._reply(
                    writer,
                    200 if ok else 503,
                    why.encode() + b"\n",
                    "text/plain",
                    head_only=head_only,
                )
            else:
                await self._reply(writer, 404, b"not found\n", "text/plain", head_only=head_only)
        except (
            TimeoutError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ConnectionError,
        ):
            pass
        except Exception:
            log.exception("ops endpoint failed")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    @staticmethod
    async def _reply(
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        ctype: str,
        *,
        head_only: bool = False,
    ) -> None:
        reason = {
            200: "OK",
            404: "Not Found",
            405: "Method Not Allowed",
            503: "Service Unavailable",
        }[status]
        allow = "Allow: GET, HEAD\r\n" if status == 405 else ""
        header = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n{allow}"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        writer.write(header if head_only else header + body)
        await writer.drain()
