"""A mergeable relative-error quantile sketch (DDSketch-style) for windows too big to keep exactly.

A non-zero value ``x`` is counted in the logarithmic bucket ``k = ceil(log_gamma |x|)``, which
holds ``(gamma**(k-1), gamma**k]`` with ``gamma = (1 + ALPHA) / (1 - ALPHA)``. Reporting that
bucket as ``2 * gamma**k / (gamma + 1)`` is within ``ALPHA`` relative of every value in it.
Positive and negative values have separate stores; zero (and any ``|x|`` below the smallest
normal double, whose logarithm is not precise enough) is a plain count.

Bucket counts are exact, so ranks are exact and merging is lossless:
``merge(of(A), of(B))`` equals ``of(A + B)`` bucket for bucket.

The state is plain JSON (orjson checkpoints it as is)::

    {"zero": int, "pos": [offset, counts], "neg": [offset, counts]}

where ``counts[i]`` is the number of values in bucket ``offset + i``. Stores are dense: about
230 buckets per decade of magnitude, so a window whose values span 1e-6..1e9 holds ~3,500
counters per sign; the whole double range is the worst case at ~142,000.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable
from typing import Any, Final

__all__ = [
    "ALPHA",
    "Sketch",
    "add",
    "count",
    "interpolate",
    "merge",
    "new",
    "of",
    "quantile",
    "valid_count",
]

Sketch = dict[str, Any]

ALPHA: Final = 0.005
_GAMMA: Final = (1 + ALPHA) / (1 - ALPHA)
_LN_GAMMA: Final = math.log(_GAMMA)
_INV_LN_GAMMA: Final = 1 / _LN_GAMMA
# gamma**k * this is the bucket's midpoint in relative terms: 2 * gamma**k / (gamma + 1).
_REPRESENTATIVE: Final = 2 / (_GAMMA + 1)
_MIN_INDEXABLE: Final = sys.float_info.min
_MAX_KEY: Final = math.ceil(math.log(sys.float_info.max) * _INV_LN_GAMMA) + 1


def new() -> Sketch:
    """An empty sketch."""
    return {"zero": 0, "pos": [0, []], "neg": [0, []]}


def of(values: Iterable[float]) -> Sketch:
    """A sketch of these values."""
    sketch = new()
    for value in values:
        add(sketch, value)
    return sketch


def add(sketch: Sketch, value: float) -> None:
    """Count one finite value."""
    if value >= _MIN_INDEXABLE:
        store = sketch["pos"]
        key = math.ceil(math.log(value) * _INV_LN_GAMMA)
    elif value <= -_MIN_INDEXABLE:
        store = sketch["neg"]
        key = math.ceil(math.log(-value) * _INV_LN_GAMMA)
    else:
        sketch["zero"] += 1
        return
    counts = store[1]
    index = key - store[0]
    if 0 <= index < len(counts):
        counts[index] += 1
    else:
        _widen(store, key, key)
        counts[key - store[0]] += 1


def merge(into: Sketch, other: Sketch) -> None:
    """Add ``other``'s counts to ``into``; ``other`` is not changed."""
    into["zero"] += other["zero"]
    for sign in ("pos", "neg"):
        offset, counts = other[sign]
        if not counts:
            continue
        store = into[sign]
        _widen(store, offset, offset + len(counts) - 1)
        target = store[1]
        shift = offset - store[0]
        for i, n in enumerate(counts):
            target[shift + i] += n


def count(sketch: Sketch) -> int:
    """Number of values counted."""
    total: int = sketch["zero"] + sum(sketch["pos"][1]) + sum(sketch["neg"][1])
    return total


def valid_count(sketch: Any) -> int | None:
    """The number of values in a decoded sketch, or None when it is not a well-formed one
    (a checkpoint is input too: wrong types must not fail later, at a quantile)."""
    if type(sketch) is not dict or type(sketch.get("zero")) is not int or sketch["zero"] < 0:
        return None
    total: int = sketch["zero"]
    for sign in ("pos", "neg"):
        store = sketch.get(sign)
        if type(store) is not list or len(store) != 2 or type(store[0]) is not int:
            return None
        counts = store[1]
        if type(counts) is not list or not all(type(n) is int and n >= 0 for n in counts):
            return None
        # keys beyond the double range have no value (the whole range is ~142,000 keys)
        if counts and not (store[0] >= -_MAX_KEY and store[0] + len(counts) <= _MAX_KEY):
            return None
        total += sum(counts)
    return total


def quantile(sketch: Sketch, q: float) -> float:
    """The ``q`` quantile (0 <= q <= 1) by linear interpolation between closest ranks.

    Ranks are exact, each order statistic is estimated within ``ALPHA`` relative, so the
    result is within ``ALPHA`` relative of the exact one unless the two neighbouring order
    statistics have opposite signs; then the error is at most ``ALPHA * max(|a|, |b|)``.
    Raises ``ValueError`` on an empty sketch.
    """
    n = count(sketch)
    if n == 0:
        raise ValueError("quantile of an empty sketch is undefined")
    h = (n - 1) * q
    lower = math.floor(h)
    fraction = h - lower
    a = _value_at_rank(sketch, lower)
    if fraction == 0.0 or lower + 1 >= n:
        return a
    return interpolate(a, _value_at_rank(sketch, lower + 1), fraction)


def interpolate(lower: float, upper: float, fraction: float) -> float:
    """``lower + fraction * (upper - lower)``, numpy's "linear" rule, safe from overflow."""
    difference = upper - lower
    if math.isinf(difference):  # only for values near the double limit
        return (1.0 - fraction) * lower + fraction * upper
    return lower + fraction * difference


def _widen(store: list[Any], low: int, high: int) -> None:
    """Make a store's dense counts cover keys ``low..high`` (in place, zeros for new keys)."""
    counts: list[int] = store[1]
    if not counts:
        store[0] = low
        counts.extend([0] * (high - low + 1))
        return
    if low < store[0]:
        counts[0:0] = [0] * (store[0] - low)
        store[0] = low
    missing = high - store[0] + 1 - len(counts)
    if missing > 0:
        counts.extend([0] * missing)


def _value_at_rank(sketch: Sketch, rank: int) -> float:
    """Estimate of the 0-based ``rank``-th smallest value."""
    seen = 0
    offset, counts = sketch["neg"]
    for i in range(len(counts) - 1, -1, -1):  # largest magnitude = most negative first
        seen += counts[i]
        if rank < seen:
            return -_bucket_value(offset + i)
    seen += sketch["zero"]
    if rank < seen:
        return 0.0
    offset, counts = sketch["pos"]
    for i, n in enumerate(counts):
        seen += n
        if rank < seen:
            return _bucket_value(offset + i)
    raise IndexError(f"rank {rank} is beyond the {seen} values in the sketch")


def _bucket_value(key: int) -> float:
    try:
        return math.exp(key * _LN_GAMMA) * _REPRESENTATIVE
    except OverflowError:  # the top bucket of the double range
        return sys.float_info.max
