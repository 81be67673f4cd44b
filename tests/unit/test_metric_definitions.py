from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from service.core.clock import ManualClock
from service.metrics.collector import MetricsCollector
from service.metrics.definitions import DECLARED, SUPERVISOR


def test_every_metric_is_declared_once() -> None:
    names = [d.name for d in (*DECLARED, *SUPERVISOR)]
    assert len(names) == len(set(names))


def test_declarations_are_consistent_with_their_kind() -> None:
    for d in (*DECLARED, *SUPERVISOR):
        assert bool(d.buckets) == (d.kind == "histogram"), d.name
        assert not (d.kind == "histogram" and d.on_scrape), d.name
        assert d.bus_each is None or len(d.labels) == 1, d.name
        assert not d.optional or d.on_scrape, d.name  # a stored metric is always there


def test_the_exposition_holds_exactly_the_declared_families_in_their_order() -> None:
    m = MetricsCollector(ManualClock())
    m.set_watermark(0.0)
    m.set_lease_leader(False)
    m.set_ledger_view(lambda: {"received": 0, "imbalance": 0})
    m.set_source_view(lambda: {"1": {"lag": 0, "queue_depth": 0}})  # once sources read
    m.for_source(1).on_messages_received("memory", 1, 1)
    m.for_source(1).on_bus_error("memory", True)
    text = m.exposition().decode()
    exported = [f.name for f in text_string_to_metric_families(text)]
    assert exported == [d.full_name for d in DECLARED]
    assert "_created" not in text
