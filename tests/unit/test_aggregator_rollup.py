"""One message with many rejected elements costs a bounded number of dead letters: past
the first DEAD_LETTERS_PER_MESSAGE they roll up into one per reason with the count, and
elements past VABUS_MAX_EVENTS_PER_MESSAGE are one ``too_large`` dead letter. The
ledger and the rejection metrics still count every element."""

from __future__ import annotations

import time
from typing import Any

import orjson

from service.aggregation.aggregator import DEAD_LETTERS_PER_MESSAGE, EventAggregator
from service.bus.base import SourceBatch
from service.config import AggregationConfig
from service.core.clock import ManualClock
from service.metrics.collector import MetricsCollector

NOW = 1_700_000_000.0


def make(**kwargs: Any) -> tuple[EventAggregator, MetricsCollector]:
    clock = ManualClock(NOW)
    metrics = MetricsCollector(clock)
    agg = EventAggregator(AggregationConfig(interval_s=60.0), metrics, clock, **kwargs)
    return agg, metrics


def kafka_batch(*messages: bytes, offset: int = 7) -> SourceBatch:
    offsets = list(range(offset, offset + len(messages)))
    return SourceBatch("in:0", list(messages), "kafka in/0", str(offsets[-1] + 1), NOW, offsets)


def good(i: int, ts: float = NOW - 30) -> dict[str, Any]:
    return {"name": f"n{i % 3}", "value": 1, "timestamp": ts}


def balanced(ledger: dict[str, int]) -> bool:
    return ledger["imbalance"] == 0


def test_many_invalid_elements_of_one_message_roll_up_into_one_dead_letter() -> None:
    agg, metrics = make()
    elements: list[Any] = [good(0), *([1] * 5000), good(1), *([{"value": 1}] * 300), good(2)]
    out = agg.process(kafka_batch(orjson.dumps(elements)))
    letters = out.dead_letters
    assert len(letters) == DEAD_LETTERS_PER_MESSAGE + 2  # individual ones + a roll-up per reason
    rolled = {d.reason: d for d in letters[DEAD_LETTERS_PER_MESSAGE:]}
    assert set(rolled) == {"not_an_object", "missing_name"}
    assert rolled["not_an_object"].detail.startswith(f"{5000 - DEAD_LETTERS_PER_MESSAGE} more")
    assert rolled["missing_name"].detail.startswith("300 more")
    assert all(d.source == "kafka in/0 offset=7" for d in letters)
    assert metrics.events_rejected == {"not_an_object": 5000, "missing_name": 300}
    assert metrics.dead_letters_rolled_up == 5300 - DEAD_LETTERS_PER_MESSAGE
    ledger = agg.ledger()
    assert ledger["received"] == 5303 and ledger["aggregated"] == 3
    assert ledger["rejected:not_an_object"] == 5000 and ledger["rejected:missing_name"] == 300
    assert balanced(ledger)


def test_each_message_has_its_own_dead_letter_allowance() -> None:
    agg, _ = make()
    message = orjson.dumps([1] * 150)
    out = agg.process(kafka_batch(message, message))
    assert len(out.dead_letters) == 2 * (DEAD_LETTERS_PER_MESSAGE + 1)
    assert {d.source for d in out.dead_letters} == {"kafka in/0 offset=7", "kafka in/0 offset=8"}
    assert agg.ledger()["rejected:not_an_object"] == 300


def test_late_elements_of_one_message_roll_up_and_cost_no_scan_each() -> None:
    agg, metrics = make()
    agg.process(kafka_batch(orjson.dumps(good(0, NOW))))  # closes the windows before NOW - 60
    late = orjson.dumps([good(i, NOW - 600) for i in range(5_000)])
    started = time.perf_counter()
    out = agg.process(kafka_batch(late, offset=8))
    assert time.perf_counter() - started < 5.0  # one scan per written dead letter, not per event
    assert [d.reason for d in out.dead_letters] == ["late"] * (DEAD_LETTERS_PER_MESSAGE + 1)
    assert metrics.events_late == 5_000
    ledger = agg.ledger()
    assert ledger["late"] == 5_000 and balanced(ledger)


def test_elements_past_the_cap_are_one_too_large_dead_letter_and_the_rest_aggregate() -> None:
    agg, metrics = make(max_events_per_message=1000)
    out = agg.process(kafka_batch(orjson.dumps([good(i) for i in range(1500)])))
    assert [d.reason for d in out.dead_letters] == ["too_large"]
    assert out.dead_letters[0].detail.startswith("500 elements past the first 1000")
    assert metrics.events_rejected == {"too_large": 500}
    ledger = agg.ledger()
    assert ledger["received"] == 1500 and ledger["aggregated"] == 1000
    assert ledger["rejected:too_large"] == 500 and balanced(ledger)
