"""EventAggregator: windows, per-partition watermarks and idleness, grace, lateness,
the quiet rule, validation, state."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from service.aggregation.aggregator import EventAggregator
from service.bus.base import SourceBatch
from service.checkpoints.base import PartitionCheckpoint
from service.config import AggregationConfig
from service.core.clock import ManualClock
from service.core.events import Aggregate
from service.metrics.collector import MetricsCollector
from service.pipeline.flow import Outputs

NOW = 1_700_000_000.0
CLOCK = NOW + 3600.0
"""The service clock: an hour after the event times these tests use, so that none is
ahead of it (AGGREGATION_MAX_WATERMARK_LEAD) unless a test means it to be."""


def make(clock: ManualClock | None = None, **cfg: Any) -> tuple[EventAggregator, ManualClock]:
    clock = clock or ManualClock(CLOCK)
    agg = EventAggregator(
        AggregationConfig(**{"interval_s": 60.0, **cfg}), MetricsCollector(clock), clock
    )
    return agg, clock


def batch(
    records: list[Any],
    partition: str = "p0",
    *,
    position: str | None = None,
    caught_up: bool = False,
    offsets: list[int] | None = None,
) -> SourceBatch:
    return SourceBatch(partition, records, f"test {partition}", position, NOW, offsets, caught_up)


def report(agg: EventAggregator, partition: str = "p0") -> Outputs:
    """What a bus sends for a caught-up partition that delivered nothing (about 1/s)."""
    return agg.process(batch([], partition, caught_up=True))


def ev(name: str, value: float, ts: float, func: str | None = "sum") -> bytes:
    obj: dict[str, Any] = {"name": name, "value": value, "timestamp": ts}
    if func is not None:
        obj["agg_func"] = func
    return orjson.dumps(obj)


def by_key(aggs: list[Aggregate]) -> dict[tuple[str, str, float], Aggregate]:
    return {(a.name, a.agg_func, a.window_start): a for a in aggs}


def test_window_closes_when_watermark_passes_end() -> None:
    agg, _ = make()
    out = agg.process(batch([ev("a", 1, NOW - 100), ev("a", 2, NOW - 90)]))
    assert out.aggregates == []
    start = (NOW - 100) // 60 * 60
    out = agg.process(batch([ev("a", 5, start + 60)]))
    [a] = out.aggregates
    assert (a.name, a.agg_func, a.value, a.count) == ("a", "sum", 3.0, 2)
    assert (a.window_start, a.window_end) == (start, start + 60)
    assert agg.open_windows == 1


def test_grace_keeps_window_open_for_out_of_order_events() -> None:
    agg, _ = make(grace_s=30.0)
    start = 1_699_999_980.0  # a multiple of 60
    agg.process(batch([ev("a", 1, start + 10)]))
    out = agg.process(batch([ev("a", 1, start + 80)]))  # watermark = start+50 < end
    assert out.aggregates == []
    out = agg.process(batch([ev("a", 1, start + 20)]))  # out of order, within grace
    assert out.dead_letters == []
    out = agg.process(batch([ev("b", 1, start + 95)]))  # watermark = start+65 >= end
    assert by_key(out.aggregates)[("a", "sum", start)].count == 2


def test_event_of_an_emitted_window_is_late_and_dead_lettered() -> None:
    agg, _ = make()
    start = 1_699_999_980.0
    agg.process(batch([ev("a", 1, start + 1)]))
    agg.process(batch([ev("a", 1, start + 61)]))
    out = agg.process(batch([ev("a", 7, start + 2)], offsets=[42]))
    assert out.aggregates == []
    [dl] = out.dead_letters
    assert dl.reason == "late"
    assert dl.source == "test p0 offset=42"
    assert orjson.loads(dl.raw)["value"] == 7


def test_idle_stream_flushes_open_windows_after_idle_timeout() -> None:
    agg, clock = make()
    agg.process(batch([ev("a", 4, NOW - 5)]))
    clock.advance(59)
    assert not report(agg)
    clock.advance(1)
    out = report(agg)
    assert [a.value for a in out.aggregates] == [4.0]
    assert agg.open_windows == 0
    # the flushed window is closed: a straggler for it is late
    assert agg.process(batch([ev("a", 1, NOW - 4)])).dead_letters[0].reason == "late"


def test_empty_batches_do_not_count_as_messages_for_the_idle_rule() -> None:
    agg, clock = make()
    agg.process(batch([ev("a", 4, NOW - 5)]))
    clock.advance(30)
    agg.process(batch([], caught_up=True))
    clock.advance(30)
    assert report(agg).aggregates


def test_watermark_is_the_minimum_over_partitions_that_carry_data() -> None:
    agg, _ = make()
    start = 1_699_999_980.0
    agg.process(batch([ev("a", 1, start + 1)], "p0"))
    agg.process(batch([ev("a", 2, start + 2)], "p1"))
    out = agg.process(batch([ev("b", 1, start + 200)], "p0"))
    assert out.aggregates == []  # p1 still at start+2
    out = agg.process(batch([ev("c", 1, start + 70)], "p1"))
    merged = by_key(out.aggregates)[("a", "sum", start)]
    assert (merged.value, merged.count) == (3.0, 2)  # one key over two partitions, merged


def test_caught_up_partition_keeps_holding_until_silent_for_the_idle_period() -> None:
    agg, clock = make()
    start = 1_699_999_980.0
    agg.process(batch([ev("a", 1, start + 1)], "p1", caught_up=True))
    out = agg.process(batch([ev("b", 1, start + 1), ev("b", 1, start + 61)], "p0"))
    assert out.aggregates == []  # read up to its high watermark: p1 still holds
    clock.advance(59)
    assert report(agg, "p1").aggregates == []
    clock.advance(1)
    out = report(agg, "p1")  # silent for interval + grace: p1 lets go
    assert set(by_key(out.aggregates)) == {("a", "sum", start), ("b", "sum", start)}
    assert agg.partitions()["p1"]["idle"] and not agg.partitions()["p1"]["holds_watermark"]


def test_a_stale_report_does_not_make_a_partition_silent() -> None:
    """Reports carry the bus's time: one queued behind backpressure is not silence."""
    agg, clock = make()
    start = 1_699_999_980.0
    agg.process(batch([ev("a", 1, start + 1)], "p1", caught_up=True))
    polled = clock.monotonic()
    clock.advance(300)  # the stage was held up by an output meanwhile
    stale = SourceBatch("p1", [], "test p1", None, NOW, caught_up=True, polled_at=polled)
    agg.process(stale)
    out = agg.process(batch([ev("b", 1, start + 1), ev("b", 1, start + 61)], "p0"))
    assert out.aggregates == []
    assert agg.partitions()["p1"]["holds_watermark"]


