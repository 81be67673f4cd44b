"""Corrections with AGGREGATION_GROUP_BY: a re-emitted window keeps its series' tags,
and a late event of a tag set new to an emitted window counts against the series budget
(beyond it, it joins the name's overflow series), as it would have in the open window."""

from __future__ import annotations

from typing import Any

from tests.unit.test_corrections import INTERVAL, S, ev, make, rec, run


def tagged(name: str, value: float, ts: float, host: str) -> dict[str, Any]:
    return {**ev(name, value, ts), "tags": {"host": host}}


def test_a_correction_keeps_the_tags_of_its_series() -> None:
    agg, _ = make(group_by=("host",))
    run(agg, [rec(tagged("a", 1, S + 1, "h1")), rec(ev("a", 4, S + 2))])
    first = run(agg, [rec(ev("a", 0, S + INTERVAL))])
    assert sorted((a.tags["host"] if a.tags else "-", a.revision) for a in first.aggregates) == [
        ("-", 1),
        ("h1", 1),
    ]
    out = run(agg, [rec(tagged("a", 2, S + 3, "h1")), rec(ev("a", 5, S + 4))])
    got = sorted(
        ((str(a.tags), a.tags), a.value, a.revision) for a in out.aggregates if a.window_start == S
    )
    # {} (not None) for the series without tags: the Kafka field stays
    assert [(t[1], v, r) for t, v, r in got] == [({"host": "h1"}, 3.0, 2), ({}, 9.0, 2)]


def test_a_late_new_tag_set_beyond_the_budget_joins_the_overflow_series() -> None:
    agg, metrics = make(group_by=("host",), max_series_per_name=2)
    run(agg, [rec(tagged("a", 1, S + 1, "h1")), rec(tagged("a", 1, S + 2, "h2"))])
    run(agg, [rec(ev("b", 0, S + INTERVAL))])  # [S, S+10) emitted with h1 and h2
    out = run(agg, [rec(tagged("a", 5, S + 3, "h3"))])
    [corrected] = [a for a in out.aggregates if a.window_start == S]
    assert corrected.tags == {"host": "__overflow__"}
    assert (corrected.value, corrected.revision) == (5.0, 1)
    assert metrics.snapshot()["series_overflow"] == 1
    within = run(agg, [rec(tagged("a", 7, S + 4, "h1"))])  # a known tag set: its own series
    [h1] = [a for a in within.aggregates if a.window_start == S]
    assert (h1.tags, h1.value, h1.revision) == ({"host": "h1"}, 8.0, 2)
