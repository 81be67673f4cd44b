"""Percentile accumulators (``p50`` .. ``p99``): ``[count, store]``, the store the raw
values while there are at most :data:`PERCENTILE_EXACT_LIMIT` (exact results, numpy's
default interpolation), then a DDSketch (:mod:`~service.aggregation.quantile_sketch`).

Adding a value to the raw list is all the hot path does; the sketch every percentile
aggregate carries (:func:`sketch_bytes`) is built at emission. A sketch checkpointed by a
release before 1.3 is converted when it is first used (:func:`_sketch`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Final

from service.aggregation import quantile_sketch as dd

__all__ = [
    "PERCENTILES",
    "PERCENTILE_EXACT_LIMIT",
    "add",
    "exact_percentile",
    "interpolate",
    "merge",
    "new",
    "result",
    "sketch_of",
    "v13_layout",
    "valid_sketch",
]

Acc = list[Any]  # as functions.Acc (which imports this module)

PERCENTILE_EXACT_LIMIT: Final = 10_000
PERCENTILES: Final = {"p50": 0.50, "p90": 0.90, "p95": 0.95, "p99": 0.99}


def new(value: float, ts: float) -> Acc:
    return [1, [value]]


def add(acc: Acc, value: float, ts: float) -> None:
    acc[0] += 1
    store = acc[1]
    if type(store) is list:
        store.append(value)
        if len(store) > PERCENTILE_EXACT_LIMIT:
            acc[1] = dd.of(store)
    else:
        dd.add(store if "alpha" in store else _sketch(acc), value)


def merge(into: Acc, other: Acc) -> None:
    into[0] += other[0]
    mine, theirs = into[1], other[1]
    if type(mine) is list and type(theirs) is list:
        mine.extend(theirs)
        if len(mine) > PERCENTILE_EXACT_LIMIT:
            into[1] = dd.of(mine)
        return
    if type(mine) is list:
        into[1] = dd.of(mine)
    if type(theirs) is list:
        dd.add_many(_sketch(into), theirs)
    else:  # ``other`` stays as it is, whatever its layout
        dd.merge(_sketch(into), theirs if "alpha" in theirs else dd.from_v12(theirs))


def exact_percentile(sorted_values: list[float], q: float) -> float:
    """numpy.percentile's default ("linear") on ascending, non-empty values; ``q`` in [0, 1]."""
    h = (len(sorted_values) - 1) * q
    lower = math.floor(h)
    fraction = h - lower
    a = sorted_values[lower]
    if fraction == 0.0 or lower + 1 >= len(sorted_values):
        return float(a)
    return interpolate(a, sorted_values[lower + 1], fraction)


def interpolate(lower: float, upper: float, fraction: float) -> float:
    """``lower + fraction * (upper - lower)``, numpy's "linear" rule, safe from overflow."""
    difference = upper - lower
    if math.isinf(difference):  # only for values near the double limit
        return (1.0 - fraction) * lower + fraction * upper
    return lower + fraction * difference


def result(q: float) -> Callable[[Acc], float]:
    """The ``result`` of the percentile ``q`` (in [0, 1])."""

    def result_of(acc: Acc) -> float:
        store = acc[1]
        if type(store) is list:
            store.sort()  # in place: order inside the accumulator carries no meaning
            return exact_percentile(store, q)
        return dd.quantile(_sketch(acc), q)

    return result_of


def sketch_of(func: str, acc: Acc) -> bytes | None:
    """The DDSketch protobuf bytes of a percentile aggregate, None for other functions.
    Emission builds the sketch of a raw list here (~1.6 ms for 10,000 values)."""
    if func not in PERCENTILES:
        return None
    store = acc[1]
    return dd.to_bytes(dd.of(store) if type(store) is list else _sketch(acc))


def valid_sketch(store: Any, events: int) -> bool:
    """Whether a decoded sketch store (of either layout) is usable and holds ``events``."""
    if type(store) is dict and "alpha" in store:
        return dd.valid_count(store) == events
    return dd.valid_v12_count(store) == events


def v13_layout(acc: Acc) -> bool:
    """Whether a percentile accumulator holds a sketch that a release before 1.3 would
    misread as its own (the checkpoint format then names v1.3, partition.py)."""
    store = acc[1]
    return type(store) is dict and "alpha" in store


def _sketch(acc: Acc) -> dd.State:
    """The accumulator's sketch, converted in place from the pre-1.3 layout if need be."""
    store: dd.State = acc[1]
    if "alpha" not in store:
        store = acc[1] = dd.from_v12(store)
    return store
