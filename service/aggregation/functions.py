"""Aggregation functions as accumulators: cheap per event, mergeable, checkpointable as JSON.

An accumulator (``Acc``) is a plain list whose first element is always the number of events
in it. Plain lists because the aggregator updates one per event (no objects per event) and
checkpoints them with orjson as they are. Every function can merge two accumulators of the
same key into the one that would have seen all their events, because one key's events may be
spread over several input partitions.

Layouts after the count:

=============  ====================================================================
count          nothing
sum, avg       ``s, c``: Neumaier-compensated sum, the total is ``s + c``
min, max       the extreme value
first, last    ``ts, value`` of the chosen event
stddev         ``mean, m2``: Welford's running mean and sum of squared deviations
p50 .. p99     a list of the raw values while there are at most
               ``PERCENTILE_EXACT_LIMIT``, then a :mod:`~service.aggregation.sketch`
=============  ====================================================================

``add`` is called in arrival order. ``merge(into, other)`` treats ``into``'s events as the
earlier arrivals (this decides ``first``/``last`` ties) and never changes ``other`` nor keeps
references into it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

from service.aggregation import sketch

__all__ = ["FUNCTIONS", "PERCENTILE_EXACT_LIMIT", "Acc", "AggFunction", "exact_percentile"]

Acc = list[Any]

PERCENTILE_EXACT_LIMIT: Final = 10_000


@dataclass(frozen=True, slots=True)
class AggFunction:
    """One aggregation function; the aggregator binds these callables in its hot loop."""

    name: str
    new: Callable[[float, float], Acc]
    """``new(value, ts)``: an accumulator holding one event."""
    add: Callable[[Acc, float, float], None]
    """``add(acc, value, ts)``: count one more event, in place."""
    merge: Callable[[Acc, Acc], None]
    """``merge(into, other)``: fold ``other`` into ``into``, in place."""
    result: Callable[[Acc], float]
    """``result(acc)``: the aggregate value; the accumulator stays usable."""


# -- count ---------------------------------------------------------------------------------


def _count_new(value: float, ts: float) -> Acc:
    return [1]


def _count_add(acc: Acc, value: float, ts: float) -> None:
    acc[0] += 1


def _count_merge(into: Acc, other: Acc) -> None:
    into[0] += other[0]


def _count_result(acc: Acc) -> float:
    return float(acc[0])


# -- sum, avg: compensated so that cancellation (1e12 + 1 - 1e12) does not lose the 1 ----------


def _sum_new(value: float, ts: float) -> Acc:
    return [1, value, 0.0]


def _sum_add(acc: Acc, value: float, ts: float) -> None:
    acc[0] += 1
    s = acc[1]
    t = s + value
    # Neumaier: recover the low-order bits the addition just rounded away. The absolute
    # values are compared without abs() calls: this runs once per event.
    if (s if s >= 0.0 else -s) >= (value if value >= 0.0 else -value):
        acc[2] += (s - t) + value
    else:
        acc[2] += (value - t) + s
    acc[1] = t


def _sum_merge(into: Acc, other: Acc) -> None:
    count = into[0] + other[0]
    _sum_add(into, other[1], 0.0)
    into[0] = count
    into[2] += other[2]


def _sum_result(acc: Acc) -> float:
    s = acc[1]
    # Past the double range the compensation is inf - inf = nan; the overflowed sum is truer.
    return float(s + acc[2]) if math.isfinite(s) else float(s)


def _avg_result(acc: Acc) -> float:
    return _sum_result(acc) / int(acc[0])


# -- min, max ------------------------------------------------------------------------------


def _extreme_new(value: float, ts: float) -> Acc:
    return [1, value]


def _min_add(acc: Acc, value: float, ts: float) -> None:
    acc[0] += 1
    if value < acc[1]:
        acc[1] = value


def _min_merge(into: Acc, other: Acc) -> None:
    into[0] += other[0]
    if other[1] < into[1]:
        into[1] = other[1]


def _max_add(acc: Acc, value: float, ts: float) -> None:
    acc[0] += 1
    if value > acc[1]:
        acc[1] = value


def _max_merge(into: Acc, other: Acc) -> None:
    into[0] += other[0]
    if other[1] > into[1]:
        into[1] = other[1]


def _extreme_result(acc: Acc) -> float:
    return float(acc[1])


# -- first, last: by event time; on a tie first keeps the earlier arrival, last the later ----


def _chosen_new(value: float, ts: float) -> Acc:
    return [1, ts, value]


def _first_add(acc: Acc, value: float, ts: float) -> None:
    acc[0] += 1
    if ts < acc[1]:
        acc[1] = ts
        acc[2] = value


def _first_merge(into: Acc, other: Acc) -> None:
    into[0] += other[0]
    if other[1] < into[1]:
        into[1] = other[1]
        into[2] = other[2]


def _last_add(acc: Acc, value: float, ts: float) -> None:
    acc[0] += 1
    if ts >= acc[1]:
        acc[1] = ts
        acc[2] = value


def _last_merge(into: Acc, other: Acc) -> None:
    into[0] += other[0]
    if other[1] >= into[1]:
        into[1] = other[1]
        into[2] = other[2]


def _chosen_result(acc: Acc) -> float:
    return float(acc[2])


# -- stddev (population): Welford per event, Chan et al. to merge; both numerically stable ---


def _stddev_new(value: float, ts: float) -> Acc:
    return [1, value, 0.0]


def _stddev_add(acc: Acc, value: float, ts: float) -> None:
    n = acc[0] + 1
    mean = acc[1]
    delta = value - mean
    mean += delta / n
    acc[0] = n
    acc[1] = mean
    acc[2] += delta * (value - mean)


def _stddev_merge(into: Acc, other: Acc) -> None:
    n_a, mean_a, m2_a = into
    n_b, mean_b, m2_b = other
    n = n_a + n_b
    delta = mean_b - mean_a
    into[0] = n
    into[1] = mean_a + delta * (n_b / n)
    into[2] = m2_a + m2_b + delta * delta * (n_a * n_b / n)


def _stddev_result(acc: Acc) -> float:
    return math.sqrt(max(acc[2], 0.0) / acc[0])


# -- percentiles: exact up to PERCENTILE_EXACT_LIMIT values, then a relative-error sketch ----


def _percentile_new(value: float, ts: float) -> Acc:
    return [1, [value]]


def _percentile_add(acc: Acc, value: float, ts: float) -> None:
    acc[0] += 1
    store = acc[1]
    if type(store) is list:
        store.append(value)
        if len(store) > PERCENTILE_EXACT_LIMIT:
            acc[1] = sketch.of(store)
    else:
        sketch.add(store, value)


def _percentile_merge(into: Acc, other: Acc) -> None:
    into[0] += other[0]
    mine, theirs = into[1], other[1]
    if type(mine) is list and type(theirs) is list:
        mine.extend(theirs)
        if len(mine) > PERCENTILE_EXACT_LIMIT:
            into[1] = sketch.of(mine)
        return
    if type(mine) is list:
        mine = into[1] = sketch.of(mine)
    if type(theirs) is list:
        for value in theirs:
            sketch.add(mine, value)
    else:
        sketch.merge(mine, theirs)


def exact_percentile(sorted_values: list[float], q: float) -> float:
    """numpy.percentile's default ("linear") on ascending, non-empty values; ``q`` in [0, 1]."""
    h = (len(sorted_values) - 1) * q
    lower = math.floor(h)
    fraction = h - lower
    a = sorted_values[lower]
    if fraction == 0.0 or lower + 1 >= len(sorted_values):
        return float(a)
    return sketch.interpolate(a, sorted_values[lower + 1], fraction)


