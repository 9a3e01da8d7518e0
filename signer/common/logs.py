"""The one logging setup: text for people, JSON for log pipelines.

Log records never carry payloads, key material or PINs; callers pass identifiers
(SKI hex, request id, peer identity) as ``extra`` fields, which the JSON formatter
emits as top-level keys.

Trace correlation: a record given ``extra={"span": span}`` (an OpenTelemetry span, or
None when the request is not traced) gets ``trace_id`` and ``span_id`` fields instead;
without one, the span current in the OpenTelemetry context (if any) supplies them.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator
from typing import Any

from opentelemetry import trace

# gokeyless's numeric levels (0 DEBUG … 4 CRITICAL), accepted for migration ease.
_GOKEYLESS_LEVELS = {"0": "DEBUG", "1": "INFO", "2": "WARNING", "3": "ERROR", "4": "CRITICAL"}
LEVELS = ("debug", "info", "warning", "error", "critical")

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


def level_check(value: str) -> str | None:
    v = _GOKEYLESS_LEVELS.get(str(value), str(value)).lower()
    return None if v in LEVELS else "one of debug, info, warning, error, critical (or 0-4)"


def _span_ids(span: Any) -> Iterator[tuple[str, str]]:
    get = getattr(span, "get_span_context", None)
    if get is None:
        return
    ctx = get()
    if ctx.is_valid:
        yield "trace_id", f"{ctx.trace_id:032x}"
        yield "span_id", f"{ctx.span_id:016x}"


def _extras(record: logging.LogRecord) -> Iterator[tuple[str, Any]]:
    """The record's ``extra`` fields, a ``span`` turned into trace_id and span_id."""
    correlated = False
    for key, value in record.__dict__.items():
        if key in _STANDARD or key.startswith("_"):
            continue
        if key == "span":
            correlated = True
            yield from _span_ids(value)
        else:
            correlated = correlated or key == "trace_id"
            yield key, value
    if not correlated:
        yield from _span_ids(trace.get_current_span())


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _extras(record):
            out[key] = value if isinstance(value, int | float | bool) else str(value)
        if record.exc_info and record.exc_info[0] is not None:
            out["error"] = f"{record.exc_info[0].__name__}: {record.exc_info[1]}"
            # The traceback as one field: a log pipeline gets one JSON object per line.
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        extras = [f"{k}={v}" for k, v in _extras(record)]
        return f"{base} {' '.join(extras)}" if extras else base


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    name = _GOKEYLESS_LEVELS.get(str(level), str(level)).upper()
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(name)
    # gRPC's and asyncio's chatter is not ours to show at info level.
    logging.getLogger("asyncio").setLevel(max(logging.WARNING, root.level))
