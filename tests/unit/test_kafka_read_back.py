"""AlreadyWritten: which replayed aggregates the Kafka output already holds (revisions,
tags, records of the previous release)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import orjson

from service.core.events import Aggregate
from service.sinks.kafka import encode_aggregates
from service.sinks.kafka_read_back import AlreadyWritten

T0 = 1_700_000_040.0
TOPIC = "aggregates"


def agg(
    name: str = "cpu",
    count: int = 3,
    revision: int = 1,
    tags: Mapping[str, str] | None = None,
    start: float = T0,
) -> Aggregate:
    return Aggregate(
        name=name,
        agg_func="sum",
        value=float(count),
        count=count,
        window_start=start,
        window_end=start + 10,
        emitted_at=start + 11,
        tags=tags,
        revision=revision,
    )


def found(*aggregates: Aggregate) -> AlreadyWritten:
    """What a read-back of records written by this release finds."""
    seen = AlreadyWritten()
    records, refused = encode_aggregates(aggregates)
    assert not refused
    seen.add([(TOPIC, value) for _, value in records], TOPIC, now=0.0)
    return seen


def found_v12(*objs: dict[str, Any]) -> AlreadyWritten:
    """What a read-back of records written by the previous release finds."""
    seen = AlreadyWritten()
    seen.add([(TOPIC, orjson.dumps(o)) for o in objs], TOPIC, now=0.0)
    return seen


def v12_record(a: Aggregate) -> dict[str, Any]:
    """The v1.2 value of ``a``: revision = count, no tags."""
    obj = a.to_json_obj()
    obj["revision"] = a.count
    return obj


def kept(seen: AlreadyWritten, *aggregates: Aggregate, now: float = 1.0) -> list[Aggregate]:
    return list(seen.drop_written(aggregates, [], now)[0])


def test_a_replayed_revision_is_skipped_and_a_later_revision_is_written() -> None:
    tags = {"host": "a"}
    seen = found(agg(count=3, tags=tags), agg(count=5, revision=2, tags=tags))
    replayed = [agg(count=3, tags=tags), agg(count=5, revision=2, tags=tags)]
    correction = agg(count=6, revision=3, tags=tags)

    assert kept(seen, *replayed, correction) == [correction]
    # skipped however often a replay repeats it (several kill -9 cycles)
    assert kept(seen, *replayed) == []


def test_a_replayed_revision_is_skipped_even_with_other_content() -> None:
    """The identity is the revision: a replay deciding differently about an event far
    behind its partition does not write the same revision twice."""
    seen = found(agg(count=3, revision=2, tags={"host": "a"}))

    assert kept(seen, agg(count=4, revision=2, tags={"host": "a"})) == []


def test_series_differing_only_in_tags_are_different_records() -> None:
    seen = found(agg(tags={"host": "a", "region": "eu"}))
    same = agg(tags={"region": "eu", "host": "a"})  # key order is no difference
    other = agg(tags={"host": "b", "region": "eu"})
    fewer = agg(tags={"host": "a"})

    assert kept(seen, same, other, fewer) == [other, fewer]


def test_no_tags_and_empty_tags_are_one_series() -> None:
    seen = found(agg(count=4, revision=2, tags={}))

    assert kept(seen, agg(count=4, revision=2)) == []


def test_other_windows_names_and_functions_are_written() -> None:
    seen = found(agg())
    others = [agg(start=T0 + 10), agg(name="mem"), replace(agg(), agg_func="max")]

    assert kept(seen, *others) == others


def test_a_v12_record_hides_the_upgraded_replay_of_its_window_as_revision_1() -> None:
    """v1.2 wrote revision = count; the new release replays the window from the old
    checkpoint as revision 1 with the same count."""
    seen = found_v12(v12_record(agg(count=5)), v12_record(agg(name="mem", count=1)))

    assert kept(seen, agg(count=5), agg(name="mem", count=1)) == []
    assert kept(seen, agg(count=5, tags={})) == []  # AGGREGATION_GROUP_BY set since


def test_a_v12_record_does_not_hide_a_later_revision_of_its_window() -> None:
    seen = found_v12(v12_record(agg(count=5)))
    # Revision 5 of this release holds more events than the v1.2 emission: it is new.
    fifth = agg(count=9, revision=5)
    second = agg(count=6, revision=2)

    assert kept(seen, fifth, second) == [fifth, second]


def test_a_record_of_this_release_whose_revision_equals_its_count_is_matched() -> None:
    """Revision 2 of a window that had one event, then one late event: it looks like a
    v1.2 record, and its count names its revision."""
    seen = found(agg(count=2, revision=2), agg(name="mem", count=1))

    assert kept(seen, agg(count=2, revision=2), agg(name="mem", count=1)) == []
    assert kept(seen, agg(name="mem", count=2)) == []  # revision 1 all the same


def test_what_was_found_is_forgotten_ten_minutes_after_the_read_back() -> None:
    seen = found(agg())

    assert kept(seen, agg(), now=601.0) == [agg()]
    assert not seen


def test_records_that_are_not_aggregates_of_ours_are_ignored() -> None:
    seen = AlreadyWritten()
    seen.add([(TOPIC, b"not json"), (TOPIC, b"[1]"), (TOPIC, b'{"name": "x"}')], TOPIC, 0.0)

    assert not seen
