"""Server-side TLS for the keyless listener: an ``ssl.SSLObject`` over a plain socket.

asyncio's own TLS layer (``create_server(ssl=...)``) hides a failed handshake: Python
3.11 reports it to nobody unless the loop runs in debug mode, and uvloop behaves
differently again, so a refused client certificate could not be counted by reason.
It is also a deep stack of calls per read and per write. :class:`TLSServerProtocol`
does the same job in one small layer, on either event loop:

- it owns the socket's protocol slot, drives the handshake itself (with a deadline),
  and reports every failure to ``on_failure`` with a reason: OpenSSL's (``no shared
  cipher``, a certificate the CA did not issue, no certificate), ``timeout``, or
  ``eof`` for a peer that connects and leaves (a load balancer's TCP probe);
- once the handshake is done it makes the application protocol and acts as its
  transport: ``write`` encrypts and sends, decrypted bytes arrive in
  ``data_received`` (everything one socket read yields, at once), ``close`` sends
  close_notify, and ``get_extra_info("ssl_object")`` gives the peer certificate;
- a peer's close_notify or TCP EOF reaches the application as ``eof_received``, whose
  answer (keep the connection half-open to finish writing, or not) is honoured.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable
from typing import Any

log = logging.getLogger("keyward.gateway.tls")

_READ = 256 * 1024  # at most this much decrypted per SSLObject.read call


class TLSServerProtocol(asyncio.Protocol):
    def __init__(
        self,
        context: ssl.SSLContext,
        app_factory: Callable[[], asyncio.Protocol],
        on_failure: Callable[[str], None],
        handshake_timeout: float,
    ) -> None:
        self._context = context
        self._app_factory = app_factory
        self._on_failure = on_failure
        self._handshake_timeout = handshake_timeout
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl: ssl.SSLObject | None = None
        self._transport: asyncio.Transport | None = None
        self._app: asyncio.Protocol | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._closing = False
        self._eof = False

    # -- the plain socket's protocol ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._ssl = self._context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._handshake_timeout, self._timed_out)

    def data_received(self, data: bytes) -> None:
        self._incoming.write(data)
        if self._app is None and not self._handshake():
            return
        self._read()

    def eof_received(self) -> bool | None:
        if self._app is None:
            return None  # during the handshake: connection_lost counts it
        if self._eof:
            return True  # close_notify came first and the application kept writing
        self._eof = True
        # TCP EOF without close_notify: what was received has been delivered; the
        # application decides whether to finish writing (half-close) or close.
        return self._app_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        app = self._app
        if app is None:
            if not self._closing:
                # Connected and left before a handshake: a TCP health probe, a scanner.
                self._closing = True
                self._on_failure("eof" if exc is None else type(exc).__name__.lower())
            return
        self._app = None
        app.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._app is not None:
            self._app.pause_writing()

    def resume_writing(self) -> None:
        if self._app is not None:
            self._app.resume_writing()

    # -- the handshake ---------------------------------------------------------------------

    def _handshake(self) -> bool:
        assert self._ssl is not None and self._transport is not None
        try:
            self._ssl.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return False
        except (ssl.SSLError, OSError) as exc:
            self._flush()  # the alert, so the client learns why
            self._fail(_reason(exc))
            return False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._flush()  # the server's last flight (and TLS 1.3 session tickets)
        app = self._app = self._app_factory()
        app.connection_made(self)  # type: ignore[arg-type]  # this is its transport
        return self._app is not None and not self._closing

    def _timed_out(self) -> None:
        self._timer = None
        if self._app is None and not self._closing:
            self._fail("timeout")

    def _fail(self, reason: str) -> None:
        self._closing = True
        log.debug("TLS handshake failed: %s", reason)
        self._on_failure(reason)
        if self._transport is not None:
            self._transport.close()

    # -- records to the application --------------------------------------------------------

    def _read(self) -> None:
        ssl_obj = self._ssl
        assert ssl_obj is not None
        chunks: list[bytes] = []
        closed = False
        while True:
            try:
                chunk = ssl_obj.read(_READ)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:  # close_notify
                closed = True
                break
            except (ssl.SSLError, OSError) as exc:
                # A corrupt record or a truncated stream: nothing more can be trusted.
                log.debug("TLS read failed: %s", _reason(exc))
                self.abort()
                return
            if not chunk:
                closed = True
                break
            chunks.append(chunk)
        if self._outgoing.pending:
            self._flush()  # a key update or other post-handshake message to answer
        app = self._app
        if chunks and app is not None:
            app.data_received(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        if closed and not self._eof:
            self._eof = True
            self._app_eof()

    def _app_eof(self) -> bool | None:
        app = self._app
        keep_open = app.eof_received() if app is not None else None
        if not keep_open and self._transport is not None:
            self.close()
        return keep_open

    def _flush(self) -> None:
        out = self._outgoing
        if out.pending and self._transport is not None and not self._transport.is_closing():
            self._transport.write(out.read())

    # -- the transport the application sees -------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._ssl is None:
            return
        try:
            self._ssl.write(data)
        except (ssl.SSLError, OSError) as exc:
            log.debug("TLS write failed: %s", _reason(exc))
            self.abort()
            return
        self._flush()

    def writelines(self, chunks: Any) -> None:
        self.write(b"".join(chunks))

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self._ssl is not None and self._app is not None:
            with contextlib.suppress(ssl.SSLError, OSError):
                self._ssl.unwrap()  # queue close_notify
            self._flush()
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        self._closing = True
        if self._transport is not None:
            self._transport.abort()

    def is_closing(self) -> bool:
        t = self._transport
        return self._closing or t is None or t.is_closing()

    def can_write_eof(self) -> bool:
        return False

    def pause_reading(self) -> None:
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self._transport is not None:
            self._transport.resume_reading()

    def is_reading(self) -> bool:
        t = self._transport
        return t is not None and t.is_reading()

    def get_write_buffer_size(self) -> int:
        t = self._transport
        return t.get_write_buffer_size() if t is not None else 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self._transport is not None:
            self._transport.set_write_buffer_limits(high, low)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self._ssl
        if name == "sslcontext":
            return self._context
        if name == "peercert" and self._ssl is not None:
            return self._ssl.getpeercert()
        if name == "cipher" and self._ssl is not None:
            return self._ssl.cipher()
        if self._transport is None:
            return default
        return self._transport.get_extra_info(name, default)


def _reason(exc: BaseException) -> str:
    """A short, stable label for a failure: OpenSSL's reason code where it gives one."""
    reason = getattr(exc, "reason", None)
    if reason:
        return str(reason).lower().replace("_", " ")
    return type(exc).__name__.lower()
