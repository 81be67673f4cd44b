"""Window maths: epoch-aligned tumbling windows, checked against exact fractions."""

from __future__ import annotations

import math
from fractions import Fraction

from hypothesis import given
from hypothesis import strategies as st

from service.aggregation.windows import (
    close_index,
    closed_boundary,
    emitted_by,
    event_time_limit,
    is_ahead,
    is_idle,
    is_late,
    quiet_close,
    window_index,
    window_start,
)

timestamps = st.floats(min_value=0, max_value=4e9, allow_nan=False)
intervals = st.sampled_from([0.5, 1.0, 10.0, 60.0, 300.0, 3600.0, 86400.0])


@given(timestamps, intervals)
def test_window_holds_its_timestamp_and_is_aligned_to_the_epoch(ts: float, interval: float) -> None:
    start = window_start(ts, interval)
    assert start <= ts < start + interval
    assert Fraction(start) % Fraction(interval) == 0


@given(timestamps, intervals)
def test_closed_boundary_is_the_last_window_end_not_after_the_watermark(
    wm: float, interval: float
) -> None:
    edge = closed_boundary(wm, interval)
    assert edge <= wm < edge + interval


def test_window_of_a_boundary_timestamp_starts_there() -> None:
    assert window_start(1_700_000_040.0, 60.0) == 1_700_000_040.0
    assert window_start(1_700_000_039.999, 60.0) == 1_699_999_980.0


@given(timestamps, intervals)
def test_window_index_numbers_the_window_that_starts_there(ts: float, interval: float) -> None:
    assert window_index(ts, interval) * interval == window_start(ts, interval)


@given(timestamps, st.sampled_from([0.0, 30.0, 90.0]), intervals, timestamps)
def test_close_index_is_the_boundary_of_the_event_time_less_the_grace(
    event_time: float, grace: float, interval: float, cap: float
) -> None:
    limit = event_time_limit(event_time, cap)
    assert limit == min(event_time, cap)
    edge = closed_boundary(limit - grace, interval)
    assert close_index(limit, grace, interval) * interval == edge


@given(timestamps, intervals)
def test_a_window_is_late_exactly_when_it_ends_at_or_before_the_emitted_boundary(
    ts: float, interval: float
) -> None:
    start = window_start(ts, interval)
    assert is_late(start, interval, start + interval, set())
    assert not is_late(start, interval, start + interval / 2, set())
    assert is_late(start, interval, -math.inf, {start})  # the quiet rule emitted it


@given(timestamps, st.floats(min_value=0, max_value=4e9))
def test_an_event_is_ahead_only_past_the_lead_cap(ts: float, cap: float) -> None:
    assert is_ahead(ts, cap) == (ts > cap)


def test_a_partition_is_idle_only_caught_up_and_quiet_for_the_timeout() -> None:
    assert is_idle(True, 100.0, 40.0, 60.0)
    assert not is_idle(True, 99.0, 40.0, 60.0)
    assert not is_idle(False, 1000.0, 40.0, 60.0)


@given(
    st.lists(st.integers(0, 50).map(lambda k: k * 60.0), unique=True),
    st.one_of(st.none(), st.floats(min_value=0, max_value=3000)),
    st.floats(min_value=-1, max_value=3000),
)
def test_the_quiet_rule_moves_the_boundary_past_the_windows_of_its_event_time_only(
    starts: list[float], event_time: float | None, closed_until: float
) -> None:
    moved, above = quiet_close(starts, event_time, closed_until, 60.0)
    held = -math.inf if event_time is None else event_time
    assert moved >= closed_until
    assert sorted(above) == sorted(s for s in starts if s > held)
    for s in starts:
        assert (s in above) or s + 60.0 <= moved  # each emitted window is late from now on


def test_emitted_by_takes_the_windows_ending_at_or_before_the_boundary() -> None:
    assert emitted_by([0.0, 60.0, 120.0], 120.0, 60.0) == [0.0, 60.0]