def test_silent_partition_resuming_is_judged_by_its_own_history() -> None:
    agg, clock = make()
    start = 1_699_999_980.0
    agg.process(batch([ev("b", 1, start + 1)], "p0"))
    agg.process(batch([ev("a", 1, start + 1)], "p1", caught_up=True))
    clock.advance(60)
    assert report(agg, "p1").aggregates == []  # p1 is silent now; p0 still holds
    out = agg.process(batch([ev("b", 1, start + 200)], "p0"))
    assert ("a", "sum", start) in by_key(out.aggregates)
    # p1 speaks again, in a window p0 has passed but none of p1's was emitted for
    out = agg.process(batch([ev("a", 2, start + 70)], "p1"))
    assert out.dead_letters == []
    out = agg.process(batch([ev("a", 5, start + 2)], "p1"))  # its own emitted window
    assert [d.reason for d in out.dead_letters] == ["late"]


def test_adopted_partition_is_judged_against_its_own_emitted_boundary() -> None:
    """A partition moved from another instance brings its history: its replayed events
    are older than what this instance's own partitions emitted, and none is late."""
    start = 1_699_999_980.0
    donor, clock = make()
    donor.process(batch([ev("m", 1, start + 1), ev("m", 1, start + 65)], "p1", position="2"))
    [moved] = donor.release(["p1"])
    agg, _ = make(clock)
    agg.process(batch([ev("a", 1, start + 1), ev("a", 1, start + 500)], "p0"))
    agg.restore([moved])
    out = agg.process(batch([ev("m", 3, start + 70), ev("m", 1, start + 130)], "p1"))
    assert out.dead_letters == []
    got = by_key(out.aggregates)
    assert got[("m", "sum", start + 60)].value == 4.0  # restored window + replayed event
    assert ("a", "sum", start) not in got  # emitted before: nothing emitted twice


