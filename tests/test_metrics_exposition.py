"""The shared metrics registry's exposition, and the services' process tuning."""

from __future__ import annotations

import subprocess
import sys

from prometheus_client.parser import text_string_to_metric_families

from signer.common.metrics import Registry


def test_counters_kept_elsewhere_are_read_at_scrape_time() -> None:
    totals = {"a": 3.0}
    r = Registry()
    r.counter("demo_sent", "Sent.", ["peer"], read=lambda: {(k,): v for k, v in totals.items()})
    inc = r.counter("demo_seen", "Seen.", ["peer"])
    inc.inc(("x",), 2)

    def scrape() -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
        out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        for family in text_string_to_metric_families(r.render().decode()):
            if family.name.startswith("demo_"):
                assert family.type == "counter"
                out[family.name] = {tuple(sorted(s.labels.items())): s.value
                                    for s in family.samples}
        return out

    assert scrape() == {"demo_sent": {(("peer", "a"),): 3.0},
                        "demo_seen": {(("peer", "x"),): 2.0}}
    totals["a"] = 5.0
    totals["b"] = 1.0
    assert scrape()["demo_sent"] == {(("peer", "a"),): 5.0, (("peer", "b"),): 1.0}


def test_settle_heap_freezes_start_up_objects_and_raises_the_threshold() -> None:
    code = (
        "import gc\n"
        "from signer.common.runtime import GC_THRESHOLD, settle_heap\n"
        "assert gc.get_freeze_count() == 0\n"
        "settle_heap()\n"
        "assert gc.get_freeze_count() > 1000, gc.get_freeze_count()\n"
        "assert gc.get_threshold() == GC_THRESHOLD\n"
        "assert gc.isenabled()\n"  # cycles are still collected, less often
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