def _percentile_result(q: float) -> Callable[[Acc], float]:
    def result(acc: Acc) -> float:
        store = acc[1]
        if type(store) is list:
            store.sort()  # in place: order inside the accumulator carries no meaning
            return exact_percentile(store, q)
        return sketch.quantile(store, q)

    return result


def _percentile(name: str, q: float) -> AggFunction:
    return AggFunction(
        name, _percentile_new, _percentile_add, _percentile_merge, _percentile_result(q)
    )


FUNCTIONS: Final[Mapping[str, AggFunction]] = MappingProxyType(
    {
        "sum": AggFunction("sum", _sum_new, _sum_add, _sum_merge, _sum_result),
        "avg": AggFunction("avg", _sum_new, _sum_add, _sum_merge, _avg_result),
        "min": AggFunction("min", _extreme_new, _min_add, _min_merge, _extreme_result),
        "max": AggFunction("max", _extreme_new, _max_add, _max_merge, _extreme_result),
        "count": AggFunction("count", _count_new, _count_add, _count_merge, _count_result),
        "first": AggFunction("first", _chosen_new, _first_add, _first_merge, _chosen_result),
        "last": AggFunction("last", _chosen_new, _last_add, _last_merge, _chosen_result),
        "stddev": AggFunction("stddev", _stddev_new, _stddev_add, _stddev_merge, _stddev_result),
        "p50": _percentile("p50", 0.50),
        "p90": _percentile("p90", 0.90),
        "p95": _percentile("p95", 0.95),
        "p99": _percentile("p99", 0.99),
    }
)
