"""What Keyward's benchmark commands share: docs/benchmarks.md, where each owns one
section between its own start and end markers and replaces only that section when it
runs, and the percentile their latency figures use."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

DOC_HEADER = (
    "# Benchmarks\n\nFigures measured on real processes with Keyward's benchmark commands. "
    "Each section\nis written by the command it names and replaced when that command runs "
    "again.\n"
)


def write_section(path: Path, section: str, start: str, end: str) -> None:
    """Replace the section between ``start`` and ``end`` in ``path`` (or append it).

    Written to a temporary file and renamed, so a reader never sees half a file.
    """
    text = path.read_text() if path.exists() else DOC_HEADER
    i, j = text.find(start), text.find(end)
    if i != -1 and j > i:
        text = text[:i] + section.rstrip("\n") + text[j + len(end) :]
        if not text.endswith("\n"):
            text += "\n"
    else:
        text = text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of already sorted values, nearest rank; 0 for none."""
    if not sorted_values:
        return 0.0
    i = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[i]
