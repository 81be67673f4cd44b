"""Percentile accumulators (``p50`` .. ``p99``): ``[count, store]``, the store the raw
values while there are at most :data:`PERCENTILE_EXACT_LIMIT` (exact results, numpy's
default interpolation), then a relative-error :mod:`~service.aggregation.sketch`."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Final

from service.aggregation import sketch

__all__ = ["PERCENTILE_EXACT_LIMIT", "add", "exact_percentile", "merge", "new", "result"]

Acc = list[Any]  # as functions.Acc (which imports this module)

PERCENTILE_EXACT_LIMIT: Final = 10_000


def new(value: float, ts: float) -> Acc:
    return [1, [value]]


def add(acc: Acc, value: float, ts: float) -> None:
    acc[0] += 1
    store = acc[1]
    if type(store) is list:
        store.append(value)
        if len(store) > PERCENTILE_EXACT_LIMIT:
            acc[1] = sketch.of(store)
    else:
        sketch.add(store, value)


def merge(into: Acc, other: Acc) -> None:
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


def result(q: float) -> Callable[[Acc], float]:
    """The ``result`` of the percentile ``q`` (in [0, 1])."""

    def result_of(acc: Acc) -> float:
        store = acc[1]
        if type(store) is list:
            store.sort()  # in place: order inside the accumulator carries no meaning
            return exact_percentile(store, q)
        return sketch.quantile(store, q)

    return result_of
