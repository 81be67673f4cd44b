"""A rolling upgrade continues exactly from checkpoints of release v1.2.

tests/fixtures/v1_2_checkpoints.json holds checkpoint bodies as v1.2 wrote them (state
formats 1 and 2) and what v1.2 emitted after restoring them; it was written by running
tests/fixtures/make_v1_2_checkpoints.py with the v1.2 code (97196a7).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson

from service.aggregation.aggregator import EventAggregator
from service.aggregation.partition import PartitionState
from service.checkpoints.base import PartitionCheckpoint
from service.config import AggregationConfig
from service.core.clock import ManualClock
from service.metrics.collector import MetricsCollector
from tests.fixtures.make_v1_2_checkpoints import run

FIXTURE: dict[str, Any] = json.loads(
    (Path(__file__).parents[1] / "fixtures" / "v1_2_checkpoints.json").read_text()
)


def v12_checkpoints() -> list[PartitionCheckpoint]:
    """The checkpoints as a store loads them: position and state bytes."""
    return [
        PartitionCheckpoint(c["partition"], c["position"], c["state"].encode())
        for c in FIXTURE["checkpoints"]
    ]


def test_the_fixture_holds_both_state_formats_of_v12() -> None:
    formats = [orjson.loads(cp.state or b"")["format"] for cp in v12_checkpoints()]
    assert formats == [1, 2]


def test_v12_checkpoints_are_restored_exactly() -> None:
    for cp in v12_checkpoints():
        body = orjson.loads(cp.state or b"")
        restored, dropped = PartitionState.restored(cp, FIXTURE["restored_at"])

        assert dropped == []
        assert restored.position == cp.position
        windows: dict[float, dict[tuple[str, str], Any]] = {}
        for start, name, func, acc in body["windows"]:
            windows.setdefault(float(start), {})[(name, func)] = acc
        assert restored.windows == windows
        assert restored.closed_until == body["closed_until"]
        assert restored.max_ts == body["max_ts"]
        ledger = body["ledger"]
        assert restored.totals == ledger["totals"]
        assert restored.intervals == {float(k): v for k, v in ledger["intervals"].items()}
        assert restored.late_windows == {
            (n, f, float(s)): c for n, f, s, c in ledger["late_windows"]
        }


def test_a_restored_v12_state_survives_this_releases_checkpoint() -> None:
    for cp in v12_checkpoints():
        restored, _ = PartitionState.restored(cp, 9.0)
        again, dropped = PartitionState.restored(restored.snapshot(cp.partition), 9.0)

        assert dropped == []
        assert again.windows == restored.windows
        assert again.closed_until == restored.closed_until
        assert (again.totals, again.intervals, again.late_windows) == (
            restored.totals,
            restored.intervals,
            restored.late_windows,
        )


def test_after_restoring_v12_checkpoints_this_release_emits_what_v12_emitted() -> None:
    clock = ManualClock(FIXTURE["clock"])
    clock.advance(FIXTURE["restored_at"])
    agg = EventAggregator(
        AggregationConfig(interval_s=FIXTURE["interval_s"]), MetricsCollector(clock), clock
    )
    agg.restore(v12_checkpoints())
    steps = [(s["partition"], s["records"], s["at"]) for s in FIXTURE["after"]]

    emitted, dead = run(agg, clock, steps, 100)

    assert {(a["revision"], "tags" in a) for a in emitted} == {(1, False)}
    # v1.2's fields (its revision was the Kafka sink's copy of count); a sketch is new
    v12_fields = [{k: v for k, v in a.items() if k not in ("revision", "sketch")} for a in emitted]
    by_series = sorted(v12_fields, key=lambda a: (a["name"], a["window_start"]))
    assert by_series == FIXTURE["emitted"]
    assert dead == FIXTURE["dead_letters"]
    ledger = agg.ledger()
    assert {k: ledger.get(k, 0) for k in FIXTURE["ledger"]} == FIXTURE["ledger"]
