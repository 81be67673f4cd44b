"""One dead letter through validation again (service.dlq.revalidate): the service's own
decoder with today's limits; what may be redriven, and what is refused unguessed."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from service.aggregation.batch_run import Limits
from service.aggregation.decode import RAW_LIMIT
from service.aggregation.series import TagRule
from service.core.clock import ManualClock
from service.dlq.revalidate import Outcome, revalidate

NOW = 1_764_752_400.0
CLOCK = ManualClock(NOW)


def limits(max_bytes: int = 1_000_000, max_elements: int = 100) -> Limits:
    return Limits(
        interval=60.0,
        grace=0.0,
        budget=1000,
        max_ts=NOW + 60.0,
        lead_cap=NOW + 60.0,
        max_bytes=max_bytes,
        max_elements=max_elements,
        reach=60.0,
    )


def ev(i: int, **more: Any) -> dict[str, Any]:
    return {"name": f"n{i}", "value": float(i), "timestamp": NOW - 100 + i, **more}


def message(n: int) -> str:
    return orjson.dumps([ev(i) for i in range(n)]).decode()


def past_first(cap: int, held: int) -> str:
    return (
        f"{held - cap} elements past the first {cap} of a {held}-element message "
        "(VABUS_MAX_EVENTS_PER_MESSAGE); raw is the message"
    )


def names(out: Outcome) -> list[str]:
    return [e[0] for e in out.accepted]


def test_a_message_over_the_old_byte_limit_is_accepted_under_the_raised_one() -> None:
    raw = message(3)
    detail = f"message of {len(raw)} bytes exceeds 100"
    out = revalidate(raw, "too_large", detail, limits(), None, CLOCK)
    assert names(out) == ["n0", "n1", "n2"] and not out.failed and out.label == "accepted"
    assert out.accepted[1] == ("n1", "sum", 1.0, NOW - 99, None)
    again = revalidate(raw, "too_large", detail, limits(max_bytes=100), None, CLOCK)
    assert not again.accepted and again.failed == {"too_large": 1}
    assert again.label == "too_large"


def test_only_the_elements_past_the_first_cap_are_redriven() -> None:
    raw = message(5)  # the first 2 were accepted when the cap was 2
    detail = past_first(2, 5)
    out = revalidate(raw, "too_large", detail, limits(max_elements=3), None, CLOCK)
    # as the whole message under a cap of 3: element 2 accepted, 3 and 4 refused
    assert names(out) == ["n2"] and out.failed == {"too_large": 2}
    out = revalidate(raw, "too_large", detail, limits(max_elements=100), None, CLOCK)
    assert names(out) == ["n2", "n3", "n4"] and not out.failed
    same = revalidate(raw, "too_large", detail, limits(max_elements=2), None, CLOCK)
    assert not same.accepted and same.failed == {"too_large": 3}
    lowered = revalidate(raw, "too_large", detail, limits(max_elements=1), None, CLOCK)
    assert not lowered.accepted and lowered.failed == {"too_large": 3}


def test_a_past_the_first_message_now_over_the_byte_limit_fails_whole() -> None:
    raw = message(5)
    out = revalidate(raw, "too_large", past_first(2, 5), limits(max_bytes=50), None, CLOCK)
    assert not out.accepted and out.failed == {"too_large": 1}


@pytest.mark.parametrize(
    "detail",
    [
        past_first(2, 6),  # the raw holds 5 elements
        "some elements were too many",  # a form this release does not write
        past_first(5, 5).replace("raw is the message", "raw is the first"),
    ],
)
def test_a_too_large_detail_that_does_not_fit_is_refused_not_guessed(detail: str) -> None:
    out = revalidate(message(5), "too_large", detail, limits(), None, CLOCK)
    assert not out.accepted and out.failed == {"unrecognised": 1}


def test_a_truncated_raw_fails_again_as_truncated() -> None:
    big = message(2000)
    assert len(big) > RAW_LIMIT
    cut = big[:RAW_LIMIT]
    detail = f"message of {len(big)} bytes exceeds 1000"
    out = revalidate(cut, "too_large", detail, limits(), None, CLOCK)
    assert out.failed == {"truncated": 1} and not out.accepted
    element = orjson.dumps(ev(1, note="x" * RAW_LIMIT)).decode()[:RAW_LIMIT]
    out = revalidate(element, "invalid_value", "whatever", limits(), None, CLOCK)
    assert out.failed == {"truncated": 1}


def test_a_rolled_up_dead_letter_is_not_redriven() -> None:
    detail = (
        "40 more elements of this message rejected as 'late' (past the first 100 dead "
        "letters of one message); raw is the first of them: window starting 0 was emitted"
    )
    out = revalidate(orjson.dumps(ev(1)).decode(), "late", detail, limits(), None, CLOCK)
    assert out.failed == {"rolled_up": 1} and not out.accepted


def test_an_element_goes_through_the_same_rules_again() -> None:
    late = revalidate(orjson.dumps(ev(1)).decode(), "late", "", limits(), None, CLOCK)
    assert names(late) == ["n1"]
    bad = orjson.dumps(ev(1, value="abc")).decode()
    out = revalidate(bad, "invalid_value", "", limits(), None, CLOCK)
    assert out.failed == {"invalid_value": 1}
    future = orjson.dumps(ev(1, timestamp=NOW + 120)).decode()
    out = revalidate(future, "future_timestamp", "", limits(), None, CLOCK)
    assert out.failed == {"future_timestamp": 1}
    later = ManualClock(NOW + 3600)  # the clock caught up with it
    moved = limits()._replace(max_ts=NOW + 3600 + 60)
    assert names(revalidate(future, "future_timestamp", "", moved, None, later)) == ["n1"]
    out = revalidate("{not json", "invalid_value", "", limits(), None, CLOCK)
    assert out.failed == {"unrecognised": 1}


def test_group_by_tags_become_the_archive_s_tags_text() -> None:
    tags = TagRule(("region",), 100)
    raw = orjson.dumps(ev(1, tags={"region": "eu", "host": "a"})).decode()
    out = revalidate(raw, "late", "", limits(), tags, CLOCK)
    assert out.accepted == [("n1", "sum", 1.0, NOW - 99, '{"region":"eu"}')]
    plain = revalidate(orjson.dumps(ev(2)).decode(), "late", "", limits(), tags, CLOCK)
    assert plain.accepted[0][4] == "{}"
