"""The aggregator with rules that match by source, over several sources (docs/routes.md,
"Sources"): a source rule's events are a series of their own from intake on — through
windows, corrections, the series budget and checkpoints — and every other event merges
across sources as before."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.aggregation.aggregator import EventAggregator
from service.aggregation.batch_run import BatchRun
from service.aggregation.source_marks import SourceMarks
from service.bus.base import SourceBatch
from service.config import AggregationConfig
from service.core.clock import ManualClock
from service.core.events import Aggregate
from service.metrics.collector import MetricsCollector
from service.pipeline.flow import Outputs
from service.routes import Route, Routes
from tests.unit import test_window_paths as paths

S = 1_700_000_000.0  # a window start (a multiple of 10)
CLOCK = S + 3600.0
ONE, TWO, THREE = "one:0", "s2/two:0", "s3/http"  # a partition of each source
HOSTS = Route("hosts", ("cpu.*",), ("postgres",), source=2, postgres_table="host_metrics")
RULES = Routes("r.yaml", (HOSTS,), sources=3)


def make(rules: Routes = RULES, *, archive: bool = False, **cfg: Any) -> EventAggregator:
    clock = ManualClock(CLOCK)
    config = AggregationConfig(
        **{"interval_s": 10.0, "allowed_lateness_s": 60.0, "idle_timeout_s": 600.0, **cfg}
    )
    metrics = MetricsCollector(clock)
    return EventAggregator(config, metrics, clock, archive=archive, marks=SourceMarks(rules))


def ev(name: str, value: float, ts: float, **tags: str) -> bytes:
    obj: dict[str, Any] = {"name": name, "value": value, "timestamp": ts, "agg_func": "sum"}
    if tags:
        obj["tags"] = tags
    return orjson.dumps(obj)


def run(agg: EventAggregator, partition: str, *records: bytes) -> Outputs:
    return agg.process(SourceBatch(partition, list(records), f"test {partition}", "0", CLOCK))


def start(agg: EventAggregator) -> None:
    """Every partition assigned, so that none closes a window the others still feed."""
    for p in (ONE, TWO, THREE):
        run(agg, p)


def close(agg: EventAggregator, at: float = S + 10) -> list[Aggregate]:
    """Each partition moves past ``at``: the windows before it close."""
    out: list[Aggregate] = []
    for p in (ONE, TWO, THREE):
        out += run(agg, p, ev("tick", 0, at)).aggregates
    return [a for a in out if a.name != "tick"]


def rows(aggs: list[Aggregate]) -> set[tuple[Any, ...]]:
    return {(a.name, a.route, a.window_start, a.value, a.count, a.revision) for a in aggs}


def feed(agg: EventAggregator) -> None:
    run(agg, ONE, ev("cpu.user", 1, S + 1), ev("mem.free", 5, S + 1))
    run(agg, TWO, ev("cpu.user", 10, S + 2), ev("cpu.user", 20, S + 3), ev("mem.free", 6, S + 2))
    run(agg, THREE, ev("cpu.user", 100, S + 4))


def test_a_source_rules_events_are_a_series_of_their_own_and_the_rest_merge() -> None:
    agg = make()
    start(agg)
    feed(agg)
    assert rows(close(agg)) == {
        ("cpu.user", None, S, 101.0, 2, 1),  # sources 1 and 3: the default route
        ("cpu.user", "hosts", S, 30.0, 2, 1),  # source 2's, marked with its rule
        ("mem.free", None, S, 11.0, 2, 1),  # no source rule: merged as before
    }
    assert agg.ledger()["imbalance"] == 0


def test_without_source_rules_every_source_merges_as_before() -> None:
    agg = make(Routes("r.yaml", (Route("m", ("cpu.*",), ("postgres",)),), sources=3))
    start(agg)
    feed(agg)
    assert {(a.name, a.route, a.value) for a in close(agg)} == {
        ("cpu.user", None, 131.0),
        ("mem.free", None, 11.0),
    }


def test_open_windows_keep_the_mark_through_a_checkpoint_and_restore() -> None:
    agg = make()
    start(agg)
    feed(agg)
    checkpoints = agg.release([ONE, TWO, THREE])
    two = next(cp for cp in checkpoints if cp.partition == TWO)
    assert two.state is not None
    assert orjson.loads(two.state)["format"] >= 3  # an older release refuses it, by format
    other = make()
    other.restore(checkpoints)
    run(other, TWO, ev("cpu.user", 5, S + 5))
    assert rows(close(other)) == {
        ("cpu.user", None, S, 101.0, 2, 1),
        ("cpu.user", "hosts", S, 35.0, 3, 1),
        ("mem.free", None, S, 11.0, 2, 1),
    }
    assert other.ledger()["imbalance"] == 0


def test_a_correction_revises_only_the_series_of_its_source() -> None:
    agg = make()
    start(agg)
    feed(agg)
    close(agg)
    late = run(agg, TWO, ev("cpu.user", 7, S + 6))
    assert rows(late.aggregates) == {("cpu.user", "hosts", S, 37.0, 3, 2)}
    late = run(agg, ONE, ev("cpu.user", 2, S + 6))
    assert rows(late.aggregates) == {("cpu.user", None, S, 103.0, 3, 2)}


def test_kept_windows_keep_the_mark_through_a_checkpoint() -> None:
    agg = make()
    start(agg)
    feed(agg)
    close(agg)
    other = make()
    other.restore(agg.release([ONE, TWO, THREE]))
    late = run(other, TWO, ev("cpu.user", 7, S + 6))
    assert rows(late.aggregates) == {("cpu.user", "hosts", S, 37.0, 3, 2)}


def test_a_marked_series_over_the_budget_overflows_into_its_own_routes_overflow() -> None:
    agg = make(group_by=("host",), max_series_per_name=1)
    start(agg)
    run(agg, TWO, ev("cpu.user", 1, S + 1, host="a"), ev("cpu.user", 2, S + 2, host="b"))
    run(agg, ONE, ev("cpu.user", 4, S + 1, host="c"))
    got = {(a.name, a.route, tuple(sorted((a.tags or {}).items())), a.value) for a in close(agg)}
    assert got == {
        ("cpu.user", "hosts", (("host", "a"),), 1.0),
        ("cpu.user", "hosts", (("host", "__overflow__"),), 2.0),
        ("cpu.user", None, (("host", "c"),), 4.0),  # the budget is per partition
    }


def test_a_bad_name_from_a_marked_source_is_still_dead_lettered() -> None:
    agg = make()
    start(agg)
    out = run(
        agg,
        TWO,
        ev("cpu.\u0000user", 1, S + 1),
        orjson.dumps([orjson.loads(ev("cpu.a", 1, S + 1))]),
    )
    assert [d.reason for d in out.dead_letters] == ["invalid_name"]
    assert {(a.name, a.route, a.value) for a in close(agg)} == {("cpu.a", "hosts", 1.0)}


def _paths_run(batches: list[tuple[int, list[Any], float, bool]], group_by: tuple[str, ...]) -> Any:
    clock = ManualClock(paths.NOW)
    cfg = AggregationConfig(
        interval_s=paths.INTERVAL,
        grace_s=30.0,
        idle_timeout_s=60.0,
        group_by=group_by,
        max_series_per_name=2,
        allowed_lateness_s=120.0,
    )
    rules = Routes(
        "r.yaml",
        (
            Route("b", ("b",), ("postgres",), source=2, postgres_table="t_b"),
            Route("ab", ("a", "b"), ("postgres",), tags=(("region", "eu"),)),
            Route("a", ("a",), ("postgres",), source=2, postgres_table="t_a"),
        ),
        sources=3,
    )
    agg = EventAggregator(
        cfg, MetricsCollector(clock), clock, max_message_bytes=4096, marks=SourceMarks(rules)
    )
    dead, aggregates = [], []
    for i, (pid, records, advance, caught_up) in enumerate(batches):
        clock.advance(advance)
        part = (ONE, TWO, THREE)[pid]
        batch = SourceBatch(part, records, "t", str(i), paths.NOW, None, caught_up)
        out = agg.process(batch)
        dead += [(d.raw, d.reason, d.detail) for d in out.dead_letters]
        aggregates += out.aggregates
    state = [(c.partition, orjson.loads(c.state or b"null")) for c in agg.snapshot()]
    return dead, aggregates, state, agg.ledger()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batches=st.lists(paths._batch(), min_size=1, max_size=8),
    group_by=st.sampled_from([(), ("host", "region")]),
)
def test_the_hot_loop_marks_exactly_as_the_reference_path(
    batches: list[tuple[int, list[Any], float, bool]], group_by: tuple[str, ...]
) -> None:
    hot = _paths_run(batches, group_by)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(BatchRun, "run", BatchRun.run_reference)
        reference = _paths_run(batches, group_by)
    assert hot == reference
    assert hot[3]["imbalance"] == 0


def test_rollups_of_a_marked_series_keep_its_route() -> None:
    agg = make(rollups_s=(60.0,), allowed_lateness_s=0.0)
    start(agg)
    r = S + 40  # a multiple of 60
    for w in range(6):  # six windows of 10 s: one rollup window of 60 s
        run(agg, ONE, ev("cpu.user", 1, r + w * 10 + 1))
        run(agg, TWO, ev("cpu.user", 10, r + w * 10 + 2))
    got = close(agg, r + 60)
    hour = {(a.name, a.route, a.value, a.count) for a in got if a.window_end - a.window_start == 60}
    assert hour == {("cpu.user", None, 6.0, 6), ("cpu.user", "hosts", 60.0, 6)}


def test_hopping_windows_of_a_marked_series_keep_its_route() -> None:
    agg = make(hop_s=5.0)
    start(agg)
    run(agg, ONE, ev("cpu.user", 1, S + 1), ev("cpu.user", 1, S + 6))
    run(agg, TWO, ev("cpu.user", 10, S + 2), ev("cpu.user", 10, S + 7))
    got = {(a.route, a.window_start, a.value) for a in close(agg, S + 15)}
    assert got == {
        (None, S - 5, 1.0),
        ("hosts", S - 5, 10.0),
        (None, S, 2.0),
        ("hosts", S, 20.0),
        (None, S + 5, 1.0),
        ("hosts", S + 5, 10.0),
    }
    late = run(agg, TWO, ev("cpu.user", 100, S + 3))  # a correction of both windows
    assert {(a.route, a.window_start, a.value, a.revision) for a in late.aggregates} == {
        ("hosts", S - 5, 110.0, 2),
        ("hosts", S, 120.0, 2),
    }


def test_the_archive_keeps_the_events_of_a_marked_series_under_their_own_name() -> None:
    """The archive keeps the partition, which gives the mark again (replay): names
    and tags stay as sent, for accepted, refused and corrected events alike."""
    agg = make(archive=True, group_by=("host",))
    start(agg)
    run(agg, TWO, ev("cpu.user", 1, S + 1, host="a"), ev("cpu.user", 2, S + 2))
    close(agg)
    run(agg, TWO, ev("cpu.user", 3, S + 3, host="a"))  # a correction
    run(agg, TWO, ev("cpu.user", 4, S - 100))  # too late: refused, not archived
    slices = agg.archived(agg.snapshot([TWO])) or []
    [rows] = [s.rows for s in slices if s.partition == TWO]
    got = sorted(zip(rows.names, rows.values, rows.tags, strict=True))
    assert [g for g in got if g[0] != "tick"] == [
        ("cpu.user", 1.0, '{"host":"a"}'),
        ("cpu.user", 2.0, "{}"),
        ("cpu.user", 3.0, '{"host":"a"}'),
    ]
