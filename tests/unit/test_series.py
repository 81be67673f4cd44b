"""Series: names split by group-by tags, the series budget and its overflow series
(contract §12.3; service/aggregation/series.py)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.aggregation.aggregator import EventAggregator
from service.aggregation.partition import STATE_FORMAT, V13_STATE_FORMAT
from service.aggregation.series import (
    OVERFLOW,
    SEP,
    TagRule,
    overflow_series,
    series_key,
    split,
)
from service.bus.base import SourceBatch
from service.checkpoints.base import PartitionCheckpoint
from service.config import AggregationConfig
from service.core.clock import ManualClock
from service.core.events import Aggregate
from service.metrics.collector import MetricsCollector
from service.repartition.keying import route

NOW = 1_700_000_000.0
W0 = 1_699_999_920.0  # the window (60 s) holding NOW - 30
GROUP_BY = ("host", "region")


def _agg(
    group_by: tuple[str, ...] = GROUP_BY, budget: int = 100, max_open: int = 1_000_000
) -> tuple[EventAggregator, ManualClock, MetricsCollector]:
    clock = ManualClock(NOW)
    metrics = MetricsCollector(clock)
    cfg = AggregationConfig(
        interval_s=60.0,
        grace_s=0.0,
        group_by=group_by,
        max_series_per_name=budget,
        max_open_windows=max_open,
    )
    return EventAggregator(cfg, metrics, clock), clock, metrics


def _ev(name: str, value: float, ts: float, tags: Any = None, func: str = "sum") -> bytes:
    ev: dict[str, Any] = {"name": name, "value": value, "timestamp": ts, "agg_func": func}
    if tags is not None:
        ev["tags"] = tags
    return orjson.dumps(ev)


def _feed(agg: EventAggregator, records: list[Any], pos: str = "1", part: str = "p") -> Any:
    offsets = list(range(len(records)))
    return agg.process(SourceBatch(part, records, "test", pos, NOW, offsets))


def _flush(agg: EventAggregator, clock: ManualClock) -> list[Aggregate]:
    """Everything still open, by moving event time far past it."""
    clock.advance(600)
    out = _feed(agg, [_ev("flush", 0.0, NOW + 500)], "flush")
    return [a for a in out.aggregates if a.name != "flush"]


def test_series_key_is_the_name_and_the_canonical_json_of_the_group_by_tags() -> None:
    tags = {"region": "eu", "other": [1], "host": 7}
    key = series_key("cpu", tags, GROUP_BY)
    assert key == "cpu" + SEP + '{"host":"7","region":"eu"}'
    assert series_key("cpu", {"region": "eu", "host": 7}, GROUP_BY) == key  # order: none
    assert split(key) == ("cpu", {"host": "7", "region": "eu"})
    assert series_key("cpu", {"other": "x"}, GROUP_BY) == "cpu"  # none of the keys
    assert series_key("cpu", None, GROUP_BY) == "cpu"
    assert split("cpu") == ("cpu", {})
    assert split(overflow_series("cpu", GROUP_BY)) == ("cpu", dict.fromkeys(GROUP_BY, OVERFLOW))


@pytest.mark.parametrize(
    ("value", "text"),
    [("a b", "a b"), (True, "true"), (False, "false"), (2, "2"), (1.5, "1.5"), (-0.0, "-0.0")],
)
def test_a_tag_value_is_a_string_or_the_json_text_of_a_number_or_boolean(
    value: Any, text: str
) -> None:
    agg, clock, _ = _agg(("host",))
    _feed(agg, [_ev("cpu", 1.0, NOW - 30, {"host": value})])
    [a] = _flush(agg, clock)
    assert a.tags == {"host": text}


@pytest.mark.parametrize(
    "tags",
    [
        {"host": None},
        {"host": [1]},
        {"host": {"a": 1}},
        {"host": "x" * 201},
        {"host": "a\x00b"},
        {"host": "tab\there"},
        "host=a",
        ["host"],
        7,
    ],
)
def test_unusable_tags_are_dead_lettered_invalid_tags(tags: Any) -> None:
    agg, _, metrics = _agg()
    out = _feed(agg, [_ev("cpu", 1.0, NOW - 30, tags)])
    [dl] = out.dead_letters
    assert dl.reason == "invalid_tags"
    assert orjson.loads(dl.raw)["name"] == "cpu"  # the event as sent, not its series
    assert agg.open_windows == 0
    assert metrics.events_rejected == {"invalid_tags": 1}


def test_a_lone_surrogate_in_a_tag_value_is_invalid_tags() -> None:
    agg, _, _ = _agg()
    record = b'{"name":"cpu","value":1,"timestamp":%d,"tags":{"host":"\\ud800"}}' % (NOW - 30)
    [dl] = _feed(agg, [record]).dead_letters
    assert dl.reason == "invalid_tags"


def test_without_group_by_tags_are_ignored_and_aggregates_carry_no_tags() -> None:
    agg, clock, _ = _agg(group_by=())
    out = _feed(agg, [_ev("cpu", 1.0, NOW - 30, {"host": [1]}), _ev("cpu", 2.0, NOW - 30)])
    assert out.dead_letters == []
    [a] = _flush(agg, clock)
    assert (a.name, a.value, a.tags) == ("cpu", 3.0, None)
    assert "tags" not in a.to_json_obj()
    [cp] = [c for c in agg.snapshot() if c.partition == "p"]
    assert orjson.loads(cp.state or b"")["format"] == STATE_FORMAT


def test_an_event_without_group_by_tags_is_the_series_with_empty_tags() -> None:
    agg, clock, _ = _agg()
    _feed(
        agg,
        [
            _ev("cpu", 1.0, NOW - 30),
            _ev("cpu", 2.0, NOW - 30, {"other": "x"}),
            _ev("cpu", 4.0, NOW - 30, {"host": "a"}),
        ],
    )
    got = {(a.name, orjson.dumps(a.tags)): a.value for a in _flush(agg, clock)}
    assert got == {("cpu", b"{}"): 3.0, ("cpu", b'{"host":"a"}'): 4.0}


def _hosts(n: int, names: tuple[str, ...] = ("cpu", "mem"), ts: float = NOW - 30) -> list[bytes]:
    return [
        _ev(name, float(i), ts, {"host": f"h{i:04d}", "region": "eu"}, func)
        for i in range(n)
        for name in names
        for func in ("sum", "max")
    ]


def test_a_thousand_hosts_against_a_budget_of_100_give_100_series_and_one_overflow() -> None:
    agg, clock, metrics = _agg(budget=100)
    records = _hosts(1000, ts=NOW - 90) + _hosts(1000)  # two windows
    out = _feed(agg, records)  # closes the first window
    assert out.dead_letters == []
    aggs = out.aggregates + _flush(agg, clock)
    for name in ("cpu", "mem"):
        for start in (W0, W0 - 60):
            mine = [a for a in aggs if a.name == name and a.window_start == start]
            sums = [a for a in mine if a.agg_func == "sum"]
            series = {orjson.dumps(a.tags) for a in sums}
            assert len(series) == 101
            [overflow] = [a for a in sums if a.tags == dict.fromkeys(GROUP_BY, OVERFLOW)]
            assert overflow.count == 900
            assert overflow.value == sum(range(100, 1000))
            assert sum(a.count for a in sums) == 1000
            # the first 100 hosts in partition order have their own series
            assert series - {orjson.dumps(overflow.tags)} == {
                orjson.dumps({"host": f"h{i:04d}", "region": "eu"}) for i in range(100)
            }
            [max_over] = [a for a in mine if a.agg_func == "max" and OVERFLOW in str(a.tags)]
            assert max_over.value == 999.0
    assert metrics.series_overflow == 2 * 2 * 2 * 900  # names x windows x funcs x hosts
    ledger = agg.ledger()
    assert ledger["series_overflow"] == 7200
    assert ledger["imbalance"] == 0
    assert ledger["emitted"] == len(records)


def test_the_budget_is_per_name_and_window_and_counts_tag_sets_over_all_funcs() -> None:
    agg, clock, _ = _agg(budget=2)
    records = [
        _ev("cpu", 1.0, NOW - 90, {"host": "c"}, "sum"),  # another window: its own
        _ev("cpu", 1.0, NOW - 30, {"host": "a"}, "sum"),
        _ev("cpu", 1.0, NOW - 30, {"host": "a"}, "avg"),  # the same tag set
        _ev("cpu", 1.0, NOW - 30, {"host": "b"}, "count"),
        _ev("cpu", 1.0, NOW - 30, {"host": "c"}, "sum"),  # third: overflow
        _ev("mem", 1.0, NOW - 30, {"host": "c"}, "sum"),  # another name: its own budget
    ]
    out = _feed(agg, records)  # closes the first window
    view = agg.partitions()["p"]
    assert (view["open_series"], view["series_overflow"]) == (3, 1)  # a, b; mem c
    aggs = out.aggregates + _flush(agg, clock)
    got = {(a.name, a.window_start, a.tags["host"]) for a in aggs if a.tags}
    assert got == {
        ("cpu", W0, "a"),
        ("cpu", W0, "b"),
        ("cpu", W0, OVERFLOW),
        ("mem", W0, "c"),
        ("cpu", W0 - 60, "c"),
    }


def test_overflow_does_not_depend_on_batches_or_a_restart_from_a_checkpoint() -> None:
    records = _hosts(300, names=("cpu",))
    whole, clock, _ = _agg(budget=50)
    _feed(whole, records)
    expected = sorted(map(repr, _flush(whole, clock)))
    for cut in (1, 7, 150, 599):
        first, clock, _ = _agg(budget=50)
        _feed(first, records[:cut], "a")
        [cp] = first.snapshot()
        state = orjson.loads(cp.state or b"")
        assert state["format"] == V13_STATE_FORMAT
        assert all(len(w) == 4 for w in state["windows"])  # [start, series, func, acc]
        second, clock, _ = _agg(budget=50)
        second.restore([cp])  # the budget is derived from the restored windows
        _feed(second, records[cut:], "b")
        assert sorted(map(repr, _flush(second, clock))) == expected


def test_a_checkpoint_entry_whose_series_key_is_broken_is_dropped() -> None:
    agg, _, metrics = _agg()
    body = {
        "format": V13_STATE_FORMAT,
        "max_ts": NOW - 30,
        "closed_until": None,
        "windows": [
            [W0, "cpu" + SEP + '{"host":"a"}', "sum", [1, 1.0, 0.0]],
            [W0, "cpu" + SEP + "{not json", "sum", [1, 1.0, 0.0]],
            [W0, "cpu" + SEP + '{"host":1}', "sum", [1, 1.0, 0.0]],
        ],
    }
    agg.restore([PartitionCheckpoint("p", "1", orjson.dumps(body))])
    assert agg.open_windows == 1
    assert metrics.state_dropped == {"window": 2}


def test_a_late_tagged_event_is_dead_lettered_and_counted_under_its_name() -> None:
    agg, _, _ = _agg()
    _feed(agg, [_ev("cpu", 1.0, NOW - 30, {"host": "a"})])
    out = _feed(agg, [_ev("cpu", 1.0, NOW - 200, {"host": "a"})], "2")
    [dl] = out.dead_letters
    assert dl.reason == "late"
    [cp] = agg.snapshot()
    [[name, func, _, n]] = (cp.ledger or {})["late_windows"]
    assert (name, func, n) == ("cpu", "sum", 1)


def test_the_cardinality_limit_still_holds_with_tags() -> None:
    agg, _, _ = _agg(budget=10, max_open=3)
    out = _feed(agg, [_ev("cpu", 1.0, NOW - 30, {"host": f"h{i}"}) for i in range(5)])
    assert [d.reason for d in out.dead_letters] == ["cardinality_limit"] * 2
    assert agg.open_windows == 3


def test_repartitioning_routes_every_series_of_a_name_by_the_name() -> None:
    one = _ev("cpu", 1.0, NOW - 30, {"host": "a", "region": "eu"})
    [(key, value, _)] = route(one, b"fallback", NOW)
    assert (key, value) == (b"cpu", one)  # the exact text, tags and all
    many = orjson.dumps([orjson.loads(_ev("cpu", 1.0, NOW - 30, {"host": h})) for h in "abc"])
    routed = route(many, b"fallback", NOW)
    assert [k for k, _, _ in routed] == [b"cpu"] * 3
    assert [orjson.loads(v)["tags"]["host"] for _, v, _ in routed] == ["a", "b", "c"]


def test_remembered_series_keys_never_confuse_equal_values_of_other_types() -> None:
    # 1 == 1.0 == True and an absent key reads like null: the fast path remembers keys
    # of string values only, so each of these gets its own series (or its rejection)
    agg, clock, _ = _agg(("host",))
    values: list[Any] = ["1", 1, True, 1.0, "1", None, "true", 1]
    records = [_ev("cpu", 1.0, NOW - 30, {"host": v}) for v in values]
    records.append(_ev("cpu", 1.0, NOW - 30, {}))
    out = _feed(agg, records)
    assert [d.reason for d in out.dead_letters] == ["invalid_tags"]  # null
    got = {orjson.dumps(a.tags).decode(): a.count for a in _flush(agg, clock)}
    assert got == {'{"host":"1"}': 4, '{"host":"true"}': 2, '{"host":"1.0"}': 1, "{}": 1}


def test_an_event_with_unusable_tags_moves_no_routed_progress() -> None:
    # repartition=true: the router gives an event time only for events the windowing
    # stage will accept, so one it dead-letters as invalid_tags moves no event time
    rule = TagRule(GROUP_BY, 1)
    good = _ev("cpu", 1.0, NOW - 30, {"host": "a"})
    bad = _ev("cpu", 1.0, NOW - 20, {"host": [1]})
    assert route(good, b"f", NOW, rule) == [(b"cpu", good, NOW - 30)]
    assert route(bad, b"f", NOW, rule) == [(b"cpu", bad, None)]
    assert route(bad, b"f", NOW) == [(b"cpu", bad, NOW - 20)]  # without group-by: valid
    both = orjson.dumps([orjson.loads(good), orjson.loads(bad)])
    assert [ts for _, _, ts in route(both, b"f", NOW, rule)] == [NOW - 30, None]


def test_a_series_refused_by_the_cardinality_limit_takes_no_place_in_the_budget() -> None:
    # the budget is what the windows hold: the same after a restart from a checkpoint
    agg, _, _ = _agg(budget=2, max_open=2)
    records = [
        _ev("x", 1.0, NOW - 30, {"host": "a"}),
        _ev("y", 1.0, NOW - 30, {"host": "p"}),
        _ev("x", 1.0, NOW - 30, {"host": "b"}),  # cardinality_limit
    ]
    out = _feed(agg, records)
    assert [d.reason for d in out.dead_letters] == ["cardinality_limit"]
    [cp] = agg.snapshot()
    again, _, _ = _agg(budget=2, max_open=2)
    again.restore([cp])
    assert agg.partitions()["p"]["open_series"] == 2
    assert again.partitions()["p"]["open_series"] == 2


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    events=st.lists(
        st.tuples(
            st.sampled_from(["x", "y"]),
            st.sampled_from(["a", "b", "c", "d", None]),
            st.sampled_from(["sum", "max"]),
            st.sampled_from([NOW - 150, NOW - 90, NOW - 30]),
        ),
        max_size=40,
    ),
    cut=st.integers(0, 40),
    budget=st.integers(1, 3),
)
def test_a_restart_from_a_checkpoint_changes_no_output(
    events: list[tuple[str, str | None, str, float]], cut: int, budget: int
) -> None:
    # without AGGREGATION_MAX_OPEN_WINDOWS in play: a batch counts the keys of windows
    # it closes until it ends, so where batches are cut moves that limit (as before
    # v1.3, without tags too)
    max_open = 1000
    records = [
        _ev(name, 1.0, ts, None if host is None else {"host": host}, func)
        for name, host, func, ts in events
    ]

    def run(pieces: list[list[bytes]]) -> tuple[list[str], list[str]]:
        agg, clock, _ = _agg(budget=budget, max_open=max_open)
        dead, aggs = [], []
        for i, piece in enumerate(pieces):
            if i:  # a restart: a new aggregator from the last checkpoint
                snapshot = agg.snapshot()
                agg, clock, _ = _agg(budget=budget, max_open=max_open)
                agg.restore(snapshot)
            out = _feed(agg, piece, str(i))
            dead += [d.reason for d in out.dead_letters]
            aggs += out.aggregates
        return dead, sorted(map(repr, aggs + _flush(agg, clock)))

    assert run([records]) == run([records[:cut], records[cut:]])
