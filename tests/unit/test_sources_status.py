"""Per-source statistics: counted through each source's view of the metrics, lag and
queue depth read when asked."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from service.config import load_config
from service.core.clock import ManualClock
from service.metrics.collector import MetricsCollector
from service.ops.sources import source_view, sources_status


def samples(m: MetricsCollector, family: str) -> dict[str, float]:
    text = m.exposition().decode()
    return {
        s.labels["source"]: s.value
        for f in text_string_to_metric_families(text)
        if f.name == family
        for s in f.samples
    }


def test_what_a_source_bus_reports_counts_for_it_and_for_the_service() -> None:
    clock = ManualClock()
    m = MetricsCollector(clock)
    first, second = m.for_source(1), m.for_source(2)
    first.on_messages_received("kafka", 2, 5)
    clock.advance(3.0)
    second.on_messages_received("http", 4, 4)
    second.on_bus_error("http", True)
    second.on_bus_error("http", False)
    assert m.events_received == 9  # the service's totals are shared
    assert m.bus_errors[("http", True)] == 1
    assert samples(m, "vabus_aggregator_source_events_received") == {"1": 5.0, "2": 4.0}
    assert samples(m, "vabus_aggregator_source_errors") == {"2": 2.0}
    assert samples(m, "vabus_aggregator_source_last_event_seconds") == {
        "1": clock.now() - 3.0,
        "2": clock.now(),
    }
    m.on_messages_received("memory", 1, 1)  # a bus without a source view counts for none
    assert samples(m, "vabus_aggregator_source_events_received") == {"1": 5.0, "2": 4.0}


def test_lag_and_partitions_are_grouped_by_the_source_their_id_names() -> None:
    partitions: dict[str, dict[str, Any]] = {
        "events:0": {"lag": 3},
        "events:1": {"lag": None},
        "s2/http": {"lag": None},
        "s3/other:0": {"lag": 5},
        "s3/other:1": {"lag": 1},
    }
    view = source_view(3, lambda: partitions, lambda: {"1": 0, "2": 7, "3": 1})
    assert view() == {
        "1": {"lag": 3, "queue_depth": 0, "partitions": 2},
        "2": {"lag": None, "queue_depth": 7, "partitions": 1},
        "3": {"lag": 6, "queue_depth": 1, "partitions": 2},
    }
    m = MetricsCollector(ManualClock())
    m.set_source_view(view)
    assert samples(m, "vabus_aggregator_source_lag_messages") == {"1": 3.0, "3": 6.0}
    assert samples(m, "vabus_aggregator_source_queue_depth") == {"1": 0, "2": 7.0, "3": 1.0}


def test_status_lists_every_source_in_order_also_before_it_delivered() -> None:
    config = load_config({"VABUS_URL": "kafka://k:9092/a?group=g1 http://bus:8080"}, dotenv=None)
    clock = ManualClock()
    m = MetricsCollector(clock)
    m.set_source_view(source_view(2, lambda: {"a:0": {"lag": 2}}, dict))
    m.for_source(1).on_messages_received("kafka", 1, 1)
    first, second = sources_status(config, m)
    assert first == {
        "source": 1,
        "transport": "kafka",
        "url": "kafka://k:9092/a?group=g1",
        "events": 1,
        "errors": 0,
        "last_event_time": clock.now(),
        "lag": 2,
        "queue_depth": None,
        "partitions": 1,
    }
    assert second["source"] == 2 and second["transport"] == "http" and second["events"] == 0
    assert second["last_event_time"] is None and second["partitions"] == 0


def test_one_source_is_source_1() -> None:
    config = load_config({"VABUS_URL": "http://bus:8080"}, dotenv=None)
    m = MetricsCollector(ManualClock())
    m.set_source_view(source_view(1, dict, dict))
    (only,) = sources_status(config, m)
    assert only["source"] == 1 and only["url"] == "http://bus:8080"