def test_partition_with_unknown_unread_data_holds_everything_back() -> None:
    agg, _ = make()
    agg.restore([PartitionCheckpoint("p1", None, None)])
    out = agg.process(batch([ev("b", 1, NOW - 200), ev("b", 1, NOW - 10)], "p0"))
    assert out.aggregates == []


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (b"{not json", "invalid_json"),
        (b"[1]", "not_an_object"),
        (b'{"value": 1, "timestamp": 1}', "missing_name"),
        (b'{"name": "", "value": 1, "timestamp": 1}', "invalid_name"),
        (orjson.dumps({"name": "x" * 201, "value": 1, "timestamp": 1}), "invalid_name"),
        (b'{"name": "a", "timestamp": 1}', "missing_value"),
        (b'{"name": "a", "value": true, "timestamp": 1}', "invalid_value"),
        (b'{"name": "a", "value": "3", "timestamp": 1}', "invalid_value"),
        (b'{"name": "a", "value": NaN, "timestamp": 1}', "invalid_value"),
        (b'{"name": "a", "value": 1e999, "timestamp": 1}', "invalid_value"),
        (b'{"name": "a", "value": 1' + b"0" * 400 + b', "timestamp": 1}', "invalid_value"),
        (b'{"name": "a", "value": 1}', "missing_timestamp"),
        (b'{"name": "a", "value": 1, "timestamp": "2026-11-23T10:00:00"}', "invalid_timestamp"),
        (b'{"name": "a", "value": 1, "timestamp": "yesterday"}', "invalid_timestamp"),
        (b'{"name": "a", "value": 1, "timestamp": true}', "invalid_timestamp"),
        (b'{"name": "a", "value": 1, "timestamp": 9e12}', "future_timestamp"),
        (b'{"name": "a", "value": 1, "timestamp": 1, "agg_func": "median"}', "unknown_agg_func"),
        (b'{"name": "a", "value": 1, "timestamp": 1, "agg_func": 3}', "unknown_agg_func"),
    ],
)
def test_invalid_event_is_rejected_with_its_reason(record: bytes, reason: str) -> None:
    agg, _ = make()
    out = agg.process(batch([record]))
    [dl] = out.dead_letters
    assert dl.reason == reason, dl.detail
    assert dl.detail
    assert agg.open_windows == 0


def test_array_elements_are_validated_one_by_one() -> None:
    agg, _ = make()
    good = {"name": "a", "value": 1, "timestamp": NOW - 5}
    out = agg.process(batch([orjson.dumps([good, {"name": "a"}, good]), b"[]"]))
    [dl] = out.dead_letters
    assert (dl.reason, orjson.loads(dl.raw)) == ("missing_value", {"name": "a"})
    assert agg.open_windows == 1


def test_agg_func_is_case_insensitive_and_defaults_to_sum() -> None:
    agg, clock = make()
    explicit_null = orjson.dumps({"name": "a", "value": 1, "timestamp": NOW - 5, "agg_func": None})
    agg.process(batch([ev("a", 2, NOW - 5, "SUM"), ev("a", 3, NOW - 5, None), explicit_null]))
    clock.advance(61)
    [a] = report(agg).aggregates
    assert (a.agg_func, a.value, a.count) == ("sum", 6.0, 3)


def test_iso_timestamp_with_offset_is_accepted() -> None:
    agg, clock = make()
    out = agg.process(batch([b'{"name":"a","value":1,"timestamp":"2023-11-14T22:13:00+01:00"}']))
    assert out.dead_letters == []
    clock.advance(61)
    [a] = report(agg).aggregates
    assert a.window_start == 1_699_996_380.0  # 21:13 UTC


def test_oversized_message_is_rejected_as_too_large() -> None:
    clock = ManualClock(NOW)
    agg = EventAggregator(AggregationConfig(), MetricsCollector(clock), clock, max_message_bytes=10)
    [dl] = agg.process(batch([ev("a", 1, NOW)])).dead_letters
    assert dl.reason == "too_large"


def test_cardinality_limit_dead_letters_events_that_would_open_a_window() -> None:
    agg, _ = make(max_open_windows=2)
    out = agg.process(
        batch([ev("a", 1, NOW - 5), ev("b", 1, NOW - 5), ev("c", 1, NOW - 5), ev("a", 1, NOW - 4)])
    )
    assert [d.reason for d in out.dead_letters] == ["cardinality_limit"]
    assert agg.open_windows == 2


def test_snapshot_and_restore_continue_the_same_windows() -> None:
    agg, clock = make()
    agg.process(batch([ev("a", 1, NOW - 5, "avg"), ev("a", 3, NOW - 5, "avg")], position="7"))
    snap = agg.snapshot()
    assert [c.position for c in snap] == ["7"]
    again, _ = make(clock)
    again.restore(snap)
    assert again.positions() == {"p0": "7"}
    again.process(batch([ev("a", 5, NOW - 4, "avg")], position="8"))
    clock.advance(61)
    [a] = report(again).aggregates
    assert (a.value, a.count) == (3.0, 3)


