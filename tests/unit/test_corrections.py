"""Corrections (contract §12.4): emitted windows kept for AGGREGATION_ALLOWED_LATENESS,
late events within it re-emit the window with the next revision, one per record and
key, the same however the records are batched; kept windows freed, checkpointed, and
counted in the ledger."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from service.aggregation.aggregator import EventAggregator
from service.bus.base import SourceBatch
from service.checkpoints.base import PartitionCheckpoint
from service.config import AggregationConfig
from service.core.clock import ManualClock
from service.core.events import Aggregate
from service.metrics.collector import MetricsCollector
from service.pipeline.flow import Outputs
from tests.unit import test_aggregator_partitions as partitions
from tests.unit.test_aggregator_partitions import scenario as partitions_scenario

S = 1_700_000_000.0  # a window start (a multiple of 10)
CLOCK = S + 3600.0  # no event of these tests is ahead of the service clock
INTERVAL = 10.0
LATENESS = 60.0


def make(
    lateness: float = LATENESS, clock: ManualClock | None = None, **cfg: Any
) -> tuple[EventAggregator, MetricsCollector]:
    clock = clock or ManualClock(CLOCK)
    metrics = MetricsCollector(clock)
    config = AggregationConfig(
        **{"interval_s": INTERVAL, "allowed_lateness_s": lateness, "idle_timeout_s": 600.0, **cfg}
    )
    return EventAggregator(config, metrics, clock), metrics


def ev(name: str, value: float, ts: float, func: str = "sum") -> dict[str, Any]:
    return {"name": name, "value": value, "timestamp": ts, "agg_func": func}


def rec(*events: dict[str, Any]) -> bytes:
    """One record (message): one event, or a JSON array of several."""
    return orjson.dumps(events[0] if len(events) == 1 else list(events))


def batch(records: list[bytes], partition: str = "p0", position: str = "0") -> SourceBatch:
    return SourceBatch(partition, records, f"test {partition}", position, CLOCK)


def run(agg: EventAggregator, records: list[bytes], partition: str = "p0") -> Outputs:
    return agg.process(batch(records, partition))


def revs(out: Outputs) -> list[tuple[str, str, float, int, float, int]]:
    return [_rev(a) for a in out.aggregates]


def _rev(a: Aggregate) -> tuple[str, str, float, int, float, int]:
    return (a.name, a.agg_func, a.window_start, a.revision, a.value, a.count)


def state(agg: EventAggregator, partition: str = "p0") -> dict[str, Any]:
    [cp] = agg.snapshot([partition])
    assert cp.state is not None
    body: dict[str, Any] = orjson.loads(cp.state)
    return body


def test_a_late_event_within_the_lateness_re_emits_the_window_with_revision_2() -> None:
    agg, metrics = make()
    run(agg, [rec(ev("a", 1, S + 1)), rec(ev("a", 2, S + 5))])
    first = run(agg, [rec(ev("a", 0, S + 10))])  # watermark S+10: [S, S+10) emitted
    assert revs(first) == [("a", "sum", S, 1, 3.0, 2)]
    out = run(agg, [rec(ev("a", 7, S + 3))])
    assert revs(out) == [("a", "sum", S, 2, 10.0, 3)]
    assert out.dead_letters == []
    assert metrics.events_late_applied == 1
    assert metrics.events_late == 0


def test_correctable_until_the_watermark_reaches_end_plus_lateness() -> None:
    agg, metrics = make()
    run(agg, [rec(ev("a", 1, S + 1))])
    run(agg, [rec(ev("b", 1, S + 69.5))])  # watermark S+69.5 < S+10+60: correctable
    out = run(agg, [rec(ev("a", 2, S + 2))])
    assert revs(out) == [("a", "sum", S, 2, 3.0, 2)]
    run(agg, [rec(ev("b", 1, S + 70))])  # watermark reaches S+70: no longer
    out = run(agg, [rec(ev("a", 4, S + 2))])
    assert out.aggregates == []
    assert [d.reason for d in out.dead_letters] == ["late"]
    assert (metrics.events_late_applied, metrics.events_late) == (1, 1)


def test_grace_counts_in_the_partition_watermark() -> None:
    agg, _ = make(grace_s=5.0)
    run(agg, [rec(ev("a", 1, S + 1))])
    run(agg, [rec(ev("b", 1, S + 74.5))])  # watermark S+69.5
    assert revs(run(agg, [rec(ev("a", 1, S + 2))]))[0][3] == 2
    run(agg, [rec(ev("b", 1, S + 75))])  # watermark S+70
    assert [d.reason for d in run(agg, [rec(ev("a", 1, S + 2))]).dead_letters] == ["late"]


def test_the_late_events_of_one_record_give_one_revision_per_key() -> None:
    agg, _ = make()
    run(agg, [rec(ev("a", 1, S + 1), ev("b", 1, S + 1, "max"))])
    run(agg, [rec(ev("x", 0, S + 10))])
    out = run(
        agg,
        [
            rec(ev("a", 2, S + 2), ev("a", 3, S + 3), ev("b", 9, S + 4, "max")),
            rec(ev("a", 4, S + 4)),
        ],
    )
    assert revs(out) == [
        ("a", "sum", S, 2, 6.0, 3),
        ("b", "max", S, 2, 9.0, 2),
        ("a", "sum", S, 3, 10.0, 4),
    ]


def test_a_key_the_window_never_had_is_emitted_as_its_revision_1() -> None:
    agg, _ = make()
    run(agg, [rec(ev("a", 1, S + 1))])
    run(agg, [rec(ev("a", 1, S + 10))])
    assert revs(run(agg, [rec(ev("new", 5, S + 2, "min"))])) == [("new", "min", S, 1, 5.0, 1)]


def test_a_window_closed_in_the_same_batch_is_emitted_then_corrected() -> None:
    agg, _ = make()
    out = run(agg, [rec(ev("a", 1, S + 1)), rec(ev("a", 1, S + 12)), rec(ev("a", 5, S + 2))])
    assert revs(out) == [("a", "sum", S, 1, 1.0, 1), ("a", "sum", S, 2, 6.0, 2)]


def test_corrections_merge_the_kept_shares_of_every_partition_here() -> None:
    agg, _ = make()
    run(agg, [rec(ev("a", 1, S + 1))], "p0")
    run(agg, [rec(ev("a", 2, S + 1))], "p1")
    run(agg, [rec(ev("z", 0, S + 11))], "p0")
    first = run(agg, [rec(ev("z", 0, S + 11))], "p1")
    assert ("a", "sum", S, 1, 3.0, 2) in revs(first)
    assert revs(run(agg, [rec(ev("a", 10, S + 2))], "p1")) == [("a", "sum", S, 2, 13.0, 3)]
    assert revs(run(agg, [rec(ev("a", 100, S + 2))], "p0")) == [("a", "sum", S, 3, 113.0, 4)]


def test_a_correction_that_would_overflow_the_sum_is_rejected() -> None:
    agg, metrics = make()
    run(agg, [rec(ev("a", 1.7e308, S + 1))])
    run(agg, [rec(ev("a", 0, S + 10))])
    out = run(agg, [rec(ev("a", 1.7e308, S + 2))])
    assert out.aggregates == []
    assert [d.reason for d in out.dead_letters] == ["overflow"]
    assert metrics.events_late_applied == 0
    assert agg.ledger()["imbalance"] == 0


def test_kept_windows_are_freed_once_their_correction_time_passed() -> None:
    agg, _ = make()
    run(agg, [rec(ev("a", 1, S + 1), ev("b", 1, S + 11))])
    run(agg, [rec(ev("a", 1, S + 20))])
    assert sorted({k[0] for k in state(agg)["kept"]}) == [S, S + 10]
    run(agg, [rec(ev("a", 1, S + 70))])  # S's window: end + 60 reached
    assert sorted({k[0] for k in state(agg)["kept"]}) == [S + 10, S + 20]
    run(agg, [rec(ev("a", 1, S + 200))])
    assert state(agg)["kept"] == []


def test_lateness_0_keeps_nothing_and_writes_the_state_as_before() -> None:
    agg, _ = make(lateness=0.0)
    run(agg, [rec(ev("a", 1, S + 1))])
    run(agg, [rec(ev("a", 1, S + 10))])
    body = state(agg)
    assert "kept" not in body and "kept_from" not in body
    assert "late_applied" not in body["ledger"]
    assert [d.reason for d in run(agg, [rec(ev("a", 1, S + 2))]).dead_letters] == ["late"]


def test_kept_windows_travel_in_the_checkpoint() -> None:
    agg, _ = make()
    run(agg, [rec(ev("a", 1, S + 1, "p50")), rec(ev("a", 3, S + 2, "p50"))])
    run(agg, [rec(ev("a", 0, S + 10))])
    assert revs(run(agg, [rec(ev("a", 5, S + 3, "p50"))])) == [("a", "p50", S, 2, 3.0, 3)]
    [cp] = agg.release(["p0"])
    other, _ = make()
    other.restore([cp])
    out = run(other, [rec(ev("a", 7, S + 4, "p50"))])
    assert revs(out) == [("a", "p50", S, 3, 4.0, 4)]
    assert out.aggregates[0].sketch is not None  # a revision carries its sketch too
    assert other.ledger()["imbalance"] == 0
    assert other.ledger()["late_applied"] == 2  # the ledger is cumulative


def test_windows_emitted_before_kept_windows_were_checkpointed_are_not_corrected() -> None:
    """A checkpoint without kept windows (a release before 1.3, or lateness 0): its
    emitted windows are final; a revision lacking their events is never written."""
    old, _ = make(lateness=0.0)
    run(old, [rec(ev("a", 1, S + 1))])
    run(old, [rec(ev("a", 1, S + 10))])
    [cp] = old.release(["p0"])
    agg, _ = make()
    agg.restore([cp])
    out = run(agg, [rec(ev("a", 1, S + 2))])
    assert [d.reason for d in out.dead_letters] == ["late"]
    run(agg, [rec(ev("a", 1, S + 20))])  # [S+10, S+20) is emitted after the restore
    assert revs(run(agg, [rec(ev("a", 4, S + 12))])) == [("a", "sum", S + 10, 2, 5.0, 2)]


def test_the_ledger_counts_each_applied_event_once() -> None:
    agg, _ = make()
    run(agg, [rec(ev("a", 1, S + 1), ev("a", 1, S + 2))])
    run(agg, [rec(ev("a", 1, S + 10))])
    run(agg, [rec(ev("a", 1, S + 3), ev("b", 1, S + 3))])
    run(agg, [rec(ev("a", 1, S + 4))])
    run(agg, [rec(ev("c", 1, S + 100))])
    run(agg, [rec(ev("a", 1, S + 5))])  # late: dead-lettered
    ledger = agg.ledger()
    assert ledger["received"] == 8
    assert ledger["late_applied"] == 3
    assert ledger["late"] == 1
    assert ledger["emitted"] + ledger["open"] == ledger["aggregated"] == 7
    assert ledger["imbalance"] == 0
    late = {(n, f, s): c for n, f, s, c in state(agg)["ledger"]["late_applied"]}
    assert late == {("a", "sum", S): 2, ("b", "sum", S): 1}


# -- determinism: the same records, batched any way, give the same revisions -----------------

_STEPS = [0.0, 1.0, 3.0, 9.0, 25.0, -4.0, -15.0, -40.0, -75.0]


@st.composite
def records(draw: st.DrawFn) -> list[bytes]:
    """A partition's records: event time moving on, with events up to 75 s late (some
    correctable, some not), one to three events per record."""
    out, top = [], S
    for _ in range(draw(st.integers(1, 40))):
        events = []
        for _ in range(draw(st.integers(1, 3))):
            ts = max(S, top + draw(st.sampled_from(_STEPS)))
            top = max(top, ts)
            name = draw(st.sampled_from(["a", "b"]))
            events.append(
                ev(name, draw(st.integers(-9, 9)), ts, draw(st.sampled_from(["sum", "last"])))
            )
        out.append(rec(*events))
    return out


def _outcome(outs: list[Outputs]) -> tuple[list[Any], list[tuple[str, str]]]:
    aggs = sorted(_rev(a) for o in outs for a in o.aggregates)
    dead = [(d.reason, d.raw) for o in outs for d in o.dead_letters]
    return aggs, dead


@settings(max_examples=200, deadline=None)
@given(records(), st.lists(st.integers(1, 6), min_size=1, max_size=40))
def test_revisions_do_not_depend_on_batch_boundaries(stream: list[bytes], sizes: list[int]) -> None:
    one, _ = make()
    together = [run(one, stream)]
    apart_agg, _ = make()
    apart, i = [], 0
    for n in [*sizes, len(stream)]:
        if i >= len(stream):
            break
        apart.append(run(apart_agg, stream[i : i + n]))
        i += n
    assert _outcome(together) == _outcome(apart)
    for agg in (one, apart_agg):
        assert agg.ledger()["imbalance"] == 0
    keys = [(a[0], a[1], a[2], a[3]) for a in _outcome(together)[0]]
    assert len(keys) == len(set(keys)), "a revision emitted twice"


@settings(max_examples=150, deadline=None)
@given(partitions_scenario())
def test_keeping_changes_no_first_emission_however_partitions_interleave(
    case: tuple[list[list[dict[str, Any]]], list[tuple[int, int, bool]]],
) -> None:
    """The property of test_aggregator_partitions with windows kept: merging the shares
    of a key spread over partitions must leave every kept share as it was."""
    streams, steps = case
    clock = ManualClock(partitions.NOW)
    cfg = AggregationConfig(
        interval_s=partitions.INTERVAL,
        grace_s=partitions.GRACE,
        idle_timeout_s=60.0,
        allowed_lateness_s=1e9,  # nothing freed: every kept share is compared below
    )
    agg = EventAggregator(cfg, MetricsCollector(clock), clock)
    names = [f"p{i}" for i in range(len(streams))]
    agg.restore([PartitionCheckpoint(p, None, None) for p in names])  # the assignment
    read = [0] * len(streams)
    out = Outputs()

    def deliver(i: int, n: int) -> None:
        records = [orjson.dumps(e) for e in streams[i][read[i] : read[i] + n]]
        read[i] += len(records)
        batch = SourceBatch(names[i], records, "t", str(read[i]), partitions.NOW)
        out.extend(agg.process(batch))
        clock.advance(0.1)

    for i, n, _ in steps:
        deliver(i, n)
    for i in range(len(streams)):
        while read[i] < len(streams[i]):
            deliver(i, 5)
    clock.advance(60.0)
    for i in range(len(streams)):
        out.extend(
            agg.process(SourceBatch(names[i], [], "t", None, partitions.NOW, caught_up=True))
        )
    got = {(a.name, a.agg_func, a.window_start): (a.value, a.count) for a in out.aggregates}
    assert len(got) == len(out.aggregates)
    assert {a.revision for a in out.aggregates} <= {1}
    assert got == partitions.oracle(streams)
    # the kept shares, merged, are the windows again: no merge changed one of them
    kept: dict[tuple[str, str, float], int] = {}
    for body in (state(agg, p) for p in names if p in agg.partition_ids()):
        for start, name, func, acc, revision in body["kept"]:
            assert revision == 1
            kept[(name, func, start)] = kept.get((name, func, start), 0) + acc[0]
    assert {k: c for k, (_, c) in got.items()} == kept


def test_an_unusable_kept_window_in_a_checkpoint_makes_its_window_final() -> None:
    """Its events were emitted: only corrections are lost (a late event for any key of
    that window, or an earlier one, is dead-lettered), never a revision 1 again."""
    agg, _ = make()
    run(agg, [rec(ev("a", 1, S + 1), ev("b", 2, S + 1), ev("c", 1, S + 11))])
    run(agg, [rec(ev("z", 0, S + 20))])
    [cp] = agg.release(["p0"])
    body = orjson.loads(cp.state or b"")
    for entry in body["kept"]:
        if entry[1] == "b":
            entry[3] = [1, "not a number", 0.0]
    other, metrics = make()
    other.restore([PartitionCheckpoint("p0", cp.position, orjson.dumps(body))])
    assert metrics.state_dropped == {"window": 1}
    out = run(other, [rec(ev("a", 5, S + 2)), rec(ev("b", 5, S + 2))])
    assert [d.reason for d in out.dead_letters] == ["late", "late"]
    assert revs(run(other, [rec(ev("c", 5, S + 12))])) == [("c", "sum", S + 10, 2, 6.0, 2)]


def test_status_shows_the_kept_window_keys_per_partition() -> None:
    agg, _ = make()
    run(agg, [rec(ev("a", 1, S + 1), ev("b", 1, S + 1))])
    assert agg.partitions()["p0"]["kept_windows"] == 0
    run(agg, [rec(ev("a", 1, S + 10))])
    assert agg.partitions()["p0"]["kept_windows"] == 2


def test_a_restored_state_checkpoints_exactly_as_it_was_taken() -> None:
    agg, _ = make()
    run(agg, [rec(ev("a", 1, S + 1, "avg"), ev("b", 2, S + 3, "p90"), ev("c", 1, S + 12))])
    run(agg, [rec(ev("z", 0, S + 21))])
    run(agg, [rec(ev("a", 5, S + 2, "avg"))])  # revision 2 of a
    [cp] = agg.snapshot()
    other, _ = make()
    other.restore([cp])
    [again] = other.snapshot()
    assert orjson.loads(again.state or b"") == orjson.loads(cp.state or b"")
    kept = {(e[0], e[1], e[2]): e[4] for e in orjson.loads(cp.state or b"")["kept"]}
    assert kept == {(S, "a", "avg"): 2, (S, "b", "p90"): 1, (S + 10, "c", "sum"): 1}
