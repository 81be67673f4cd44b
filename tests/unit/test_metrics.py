from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.core.clock import ManualClock
from service.core.events import Aggregate, Metric
from service.metrics.collector import MetricsCollector

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(metrics: MetricsCollector) -> Samples:
    """Parse the exposition the way Prometheus would; (sample name, labels) -> value."""
    text = metrics.exposition().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def key(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return (f"vabus_aggregator_{name}", frozenset(labels.items()))


def aggregate(i: int, emitted_at: float = 0.0) -> Aggregate:
    return Aggregate(f"m{i}", "sum", float(i), 1, 0.0, 60.0, emitted_at)


def exercise(m: MetricsCollector) -> None:
    m.on_messages_received("kafka", messages=3, events=7)
    m.on_messages_received("kafka", messages=1, events=2)
    m.on_bus_error("kafka", retriable=True)
    m.on_events_aggregated(6)
    m.on_events_rejected("invalid_json")
    m.on_events_rejected("missing_name", 2)
    m.on_events_late()
    m.on_aggregates_emitted([aggregate(1), aggregate(2)])
    m.set_open_windows(4)
    m.set_watermark(m.clock.now() - 30.0)
    m.on_sink_write("postgres", aggregates=2, dead_letters=3, seconds=0.02)
    m.on_sink_error("kafka", retriable=True)
    m.on_sink_error("kafka", retriable=False)
    m.on_aggregates_durable([m.clock.now() - 0.5, m.clock.now() - 1.5])
    m.on_checkpoint(0.004)
    m.on_subscriber_crash("aggregator")
    m.set_queue_depth("aggregator", 11)


def test_hook_effects_are_visible_in_the_snapshot() -> None:
    m = MetricsCollector(ManualClock())
    exercise(m)
    snap = m.snapshot()
    assert snap["events_received"] == 9
    assert snap["messages_received"] == {"kafka": 4}
    assert snap["bus_errors"] == {"kafka": {"retriable": 1}}
    assert snap["events_aggregated"] == 6
    assert snap["events_rejected"] == 3
    assert snap["events_rejected_by_reason"] == {"invalid_json": 1, "missing_name": 2}
    assert snap["events_late"] == 1
    assert snap["aggregates_emitted"] == 2
    assert snap["open_windows"] == 4
    assert snap["processing_lag_seconds"] == pytest.approx(30.0)
    assert snap["sink_writes"] == {"postgres": 1}
    assert snap["sink_aggregates_written"] == {"postgres": 2}
    assert snap["sink_dead_letters_written"] == {"postgres": 3}
    assert snap["sink_errors"] == {"kafka": {"retriable": 1, "permanent": 1}}
    assert snap["emit_to_durable_seconds"]["count"] == 2
    assert snap["checkpoints"] == 1
    assert snap["queue_depth"] == {"aggregator": 11}
    assert snap["subscriber_crashes"] == {"aggregator": 1}
    assert [a["name"] for a in snap["latest_aggregates"]] == ["m1", "m2"]


def test_exposition_parses_and_carries_every_hook_effect() -> None:
    m = MetricsCollector(ManualClock())
    exercise(m)
    samples = scrape(m)
    assert samples[key("events_received_total")] == 9
    assert samples[key("messages_received_total", transport="kafka")] == 4
    assert samples[key("bus_errors_total", transport="kafka", retriable="true")] == 1
    assert samples[key("events_aggregated_total")] == 6
    assert samples[key("events_rejected_total", reason="missing_name")] == 2
    assert samples[key("events_late_total")] == 1
    assert samples[key("aggregates_emitted_total")] == 2
    assert samples[key("sink_writes_total", sink="postgres")] == 1
    assert samples[key("sink_errors_total", sink="kafka", retriable="false")] == 1
    assert samples[key("open_windows")] == 4
    assert samples[key("queue_depth", subscriber="aggregator")] == 11
    assert samples[key("subscriber_crashes_total", subscriber="aggregator")] == 1
    assert samples[key("watermark_seconds")] == m.watermark
    assert samples[key("processing_lag_seconds")] == pytest.approx(30.0)
    assert samples[key("emit_to_durable_seconds_count")] == 2
    assert samples[key("emit_to_durable_seconds_sum")] == pytest.approx(2.0)
    assert samples[key("emit_to_durable_seconds_bucket", le="1.0")] == 1
    assert samples[key("emit_to_durable_seconds_bucket", le="+Inf")] == 2
    assert samples[key("checkpoint_seconds_count")] == 1
    assert samples[key("sink_write_seconds_count", sink="postgres")] == 1
    assert key("events_per_second") in samples


def test_exposition_has_no_watermark_until_one_is_known() -> None:
    m = MetricsCollector(ManualClock())
    samples = scrape(m)
    assert key("watermark_seconds") not in samples
    assert key("processing_lag_seconds") not in samples
    assert m.snapshot()["processing_lag_seconds"] is None


def test_unknown_reject_reason_is_counted_as_other_so_labels_stay_bounded() -> None:
    m = MetricsCollector(ManualClock())
    m.on_events_rejected("ValueError: could not parse 'abc\ndef'")
    assert scrape(m)[key("events_rejected_total", reason="other")] == 1


def test_two_collectors_keep_separate_registries() -> None:
    a, b = MetricsCollector(ManualClock()), MetricsCollector(ManualClock())
    a.on_events_late(5)
    assert scrape(a)[key("events_late_total")] == 5
    assert scrape(b)[key("events_late_total")] == 0


def test_events_per_second_counts_only_the_last_ten_seconds() -> None:
    clock = ManualClock()
    m = MetricsCollector(clock)
    clock.advance(20.0)
    m.on_messages_received("http", 1, 1000)
    clock.advance(5.0)
    m.on_messages_received("http", 1, 100)
    assert m.events_per_second() == pytest.approx(110.0)
    clock.advance(5.0)  # the 1000 fall out of the window
    assert m.events_per_second() == pytest.approx(10.0)
    clock.advance(5.0)
    assert m.events_per_second() == 0.0


def test_events_per_second_of_a_young_collector_divides_by_its_age() -> None:
    clock = ManualClock()
    m = MetricsCollector(clock)
    clock.advance(2.0)
    m.on_messages_received("http", 1, 50)
    assert m.events_per_second() == pytest.approx(25.0)


def test_latency_quantiles_come_from_emit_to_durable_samples() -> None:
    clock = ManualClock()
    m = MetricsCollector(clock)
    assert m.latency_quantiles() == {"p50": None, "p95": None, "p99": None}
    now = clock.now()
    m.on_aggregates_durable([now - i / 100 for i in range(1, 101)])
    q = m.latency_quantiles()
    assert q["p50"] == pytest.approx(0.50)
    assert q["p95"] == pytest.approx(0.95)
    assert q["p99"] == pytest.approx(0.99)


def test_latency_reservoir_keeps_only_the_latest_samples() -> None:
    clock = ManualClock()
    m = MetricsCollector(clock)
    m.on_aggregates_durable([clock.now() - 100.0] * 10_000)
    m.on_aggregates_durable([clock.now() - 1.0] * 10_000)
    assert m.latency_quantiles()["p99"] == pytest.approx(1.0)
    assert m.snapshot()["emit_to_durable_seconds"]["count"] == 20_000


def test_latest_aggregates_keeps_the_last_ten() -> None:
    m = MetricsCollector(ManualClock())
    m.on_aggregates_emitted([aggregate(i) for i in range(15)])
    m.on_aggregates_emitted([aggregate(99)])
    assert [a.name for a in m.latest_aggregates] == [f"m{i}" for i in range(6, 15)] + ["m99"]


def test_bus_metrics_cover_the_contract_list_stamped_with_clock_now() -> None:
    clock = ManualClock()
    m = MetricsCollector(clock)
    exercise(m)
    by_name = {x.name: x for x in m.to_bus_metrics() if not x.labels}
    for name in (
        "events_received",
        "events_rejected",
        "events_late",
        "aggregates_emitted",
        "sink_errors",
        "open_windows",
        "queue_depth",
        "events_per_second",
        "processing_lag_seconds",
        "emit_to_durable_p50_seconds",
        "emit_to_durable_p95_seconds",
        "emit_to_durable_p99_seconds",
    ):
        assert by_name[f"vabus_aggregator.{name}"].timestamp == clock.now()
    assert by_name["vabus_aggregator.events_received"].value == 9
    assert by_name["vabus_aggregator.sink_errors"].value == 2
    assert by_name["vabus_aggregator.queue_depth"].value == 11


def test_bus_metrics_send_unknown_values_as_null() -> None:
    m = MetricsCollector(ManualClock())
    by_name = {x.name: x.to_json_obj() for x in m.to_bus_metrics()}
    assert by_name["vabus_aggregator.processing_lag_seconds"]["value"] is None
    assert by_name["vabus_aggregator.emit_to_durable_p99_seconds"]["value"] is None


class RecordingSender:
    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.sent: list[Sequence[Metric]] = []
        self.called = asyncio.Event()

    async def __call__(self, metrics: Sequence[Metric]) -> None:
        self.called.set()
        if self.failures:
            self.failures -= 1
            raise ConnectionError("bus is down")
        self.sent.append(metrics)


async def next_call(sender: RecordingSender) -> None:
    async with asyncio.timeout(5):
        await sender.called.wait()
    sender.called.clear()


async def test_publish_forever_sends_once_per_interval_of_the_injected_clock() -> None:
    clock = ManualClock()
    m = MetricsCollector(clock)
    sender = RecordingSender()
    task = asyncio.create_task(m.publish_forever(sender, interval_s=10.0))
    try:
        async with asyncio.timeout(5):
            await clock.sleeping()  # the publisher waits out its interval
        clock.advance(9.0)
        assert clock.sleepers == 1 and sender.sent == []  # its wait has 1 s to go
        m.on_events_late(3)
        clock.advance(1.0)
        await next_call(sender)
        values = {x.name: x.value for x in sender.sent[0]}
        assert values["vabus_aggregator.events_late"] == 3
        async with asyncio.timeout(5):
            await clock.sleeping()  # the next interval has begun
        clock.advance(10.0)
        await next_call(sender)
        assert len(sender.sent) == 2
        assert sender.sent[1][0].timestamp == clock.now()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_publish_forever_survives_a_failing_sender() -> None:
    clock = ManualClock()
    m = MetricsCollector(clock)
    sender = RecordingSender(failures=1)
    task = asyncio.create_task(m.publish_forever(sender, interval_s=5.0))
    try:
        async with asyncio.timeout(5):
            await clock.sleeping()
        clock.advance(5.0)
        await next_call(sender)
        async with asyncio.timeout(5):
            await clock.sleeping()  # the failure is behind it: the publisher waits again
        assert m.metrics_publish_errors == 1
        assert not task.done()
        clock.advance(5.0)
        await next_call(sender)
        assert len(sender.sent) == 1
        assert m.snapshot()["metrics_publish_errors"] == 1
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_publish_forever_abandons_a_send_that_outlasts_the_interval() -> None:
    clock = ManualClock()
    m = MetricsCollector(clock)
    calls = 0

    async def hangs(metrics: Sequence[Metric]) -> None:
        nonlocal calls
        calls += 1
        await asyncio.Event().wait()

    # the bound is the interval in loop time, so keep it short for the test
    task = asyncio.create_task(m.publish_forever(hangs, interval_s=0.05))
    try:
        async with asyncio.timeout(5):
            await clock.sleeping()
        clock.advance(0.05)
        async with asyncio.timeout(5):
            while m.metrics_publish_errors == 0:
                await asyncio.sleep(0.01)
            await clock.sleeping()  # the publisher gave up the send and waits again
        assert calls == 1
        assert not task.done()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def test_a_worker_labels_every_metric_it_sends_to_the_bus_with_its_index() -> None:
    clock = ManualClock(1_700_000_000.0)
    sent = MetricsCollector(clock, {"worker": "1"}).to_bus_metrics()
    assert sent and all(m.labels.get("worker") == "1" for m in sent)
    depth = [m for m in sent if m.name.endswith("subscriber_queue_depth")]
    assert all(set(m.labels) == {"worker", "subscriber"} for m in depth)
    assert all(
        m.labels == {}
        for m in MetricsCollector(clock).to_bus_metrics()
        if not m.labels.get("subscriber")
    )
