"""Window maths: epoch-aligned tumbling windows, checked against exact fractions."""

from __future__ import annotations

from fractions import Fraction

from hypothesis import given
from hypothesis import strategies as st

from service.aggregation.windows import closed_boundary, window_start

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
