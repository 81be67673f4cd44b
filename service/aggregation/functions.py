"""Aggregation functions as accumulators: cheap per event, mergeable, checkpointable as JSON.

An accumulator (``Acc``) is a plain list whose first element is always the number of events
in it. Plain lists because the aggregator updates one per event (no objects per event) and
checkpoints them with orjson as they are. Every function can merge two accumulators of the
same key into the one that would have seen all their events, because one key's events may be
spread over several input partitions.

Layouts after the count:

=============  ====================================================================
count          nothing
sum, avg       ``s, c``: Neumaier-compensated sum, the total is ``s + c``; an ``avg``
               may hold ``k`` after them: then the total is ``s + c + k * 2**1000``
min, max       the extreme value
first, last    ``ts, value`` of the chosen event
stddev         ``mean, m2[, e]``: Welford's running mean and sum of squared deviations;
               with ``e`` both are of the values scaled by ``2**-e`` (values beyond ~1e154)
p50 .. p99     a list of the raw values while there are at most
               ``PERCENTILE_EXACT_LIMIT``, then a DDSketch state
               (:mod:`~service.aggregation.percentiles`)
=============  ====================================================================

Every result is a finite double. The mean, the standard deviation and a percentile of finite
values always are, and they are computed so that no intermediate overflows: an ``avg``'s
running sum that comes within ``2**1020`` of the limit moves whole multiples of
``2**1000`` into ``k``; a
Welford state that would overflow (squares of values beyond ~1e154) is rescaled by
``2**-600`` once. Only a ``sum`` can truly leave the double range: its ``add`` and ``merge``
then raise ``OverflowError`` and leave the accumulator as it was (the aggregator rejects the
event, reason ``overflow``). Layouts without the optional tail are the ones written by
releases before these were added, so their checkpoints restore unchanged.
:func:`valid` checks a decoded accumulator before it is used.

``add`` is called in arrival order. ``merge(into, other)`` treats ``into``'s events as the
earlier arrivals (this decides ``first``/``last`` ties) and never changes ``other`` nor keeps
references into it.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

from service.aggregation import percentiles
from service.aggregation.percentiles import PERCENTILE_EXACT_LIMIT, exact_percentile

__all__ = [
    "FUNCTIONS",
    "PERCENTILE_EXACT_LIMIT",
    "SUM_PLAIN_LIMIT",
    "Acc",
    "AggFunction",
    "exact_percentile",
    "valid",
]

Acc = list[Any]


@dataclass(frozen=True, slots=True)
class AggFunction:
    """One aggregation function; the hot loop binds these callables (batch_run)."""

    name: str
    new: Callable[[float, float], Acc]
    """``new(value, ts)``: an accumulator holding one event."""
    add: Callable[[Acc, float, float], None]
    """``add(acc, value, ts)``: count one more event, in place. Raises ``OverflowError``,
    with ``acc`` unchanged, when the result would leave the double range (``sum`` only)."""
    merge: Callable[[Acc, Acc], None]
    """``merge(into, other)``: fold ``other`` into ``into``, in place; ``OverflowError``
    like ``add``."""
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

WIDE_UNIT: Final = 2.0**1000
"""Near the double limit a running sum keeps whole multiples of this apart (``acc[3]``)."""
SUM_PLAIN_LIMIT: Final = 2.0**1020
"""A running sum within this bound takes the plain path (the hot loop inlines it)."""
_MAX: Final = sys.float_info.max


def _sum_new(value: float, ts: float) -> Acc:
    return [1, value, 0.0]


def _sum_plain_add(acc: Acc, value: float) -> None:
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


def _split(x: float) -> tuple[int, float]:
    """``x == k * WIDE_UNIT + rest`` exactly, with ``|rest| < WIDE_UNIT``."""
    k = int(x / WIDE_UNIT)  # dividing by a power of two is exact here
    # exact: both terms are multiples of ulp(x), and so is a rest below WIDE_UNIT
    return k, x - k * WIDE_UNIT


def _wide_add(acc: Acc, value: float) -> None:
    """Add ``value`` with the whole multiples of WIDE_UNIT of both terms kept in ``acc[3]``:
    the remainders sum to less than ``2 * WIDE_UNIT``, which cannot overflow."""
    k_s, s = _split(acc[1])
    k_v, v = _split(value)
    acc[1] = s
    _sum_plain_add(acc, v)
    k = (acc[3] if len(acc) > 3 else 0) + k_s + k_v
    if len(acc) > 3:
        acc[3] = k
    else:
        acc.append(k)


def _avg_add(acc: Acc, value: float, ts: float) -> None:
    t = acc[1] + value
    if -SUM_PLAIN_LIMIT <= t <= SUM_PLAIN_LIMIT:
        _sum_plain_add(acc, value)
    else:
        _wide_add(acc, value)


def _sum_add(acc: Acc, value: float, ts: float) -> None:
    # A sum's total must stay finite, so its running sum never needs the wide layout:
    # near the limit, add as usual and undo it when the total left the range.
    t = acc[1] + value
    if -SUM_PLAIN_LIMIT <= t <= SUM_PLAIN_LIMIT:
        _sum_plain_add(acc, value)
        return
    saved = acc[:]
    _sum_plain_add(acc, value)
    if not math.isfinite(_sum_total(acc)):  # inf, or nan from the compensation of inf
        acc[:] = saved
        raise OverflowError(f"adding {value!r} would take the sum beyond the double range")


def _avg_merge(into: Acc, other: Acc) -> None:
    count = into[0] + other[0]
    _avg_add(into, other[1], 0.0)
    into[0] = count
    into[2] += other[2]
    if len(other) > 3 and other[3]:
        if len(into) > 3:
            into[3] += other[3]
        else:
            into.append(other[3])


def _sum_merge(into: Acc, other: Acc) -> None:
    saved = into[:]
    count = into[0] + other[0]
    _sum_plain_add(into, other[1])
    into[0] = count
    into[2] += other[2]
    if not math.isfinite(_sum_total(into)):
        into[:] = saved
        raise OverflowError("the merged sum would be beyond the double range")


def _sum_total(acc: Acc) -> float:
    """``s + c + k * WIDE_UNIT`` as a double: ``inf`` when beyond the double range."""
    s = acc[1]
    total = float(s + acc[2])
    if len(acc) > 3 and acc[3]:
        total += acc[3] * WIDE_UNIT  # both finite: inf at worst, never an error
    return total


def _sum_result(acc: Acc) -> float:
    return _sum_total(acc)


def _avg_result(acc: Acc) -> float:
    n = int(acc[0])
    total = _sum_total(acc)
    if -_MAX <= total <= _MAX:
        return total / n
    # the sum is beyond the double range but the mean never is: divide the parts
    mean = float(acc[1] + acc[2]) / n + (acc[3] / n) * WIDE_UNIT
    return mean if -_MAX <= mean <= _MAX else math.copysign(_MAX, mean)  # rounding at the edge


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

STDDEV_SHIFT: Final = 600
"""A wide stddev state holds the values scaled by ``2**-STDDEV_SHIFT``: their squares fit."""


def _stddev_new(value: float, ts: float) -> Acc:
    return [1, value, 0.0]


def _stddev_add(acc: Acc, value: float, ts: float) -> None:
    n = acc[0] + 1
    x = value if len(acc) == 3 else math.ldexp(value, -acc[3])
    mean = acc[1]
    delta = x - mean
    mean += delta / n
    m2 = acc[2] + delta * (x - mean)
    if m2 - m2 != 0.0:  # inf or nan: squares beyond the double range; only once per window
        if len(acc) != 3:  # scaled squares fit unless a window held ~2**170 events
            raise OverflowError("the scaled stddev state left the double range")
        _stddev_widen(acc)
        _stddev_add(acc, value, ts)
        return
    acc[0] = n
    acc[1] = mean
    acc[2] = m2


def _stddev_widen(acc: Acc) -> None:
    """Rescale a plain state to ``2**-STDDEV_SHIFT`` (exact but for subnormal results:
    those values are far below the spread that made the rescaling necessary)."""
    if len(acc) == 3:
        acc[1] = math.ldexp(acc[1], -STDDEV_SHIFT)
        acc[2] = math.ldexp(acc[2], -2 * STDDEV_SHIFT)
        acc.append(STDDEV_SHIFT)


def _stddev_merge(into: Acc, other: Acc) -> None:
    if len(into) == 3 and len(other) == 3:
        n_a, mean_a, m2_a = into
        n_b, mean_b, m2_b = other
        n = n_a + n_b
        delta = mean_b - mean_a
        m2 = m2_a + m2_b + delta * delta * (n_a * n_b / n)
        if m2 - m2 == 0.0:
            into[0] = n
            into[1] = mean_a + delta * (n_b / n)
            into[2] = m2
            return
    _stddev_widen(into)
    if len(other) == 3:
        other = other[:]
        _stddev_widen(other)
    n_a, mean_a, m2_a = into[:3]
    n_b, mean_b, m2_b = other[:3]
    n = n_a + n_b
    delta = mean_b - mean_a
    into[0] = n
    into[1] = mean_a + delta * (n_b / n)
    into[2] = m2_a + m2_b + delta * delta * (n_a * n_b / n)


def _stddev_result(acc: Acc) -> float:
    root = math.sqrt(max(acc[2], 0.0) / acc[0])
    if len(acc) == 3:
        return root
    try:
        return min(math.ldexp(root, acc[3]), _MAX)  # never above (max - min) / 2
    except OverflowError:  # rounding at the very edge of the double range
        return _MAX


def _percentile(name: str, q: float) -> AggFunction:
    return AggFunction(
        name, percentiles.new, percentiles.add, percentiles.merge, percentiles.result(q)
    )


FUNCTIONS: Final[Mapping[str, AggFunction]] = MappingProxyType(
    {
        "sum": AggFunction("sum", _sum_new, _sum_add, _sum_merge, _sum_result),
        "avg": AggFunction("avg", _sum_new, _avg_add, _avg_merge, _avg_result),
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


# -- validation of decoded state (a checkpoint is input too) ---------------------------------

_MAX_EVENTS: Final = 2**62


def _finite(x: Any) -> bool:
    kind = type(x)
    return (kind is float and -_MAX <= x <= _MAX) or (kind is int and -_MAX <= x <= _MAX)


def _count_ok(acc: Any, size: int, *optional: int) -> bool:
    return (
        type(acc) is list
        and (len(acc) == size or len(acc) in optional)
        and type(acc[0]) is int
        and 1 <= acc[0] < _MAX_EVENTS
    )


def _valid_sum(acc: Any) -> bool:
    return _count_ok(acc, 3) and _finite(acc[1]) and _finite(acc[2])


def _valid_avg(acc: Any) -> bool:
    if not (_count_ok(acc, 3, 4) and _finite(acc[1]) and _finite(acc[2])):
        return False
    return len(acc) == 3 or (type(acc[3]) is int and abs(acc[3]) < _MAX_EVENTS)


def valid(func: str, acc: Any) -> bool:
    """Whether ``acc`` is a usable accumulator of ``func``: the layout, finite numbers
    of the right types and an event count that matches what it holds. Every function's
    ``result`` returns a finite double for a valid accumulator."""
    if func == "sum":
        return _valid_sum(acc) and math.isfinite(_sum_total(acc))
    if func == "avg":
        return _valid_avg(acc)
    if func == "count":
        return _count_ok(acc, 1)
    if func in ("min", "max"):
        return _count_ok(acc, 2) and _finite(acc[1])
    if func in ("first", "last"):
        return _count_ok(acc, 3) and _finite(acc[1]) and _finite(acc[2])
    if func == "stddev":
        ok = _count_ok(acc, 3, 4) and _finite(acc[1]) and _finite(acc[2]) and acc[2] >= 0.0
        return ok and (len(acc) == 3 or acc[3] == STDDEV_SHIFT)
    if func in FUNCTIONS:  # a percentile
        if not _count_ok(acc, 2):
            return False
        store = acc[1]
        if type(store) is list:
            return len(store) == acc[0] and all(_finite(v) for v in store)
        return percentiles.valid_sketch(store, acc[0])
    return False
