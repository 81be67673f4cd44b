"""The hot loop against the reference path, on generated event streams.

The hot loop keeps caches of the window rules (the previous event's window, when the
close boundary can move next) and inlines the common accumulators; the reference path
(``BatchRun.run_reference``) decodes every message with the reference decoder and
applies every event by the rules as written. Same outputs, same dead letters, same
state, whatever the stream: out of order, late, ahead of the clock, near the double
limit, over the cardinality budget, across partitions going silent and coming back.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.aggregation.aggregator import EventAggregator
from service.aggregation.batch_run import BatchRun
from service.bus.base import SourceBatch
from service.config import AggregationConfig
from service.core.clock import ManualClock
from service.core.events import AGG_FUNCS
from service.metrics.collector import MetricsCollector

NOW = 1_700_000_000.0
INTERVAL = 60.0
EDGE = 1_699_999_980.0  # a window boundary just before NOW

_funcs = st.sampled_from([None, *AGG_FUNCS, "SUM"])  # "SUM": the reference decoder's
_values = st.one_of(
    st.floats(min_value=-1e3, max_value=1e3),
    st.sampled_from([0.0, -0.0, 1e308, -1e308, 1.7e308, 5e307]),  # near the double limit
)
_times = st.one_of(
    st.floats(min_value=NOW - 600, max_value=NOW + 30),  # on time, late, out of order
    st.floats(min_value=NOW + 60, max_value=NOW + 400),  # ahead of the clock's lead
    # on a window boundary, or one grace (30 s) after it
    st.sampled_from([EDGE - 60, EDGE - 30, EDGE, EDGE + 10, EDGE + 30]),
)


# group-by tags (host, region) of a few series, some without tags, some invalid
_tags = st.one_of(
    st.none(),
    st.fixed_dictionaries(
        {},
        optional={
            "host": st.sampled_from(["h1", "h2", "h3", 4, True]),
            "region": st.sampled_from(["eu", "us"]),
            "other": st.just([1]),
        },
    ),
    st.sampled_from([{"host": None}, {"host": "x" * 201}, "host"]),
)


@st.composite
def _event(draw: st.DrawFn) -> dict[str, Any]:
    ev: dict[str, Any] = {
        "name": draw(st.sampled_from(["a", "b", "c", "d", "bad\x01"])),
        "value": draw(_values),
        "timestamp": draw(_times),
    }
    func = draw(_funcs)
    if func is not None:
        ev["agg_func"] = func
    tags = draw(_tags)
    if tags is not None:
        ev["tags"] = tags
    return ev


@st.composite
def _record(draw: st.DrawFn) -> Any:
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.sampled_from([b"{", b"[1]", b'{"name": "a"}']))
    if kind == 1:
        return orjson.dumps(draw(st.lists(_event(), max_size=3)))
    if kind == 2:  # an HTTP element: already decoded
        return draw(_event())
    return orjson.dumps(draw(_event()))


@st.composite
def _batch(draw: st.DrawFn) -> tuple[int, list[Any], float, bool]:
    """(partition, records, seconds the clock moves first, caught up)"""
    records = draw(st.lists(_record(), max_size=8))
    return (
        draw(st.integers(0, 2)),
        records,
        draw(st.sampled_from([0.0, 1.0, 90.0])),
        draw(st.booleans()),
    )


def _run(
    batches: list[tuple[int, list[Any], float, bool]],
    grace: float,
    max_open: int,
    group_by: tuple[str, ...] = (),
    lateness: float = 0.0,
    hop: float | None = None,
) -> dict[str, Any]:
    clock = ManualClock(NOW)
    cfg = AggregationConfig(
        interval_s=INTERVAL,
        grace_s=grace,
        max_open_windows=max_open,
        idle_timeout_s=60.0,
        group_by=group_by,
        max_series_per_name=2,
        allowed_lateness_s=lateness,
        hop_s=hop,
    )
    agg = EventAggregator(cfg, MetricsCollector(clock), clock, max_message_bytes=4096)
    dead, aggregates = [], []
    for i, (pid, records, advance, caught_up) in enumerate(batches):
        clock.advance(advance)
        part = f"p{pid}"
        batch = SourceBatch(
            part, records, f"test {part}", str(i), NOW, list(range(len(records))), caught_up
        )
        out = agg.process(batch)
        dead += [(d.raw, d.reason, d.detail, d.source) for d in out.dead_letters]
        aggregates += out.aggregates
    state = [(c.partition, c.position, orjson.loads(c.state or b"null")) for c in agg.snapshot()]
    return {
        "dead": dead,
        "aggregates": aggregates,
        "state": state,
        "open": agg.open_windows,
        "ledger": agg.ledger(),
        "partitions": agg.partitions(),
    }


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batches=st.lists(_batch(), min_size=1, max_size=8),
    grace=st.sampled_from([0.0, 30.0, 90.0]),
    max_open=st.sampled_from([3, 1000]),
    group_by=st.sampled_from([(), ("host", "region")]),
    lateness=st.sampled_from([0.0, 120.0]),  # corrections take the reference step too
)
def test_hot_loop_gives_exactly_what_the_reference_path_gives(
    batches: list[tuple[int, list[Any], float, bool]],
    grace: float,
    max_open: int,
    group_by: tuple[str, ...],
    lateness: float,
) -> None:
    hot = _run(batches, grace, max_open, group_by, lateness)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(BatchRun, "run", BatchRun.run_reference)
        reference = _run(batches, grace, max_open, group_by, lateness)
    assert hot == reference
    assert hot["ledger"]["imbalance"] == 0


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batches=st.lists(_batch(), min_size=1, max_size=8),
    grace=st.sampled_from([0.0, 30.0, 90.0]),
    max_open=st.sampled_from([3, 1000]),
    group_by=st.sampled_from([(), ("host", "region")]),
    hop=st.sampled_from([10.0, 30.0]),
    lateness=st.sampled_from([0.0, 120.0]),  # corrections of hopping windows too
)
def test_hot_loop_gives_what_the_reference_path_gives_with_hopping_windows(
    batches: list[tuple[int, list[Any], float, bool]],
    grace: float,
    max_open: int,
    group_by: tuple[str, ...],
    hop: float,
    lateness: float,
) -> None:
    """Panes (AGGREGATION_HOP): the same outputs, dead letters, late counts per window
    and panes on both paths."""
    hot = _run(batches, grace, max_open, group_by, lateness, hop=hop)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(BatchRun, "run", BatchRun.run_reference)
        reference = _run(batches, grace, max_open, group_by, lateness, hop=hop)
    assert hot == reference
    assert hot["ledger"]["imbalance"] == 0


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.floats(min_value=NOW - 300, max_value=NOW), min_size=1, max_size=200),
    st.integers(1, 50),
)
def test_lateness_does_not_depend_on_where_batches_are_cut(times: list[float], size: int) -> None:
    records = [orjson.dumps({"name": "k", "value": 1.0, "timestamp": t}) for t in times]
    whole = _run([(0, records, 0.0, False)], 0.0, 1000)
    cut = [(0, records[i : i + size], 0.0, False) for i in range(0, len(records), size)]
    pieces = _run(cut, 0.0, 1000)
    assert [d[1:3] for d in whole["dead"]] == [d[1:3] for d in pieces["dead"]]
    assert whole["state"][0][2]["windows"] == pieces["state"][0][2]["windows"]


@pytest.mark.parametrize("grace", [30.0, 45.0])
def test_an_event_exactly_at_the_close_boundary_moves_it_on_both_paths(grace: float) -> None:
    # the third event is a cache hit of the hot loop (the second set the cache) whose
    # event time minus the grace is exactly the next window edge: the boundary moves
    # there, and the fourth event is late
    times = [EDGE + grace - 25, EDGE + grace - 20, EDGE + grace, EDGE - 30]
    records = [orjson.dumps({"name": "k", "value": 1.0, "timestamp": t}) for t in times]
    hot = _run([(0, records, 0.0, False)], grace, 1000)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(BatchRun, "run", BatchRun.run_reference)
        reference = _run([(0, records, 0.0, False)], grace, 1000)
    assert hot == reference
    assert [d[1] for d in hot["dead"]] == ["late"]
