"""Golden read-outs of a collector whose every hook was driven with fixed values.

The files under ``golden/`` were captured from the collector before its metrics were
declared once (issue 16); the exposition text, ``/status`` snapshot and bus metrics must
stay byte-for-byte what they were. Regenerate only for an intended change:
``python -m tests.unit.test_metrics_golden`` rewrites them.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from service.core.clock import ManualClock
from service.core.events import Aggregate, Metric
from service.metrics.collector import MetricsCollector
from service.workers.exposition import exposition, merge_expositions, supervisor_families
from service.workers.slot import WorkerSlot

GOLDEN = Path(__file__).parent / "golden"


async def fails(metrics: Sequence[Metric]) -> None:
    raise ConnectionError("bus is down")


def driven() -> MetricsCollector:
    """A worker's collector after one of everything, some twice, under a manual clock."""
    clock = ManualClock(1_700_000_000.0)
    m = MetricsCollector(clock, {"worker": "2"})
    m.set_partition_view(
        lambda: {
            "events:0": {
                "watermark": 1_699_999_900.0,
                "holds_watermark": True,
                "lag": 3,
                "seconds_since_message": 1.5,
            },
            "events:1": {
                "watermark": None,
                "holds_watermark": False,
                "lag": None,
                "seconds_since_message": 42.0,
            },
        }
    )
    m.set_ledger_view(
        lambda: {
            "received": 20,
            "aggregated": 12,
            "rejected": 5,
            "rejected:invalid_json": 5,
            "late": 1,
            "imbalance": 0,
        }
    )
    m.set_queue_view(lambda: {"sender": 2})
    clock.advance(3.0)
    m.on_messages_received("kafka", messages=3, events=7)
    m.on_messages_received("kafka", messages=1, events=2)
    m.on_messages_received("http", messages=1, events=11)
    m.on_bus_error("kafka", retriable=True)
    m.on_bus_error("kafka", retriable=False)
    m.on_bus_error("http", retriable=True)
    m.on_bus_protocol_error("kafka", "malformed_origin")
    m.on_bus_protocol_error("http", "response_too_large")
    m.set_lease_leader(True)
    m.on_lease_lost()
    m.on_events_aggregated(12)
    m.on_events_rejected("invalid_json")
    m.on_events_rejected("missing_name", 2)
    m.on_events_rejected("no such reason: 'x'", 2)
    m.on_dead_letters_rolled_up(4)
    m.on_replays_dropped(3)
    m.on_state_dropped("window")
    m.on_state_dropped("partition", 2)
    m.on_stage_rewind()
    m.on_events_late()
    m.on_events_late(2)
    m.on_events_late_applied(4)
    m.on_events_ahead(5)
    m.on_series_overflow(4)
    m.on_aggregates_emitted(
        [
            Aggregate(
                f"m{i}", "sum", i / 3, i, 1_699_999_800.0, 1_699_999_860.0, 1_699_999_990.0 + i
            )
            for i in range(12)
        ]
    )
    m.set_open_windows(4)
    m.set_watermark(1_699_999_950.25)
    m.on_sink_write("postgres", aggregates=2, dead_letters=3, seconds=0.02)
    m.on_sink_write("postgres", aggregates=5, dead_letters=0, seconds=1.0)
    m.on_sink_write("kafka", aggregates=7, dead_letters=1, seconds=0.0031)
    m.on_archive_written(files=2, events=30)
    m.on_sink_error("kafka", retriable=True)
    m.on_sink_error("kafka", retriable=False)
    m.on_sink_retry("kafka")
    m.on_sink_retry("checkpoints")
    m.on_sink_degraded("kafka")
    m.on_sink_degraded("postgres")
    m.set_sink_circuit("kafka", True)
    m.set_sink_circuit("postgres", False)
    clock.advance(2.5)
    m.on_sink_recovered("postgres")
    m.on_aggregates_durable(
        [clock.now() - 0.5, clock.now() - 1.5, clock.now() - 0.005, clock.now() + 3.0]
    )
    m.on_checkpoint(0.004)
    m.on_checkpoint(0.25)
    m.on_subscriber_crash("aggregator")
    m.set_queue_depth("aggregator", 11)
    m.set_queue_depth("sender", 9)  # the live view wins
    asyncio.run(m.publish_once(fails))
    clock.advance(1.25)
    return m


def workers_exposition() -> str:
    """WORKERS=N: two workers' texts merged (one of them unparsable) and the
    supervisor's own families."""
    slots = [WorkerSlot(0), WorkerSlot(1), WorkerSlot(2)]
    slots[1].restarts = 3
    texts = {"0": MetricsCollector(ManualClock()).exposition().decode(), "1": "not { it"}
    texts["2"] = driven().exposition().decode()
    families, _ = merge_expositions(texts)
    own = supervisor_families(slots, ["0", "2"], 10.0)
    return exposition([*own, *families]).decode()


def readouts(m: MetricsCollector) -> dict[str, str]:
    bus: list[dict[str, Any]] = []
    for x in m.to_bus_metrics():
        bus.append(
            {
                "name": x.name,
                "value": None if math.isnan(x.value) else x.value,
                "timestamp": x.timestamp,
                "labels": x.labels,
            }
        )
    return {
        "exposition.txt": m.exposition().decode(),
        "snapshot.json": json.dumps(m.snapshot(), indent=1) + "\n",
        "bus_metrics.json": json.dumps(bus, indent=1) + "\n",
    }


def test_exposition_is_unchanged() -> None:
    got = readouts(driven())["exposition.txt"]
    assert got == (GOLDEN / "exposition.txt").read_text()


def test_workers_exposition_is_unchanged() -> None:
    assert workers_exposition() == (GOLDEN / "workers_exposition.txt").read_text()


def normalised(name: str, text: str) -> str:
    """The order of a JSON object's keys and of the bus records (each one stands alone)
    is visible to no consumer: compare them sorted. Dumping again keeps ``5`` apart
    from ``5.0``."""
    if name == "snapshot.json":
        return json.dumps(json.loads(text), sort_keys=True)
    if name == "bus_metrics.json":
        return json.dumps(sorted(json.dumps(x, sort_keys=True) for x in json.loads(text)))
    return text


def test_status_snapshot_is_unchanged() -> None:
    got = readouts(driven())["snapshot.json"]
    want = (GOLDEN / "snapshot.json").read_text()
    assert normalised("snapshot.json", got) == normalised("snapshot.json", want)


def test_bus_metrics_are_unchanged() -> None:
    got = readouts(driven())["bus_metrics.json"]
    want = (GOLDEN / "bus_metrics.json").read_text()
    assert normalised("bus_metrics.json", got) == normalised("bus_metrics.json", want)


def test_an_untouched_collector_reads_out_as_before() -> None:
    got = readouts(MetricsCollector(ManualClock(1_700_000_000.0)))
    for name, text in got.items():
        want = (GOLDEN / f"empty_{name}").read_text()
        assert normalised(name, text) == normalised(name, want)


if __name__ == "__main__":
    for name, text in readouts(driven()).items():
        (GOLDEN / name).write_text(text)
    for name, text in readouts(MetricsCollector(ManualClock(1_700_000_000.0))).items():
        (GOLDEN / f"empty_{name}").write_text(text)
    (GOLDEN / "workers_exposition.txt").write_text(workers_exposition())
