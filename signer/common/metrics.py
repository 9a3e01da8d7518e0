"""Prometheus metrics, cheap enough for the request path.

prometheus_client's labelled metrics take a lock and a label lookup per update (about a
microsecond), and always rename counters to ``*_total``. Keyward records on the event
loop thread of each process, so plain dict updates are safe and cost tens of
nanoseconds; and gokeyless's metric names (``keyless_requests``,
``keyless_request_exec_duration_per_opcode``, ...) are kept exactly, so dashboards
built for gokeyless keep working. The text exposition is written here; the process
and platform collectors of prometheus_client are appended to it.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable, Sequence

from prometheus_client import (
    CollectorRegistry,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

# gokeyless's buckets: 100 µs x 2^n, 15 of them (top about 1.64 s).
GOKEYLESS_BUCKETS = tuple(0.0001 * 2**i for i in range(15))

Labels = tuple[str, ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if not float(v).is_integer() else f"{int(v)}"


class Metric:
    kind = "untyped"

    def __init__(self, name: str, doc: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.doc = doc
        self.labelnames = tuple(labelnames)

    def samples(self) -> Iterable[str]:
        return ()

    def render(self) -> str:
        lines = [f"# HELP {self.name} {self.doc}", f"# TYPE {self.name} {self.kind}"]
        lines.extend(self.samples())
        return "\n".join(lines) + "\n"


class _Values(Metric):
    """One number per label set: kept here, or (with ``read``) read at scrape time from
    a callback returning {labels: value}, for figures another object already keeps."""

    def __init__(
        self,
        name: str,
        doc: str,
        labelnames: Sequence[str] = (),
        read: Callable[[], dict[Labels, float]] | None = None,
    ) -> None:
        super().__init__(name, doc, labelnames)
        self.values: dict[Labels, float] = {}
        self.read = read

    def samples(self) -> Iterable[str]:
        values = self.read() if self.read is not None else dict(self.values)
        for labels, value in values.items():
            yield f"{self.name}{_labels(self.labelnames, labels)} {_num(value)}"


class Counter(_Values):
    kind = "counter"

    def inc(self, labels: Labels = (), amount: float = 1.0) -> None:
        v = self.values
        v[labels] = v.get(labels, 0.0) + amount

    def get(self, labels: Labels = ()) -> float:
        return self.values.get(labels, 0.0)


class Gauge(_Values):
    kind = "gauge"

    def set(self, labels: Labels, value: float) -> None:
        self.values[labels] = value


class Histogram(Metric):
    kind = "histogram"

    def __init__(
        self,
        name: str,
        doc: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = GOKEYLESS_BUCKETS,
    ) -> None:
        super().__init__(name, doc, labelnames)
        self.bounds = tuple(buckets)
        self.series: dict[Labels, list[float]] = {}  # per bucket counts, then sum, count

    def observe(self, labels: Labels, value: float, count: int = 1) -> None:
        """``count`` observations of ``value`` (a batch whose items took as long)."""
        s = self.series.get(labels)
        if s is None:
            s = self.series[labels] = [0.0] * (len(self.bounds) + 3)
        s[bisect.bisect_left(self.bounds, value)] += count
        s[-2] += value * count
        s[-1] += count

    def samples(self) -> Iterable[str]:
        n = len(self.bounds)
        for labels, s in list(self.series.items()):
            cumulative = 0.0
            for i, bound in enumerate((*self.bounds, math.inf)):
                cumulative += s[i]
                le = f'le="{_num(bound)}"' if i < n else 'le="+Inf"'
                yield f"{self.name}_bucket{_labels(self.labelnames, labels, le)} {_num(cumulative)}"
            yield f"{self.name}_sum{_labels(self.labelnames, labels)} {_num(s[-2])}"
            yield f"{self.name}_count{_labels(self.labelnames, labels)} {_num(s[-1])}"


class Registry:
    def __init__(self) -> None:
        self.metrics: list[Metric] = []
        self._process = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self._process)
        PlatformCollector(registry=self._process)

    def add(self, metric: Metric) -> Metric:
        self.metrics.append(metric)
        return metric

    def counter(
        self,
        name: str,
        doc: str,
        labelnames: Sequence[str] = (),
        read: Callable[[], dict[Labels, float]] | None = None,
    ) -> Counter:
        m = Counter(name, doc, labelnames, read)
        self.metrics.append(m)
        return m

    def gauge(
        self,
        name: str,
        doc: str,
        labelnames: Sequence[str] = (),
        read: Callable[[], dict[Labels, float]] | None = None,
    ) -> Gauge:
        m = Gauge(name, doc, labelnames, read)
        self.metrics.append(m)
        return m

    def histogram(
        self,
        name: str,
        doc: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = GOKEYLESS_BUCKETS,
    ) -> Histogram:
        m = Histogram(name, doc, labelnames, buckets)
        self.metrics.append(m)
        return m

    def render(self) -> bytes:
        text = "".join(m.render() for m in self.metrics)
        return text.encode() + generate_latest(self._process)
