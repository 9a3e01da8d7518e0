"""``keyward signer-bench``: a quick run end to end, and the docs section it writes.

The quick run is a smoke test of the whole benchmark (token, keys, direct signing in
threads and processes, real signer processes, unary and streaming load, signature
checks, the report); it asserts that every mode produced figures and no errors, never
how fast anything was.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from softhsm import unavailable_reason

from signer.bench import END_MARKER, START_MARKER
from signer.common.benchdoc import percentile, write_section

EXPECTED_MODES = {
    "direct, 1 thread",
    "direct, 2 threads",
    "direct, 2 processes",
    "API unary, 1 signer",
    "API stream, 1 signer",
    "API unary, 2 signers",
    "API stream, 2 signers",
}


def test_write_section_replaces_only_its_own_section(tmp_path: Path) -> None:
    doc = tmp_path / "docs" / "benchmarks.md"
    write_section(doc, f"{START_MARKER}\nfirst\n{END_MARKER}\n", START_MARKER, END_MARKER)
    assert doc.read_text().startswith("# Benchmarks")
    doc.write_text(doc.read_text() + "\n## Gateway\n\nkept\n")
    write_section(doc, f"{START_MARKER}\nsecond\n{END_MARKER}\n", START_MARKER, END_MARKER)
    text = doc.read_text()
    assert text.count(START_MARKER) == 1 and text.count(END_MARKER) == 1
    assert "second" in text and "first" not in text
    assert "## Gateway\n\nkept" in text


@pytest.mark.slow
def test_percentile_is_the_nearest_rank_of_sorted_values() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 0.5) == 51.0  # round(0.5 * 99) = 50 -> the 51st value
    assert percentile(values, 0.99) == 99.0
    assert percentile(values, 0.0) == 1.0
    assert percentile(values, 1.0) == 100.0
    assert percentile([7.0], 0.99) == 7.0
    assert percentile([], 0.5) == 0.0


def test_quick_run_measures_every_mode_and_writes_the_section(tmp_path: Path) -> None:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## Gateway\n\nother figures, kept\n")
    proc = subprocess.run(
        [sys.executable, "-m", "signer.bench", "--quick", "--json", "--write", str(doc)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)

    seen: dict[str, set[str]] = {}
    for result in report["results"]:
        mode = result["mode"]
        seen.setdefault(result["algorithm"], set()).add(mode)
        assert result["ops"] > 0, mode
        assert result["ops_per_s"] > 0, mode
        assert result["p50_ms"] > 0 and result["p99_ms"] >= result["p50_ms"], mode
        assert result["errors"] == 0, mode
        if result["path"] != "direct":
            assert result["ratio"] is not None and result["ratio"] > 0, mode
    assert seen == {"RSA-2048": EXPECTED_MODES, "ECDSA P-256": EXPECTED_MODES}
    assert sum(r["verified"] for r in report["results"]) > 0
    assert {t["name"] for t in report["targets"]} == {
        "RSA-2048 through the API (stream)",
        "RSA-2048 through the API (unary)",
        "ECDSA P-256 streaming, 2 signers",
    }

    text = doc.read_text()
    assert text.count(START_MARKER) == 1 and text.count(END_MARKER) == 1
    section = text[text.index(START_MARKER) : text.index(END_MARKER)]
    assert "keyward signer-bench --quick" in section
    assert "| ECDSA P-256 | API stream, 2 signers" in section
    assert "## Gateway\n\nother figures, kept" in text