def test_release_returns_state_and_forgets_the_partition() -> None:
    agg, _ = make()
    agg.process(batch([ev("a", 1, NOW - 5)], "p0", position="1"))
    agg.process(batch([ev("b", 1, NOW - 5)], "p1", position="1"))
    [cp] = agg.release(["p1"])
    assert cp.partition == "p1" and cp.state
    assert agg.open_windows == 1
    assert set(agg.positions()) == {"p0"}


def test_restore_rejects_an_unknown_state_format() -> None:
    agg, _ = make()
    bad = orjson.dumps({"format": 99, "windows": []})
    with pytest.raises(ValueError, match="format 99"):
        agg.restore([PartitionCheckpoint("p0", "1", bad)])


def test_lateness_does_not_depend_on_batch_boundaries() -> None:
    start = 1_699_999_980.0
    stream = [
        ev("a", 1, start + 1),
        ev("a", 1, start + 61),
        ev("a", 5, start + 2),
        ev("a", 1, start + 130),
    ]
    one, _ = make()
    together = one.process(batch(stream))
    split, _ = make()
    apart = [split.process(batch([r])) for r in stream]
    assert [d.reason for d in together.dead_letters] == ["late"]
    assert [d.reason for o in apart for d in o.dead_letters] == ["late"]
    assert by_key(together.aggregates) == by_key([a for o in apart for a in o.aggregates])


def test_per_partition_watermark_holding_and_lag_are_exported() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    agg, clock = make(grace_s=2.0)
    metrics = agg._metrics
    start = 1_699_999_980.0
    agg.process(batch([ev("a", 1, start + 30)], "p0"))
    lagging = SourceBatch("p1", [ev("b", 1, start + 10)], "t", "1", NOW, lag=7)
    agg.process(lagging)
    clock.advance(62)
    report(agg, "p1")  # p1: caught up, silent for longer than the idle period
    view = agg.partitions()
    assert view["p0"]["holds_watermark"] and view["p0"]["why"] == "delivering"
    assert view["p1"]["idle"] and view["p1"]["why"].startswith("no message for")
    families = {f.name: f for f in text_string_to_metric_families(metrics.exposition().decode())}

    def gauge(name: str) -> dict[str, float]:
        family = families[f"vabus_aggregator_partition_{name}"]
        return {s.labels["partition"]: s.value for s in family.samples}

    assert gauge("watermark_seconds") == {"p0": start + 28, "p1": start + 8}
    assert gauge("holds_watermark") == {"p0": 1.0, "p1": 0.0}
    assert gauge("seconds_since_message")["p1"] == pytest.approx(62.0)
    assert "p1" not in gauge("lag_messages")  # the last report knew no lag
    agg.process(SourceBatch("p1", [], "t", None, NOW, caught_up=False, lag=4))
    families = {f.name: f for f in text_string_to_metric_families(metrics.exposition().decode())}
    assert gauge("lag_messages") == {"p1": 4.0}
    assert gauge("holds_watermark")["p1"] == 1.0  # unread data again: it holds


def test_replays_of_the_routing_stage_are_dropped_and_the_marks_are_checkpointed() -> None:
    """Repartitioned input: records whose origin this partition already delivered (the
    routing stage replayed them after a crash) count once, also after a restore."""
    agg, clock = make()
    start = 1_699_999_980.0
    first = [ev("a", 1, start + 1), ev("a", 2, start + 2), ev("b", 5, start + 3)]
    origins = [("in:0", 10, 0), ("in:0", 10, 1), ("in:1", 4, 0)]
    agg.process(SourceBatch("r:0", first, "t", "3", NOW, origins=origins))
    [saved] = agg.snapshot()
    replay = [ev("a", 2, start + 2), ev("b", 5, start + 3), ev("a", 7, start + 4)]
    again = [("in:0", 10, 1), ("in:1", 4, 0), ("in:0", 11, 0)]
    for target in (agg, restored := make(clock)[0]):
        if target is restored:
            target.restore([saved])
        target.process(SourceBatch("r:0", list(replay), "t", "6", NOW, origins=list(again)))
        clock.advance(61)
        out = report(target, "r:0")
        sums = {(a.name, a.value, a.count) for a in out.aggregates}
        assert sums == {("a", 10.0, 3), ("b", 5.0, 1)}
