"""Finding the signers: a static list, plus DNS names that resolve to many addresses.

Each entry of the gateway's ``signers`` setting is either

* ``host:port`` (``[v6]:port``): one signer, dialled as written (gRPC resolves a host
  name itself and may fail over between its addresses, but it is one replica); or
* ``dns:NAME:PORT``: every address NAME resolves to (A and AAAA) is a signer of its
  own, and NAME is resolved again every ``signer_dns_interval``. This is how a
  Kubernetes headless service, or any round-robin name, is followed: addresses that
  appear become replicas, addresses that disappear are drained and dropped.

A failed resolution keeps the addresses the name had (a DNS hiccup must not take
signers away from a gateway that can still reach them); a name that has never
resolved contributes nothing until it does, and is retried at the short
``_RETRY_FAILED`` interval instead of the full one.

The certificate name checked for a signer found through ``dns:NAME`` is NAME (a
signer is dialled by IP, so the IP is no use to verify against), unless
``signer_server_name`` says otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

log = logging.getLogger("keyward.gateway.discovery")

DNS_PREFIX = "dns:"
# How soon a name that has never resolved is tried again.
_RETRY_FAILED = 1.0

# (host, port) -> the IP addresses (text form) it resolves to; raises OSError on failure.
Resolver = Callable[[str, int], Awaitable[list[str]]]


@dataclass(frozen=True, slots=True)
class Target:
    """One signer to dial: its address, and the name its certificate must carry."""

    address: str
    server_name: str | None
    source: str  # the config entry it came from, for logs


def split_host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def is_dns_entry(entry: str) -> bool:
    return entry.startswith(DNS_PREFIX)


def dns_entry_problem(entry: str) -> str | None:
    """None if ``entry`` (``dns:NAME:PORT``) is well formed, else what is expected."""
    rest = entry[len(DNS_PREFIX) :]
    name, sep, port = rest.rpartition(":")
    if not sep or not name or not port.isdigit() or not 0 < int(port) <= 65535:
        return "dns:NAME:PORT (for example dns:signers.keyward.svc:2410)"
    if name.startswith("[") or name.startswith("/"):
        return "dns:NAME:PORT with a DNS name (not an IP literal or dns:///)"
    return None


def format_address(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


async def system_resolver(host: str, port: int) -> list[str]:
    """The operating system's resolver (getaddrinfo: /etc/hosts, DNS, ...)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    seen: list[str] = []
    for family, _, _, _, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        ip = str(sockaddr[0])
        if family == socket.AF_INET6 and len(sockaddr) >= 4 and sockaddr[3]:
            ip = f"{ip}%{sockaddr[3]}" if "%" not in ip else ip  # link-local scope
        if ip not in seen:
            seen.append(ip)
    return seen


class Discovery:
    """Turns the ``signers`` entries into :class:`Target` lists, and keeps them current.

    ``on_change`` is called with the whole list whenever it differs from the last one
    (and once after the first resolution).
    """

    def __init__(
        self,
        entries: Sequence[str],
        *,
        interval: float,
        server_name: str | None,
        on_change: Callable[[list[Target]], None],
        resolver: Resolver | None = None,
    ) -> None:
        self.interval = interval
        self._on_change = on_change
        self._resolver = resolver or system_resolver
        self._entries: list[str] = []
        self._server_name = server_name
        self._resolved: dict[str, list[str]] = {}  # dns entry -> last good addresses
        self._last: list[Target] | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self.configure(entries, server_name=server_name)

    @property
    def has_dns(self) -> bool:
        return any(is_dns_entry(e) for e in self._entries)

    def configure(self, entries: Sequence[str], *, server_name: str | None) -> None:
        """New entries (SIGHUP); call :meth:`refresh` to apply them."""
        self._entries = list(dict.fromkeys(entries))
        self._server_name = server_name
        # Forget names no longer configured, so re-adding one later resolves afresh.
        self._resolved = {e: a for e, a in self._resolved.items() if e in self._entries}

    def targets(self) -> list[Target]:
        out: list[Target] = []
        seen: set[str] = set()
        for entry in self._entries:
            if is_dns_entry(entry):
                name, port = split_host_port(entry[len(DNS_PREFIX) :])
                server_name: str | None = self._server_name or name
                addresses: list[tuple[str, str | None]] = [
                    (format_address(ip, port), server_name) for ip in self._resolved.get(entry, [])
                ]
            else:
                addresses = [(entry, self._server_name)]
            for address, sn in addresses:
                if address not in seen:  # one replica per address, whatever lists it
                    seen.add(address)
                    out.append(Target(address, sn, entry))
        return out

    async def refresh(self) -> list[Target]:
        """Resolve every DNS entry once and report the result if it changed."""
        for entry in list(self._entries):
            if not is_dns_entry(entry):
                continue
            name, port = split_host_port(entry[len(DNS_PREFIX) :])
            try:
                addresses = sorted(await self._resolver(name, port))
            except OSError as e:
                known = self._resolved.get(entry)
                log.warning(
                    "cannot resolve %s: %s; %s",
                    name,
                    e,
                    f"keeping its {len(known)} known addresses" if known else "no signers from it",
                )
                continue
            if not addresses:
                log.warning("%s resolved to no address; keeping what it had", name)
                continue
            previous = self._resolved.get(entry)
            if previous != addresses:
                log.info(
                    "%s resolves to %s",
                    name,
                    ", ".join(addresses),
                    extra={"before": ", ".join(previous or [])},
                )
            self._resolved[entry] = addresses
        targets = self.targets()
        if targets != self._last:
            self._last = targets
            self._on_change(targets)
        return targets

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="signer discovery")

    def wake(self) -> None:
        """Resolve again now (SIGHUP)."""
        self._wake.set()

    async def _run(self) -> None:
        while True:
            unresolved = any(is_dns_entry(e) and e not in self._resolved for e in self._entries)
            wait = min(self.interval, _RETRY_FAILED) if unresolved else self.interval
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=wait)
            self._wake.clear()
            try:
                await self.refresh()
            except Exception:  # a bug here must not stop discovery for good
                log.exception("signer discovery failed")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
