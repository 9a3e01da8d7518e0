"""Process-wide tuning: the event loop a process runs on, and its garbage collector."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

EVENT_LOOPS = ("auto", "asyncio", "uvloop")


def uvloop_installed() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def run(main: Coroutine[Any, Any, T], event_loop: str = "auto") -> T:
    """``asyncio.run`` on the chosen loop: ``uvloop`` (ImportError if it is not
    installed), ``asyncio``, or ``auto``, uvloop where installed.

    With the Stream batching and TLS in place uvloop measured about a tenth less
    gateway CPU per keyless request than the default loop (docs/benchmarks.md); the
    keyless listener and client work on either."""
    if event_loop not in EVENT_LOOPS:
        raise ValueError(f"event loop {event_loop!r}: expected one of {', '.join(EVENT_LOOPS)}")
    if event_loop == "uvloop" or (event_loop == "auto" and uvloop_installed()):
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)


# Python's default first-generation threshold (700 container allocations) runs a
# collection every few dozen requests on the hot path, and each one walks every
# young object; a request's objects are freed by reference counting long before
# that, so collections find almost nothing. A larger threshold keeps cycle collection
# (it still runs) at a fraction of the cost.
GC_THRESHOLD = (50_000, 20, 100)


def settle_heap() -> None:
    """After start-up: move what is loaded so far (modules, protobuf descriptors, the
    configuration) out of the collector's sight and collect less often.

    ``gc.freeze`` puts every object alive now in a permanent generation that no
    collection walks again, so the periodic full collections cost what the live
    request state costs rather than the whole interpreter.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)
