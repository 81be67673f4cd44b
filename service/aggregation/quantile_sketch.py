"""The DDSketch of a percentile accumulator past :data:`PERCENTILE_EXACT_LIMIT` values, and
the DDSketch protobuf bytes every percentile aggregate carries (contract 12.5).

The sketch is DataDog's DDSketch (the ``ddsketch`` library): its ``LogarithmicMapping``
with relative accuracy :data:`ALPHA` maps a value ``|x| > min_possible`` to the key
``ceil(log2(|x|) * multiplier)``; positive and negative values have separate stores,
anything closer to zero is a plain count. Keys are computed here with the library's own
mapping constants, in bulk (a list comprehension is ~3.5x faster than the library's
per-value ``add``, see docs/sketches.md); tests check key for key that both agree.

The accumulator's state is plain JSON (orjson checkpoints it as is)::

    {"alpha": 0.01, "zero": int, "pos": [offset, counts], "neg": [offset, counts]}

``counts[i]`` counts the values of key ``offset + i``; counts are exact, so merging is
lossless and in any grouping gives the same bins. The ``alpha`` entry tells this layout
from the one of releases before 1.3 (no ``alpha``: a hand-written sketch with
``alpha = 0.005``, whose buckets :func:`from_v12` converts).

:func:`to_bytes` writes the library's protobuf message ``DDSketch`` (``ddsketch.proto``:
mapping with ``gamma``, ``indexOffset`` 0 and interpolation ``NONE``; contiguous bin
counts per store; ``zeroCount``), which ``DDSketchProto.from_proto`` reads back.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable
from typing import Any, Final

from ddsketch.mapping import LogarithmicMapping
from ddsketch.pb import ddsketch_pb2

__all__ = [
    "ALPHA",
    "GAMMA",
    "State",
    "add",
    "add_many",
    "count",
    "from_v12",
    "key_of",
    "merge",
    "new",
    "of",
    "quantile",
    "to_bytes",
    "valid_count",
    "valid_v12_count",
]

State = dict[str, Any]

pb: Any = ddsketch_pb2  # generated code: its message classes are made at import time

ALPHA: Final = 0.01
_MAPPING: Final = LogarithmicMapping(ALPHA)
GAMMA: Final[float] = _MAPPING.gamma
# The library's own constants: keys computed here must be the library's keys exactly.
_MULTIPLIER: Final[float] = _MAPPING._multiplier
_MIN_INDEXABLE: Final[float] = _MAPPING.min_possible
_REPRESENTATIVE: Final = 2.0 / (1.0 + GAMMA)
_log: Final = math.log
_ceil: Final = math.ceil
_MAX: Final = sys.float_info.max
# keys of the whole double range, with room: |log2| <= 1075 for finite non-zero doubles
_MAX_KEY: Final = math.ceil(1080 * _MULTIPLIER)


def key_of(magnitude: float) -> int:
    """The library's key of a value ``> min_possible`` (``LogarithmicMapping.key``)."""
    return math.ceil(math.log(magnitude, 2) * _MULTIPLIER)


def new() -> State:
    return {"alpha": ALPHA, "zero": 0, "pos": [0, []], "neg": [0, []]}


def of(values: Iterable[float]) -> State:
    """The sketch of these values, bins built in bulk."""
    state = new()
    add_many(state, values)
    return state


def add_many(state: State, values: Iterable[float]) -> None:
    """Count these finite values: the keys in one pass, then one count per key."""
    low = _MIN_INDEXABLE
    log = math.log
    ceil = math.ceil
    m = _MULTIPLIER
    pos: list[int] = []
    neg: list[int] = []
    zero = 0
    for v in values:
        if v > low:
            pos.append(ceil(log(v, 2) * m))
        elif v < -low:
            neg.append(ceil(log(-v, 2) * m))
        else:
            zero += 1
    state["zero"] += zero
    _count_keys(state["pos"], pos)
    _count_keys(state["neg"], neg)


def add(state: State, value: float) -> None:
    """Count one finite value."""
    # key_of inlined: this runs per event past the exact limit
    if value > _MIN_INDEXABLE:
        store = state["pos"]
        key = _ceil(_log(value, 2) * _MULTIPLIER)
    elif value < -_MIN_INDEXABLE:
        store = state["neg"]
        key = _ceil(_log(-value, 2) * _MULTIPLIER)
    else:
        state["zero"] += 1
        return
    index = key - store[0]
    counts = store[1]
    if 0 <= index < len(counts):
        counts[index] += 1
    else:
        _widen(store, key, key)
        counts[key - store[0]] += 1


def merge(into: State, other: State) -> None:
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


def count(state: State) -> int:
    total: int = state["zero"] + sum(state["pos"][1]) + sum(state["neg"][1])
    return total


def quantile(state: State, q: float) -> float:
    """The library's quantile (``BaseDDSketch.get_quantile_value``): the representative
    of the bin holding rank ``q * (count - 1)``, within ``ALPHA`` relative of that order
    statistic; finite (the top bin of the double range reports the largest double).
    Raises ``ValueError`` on an empty sketch."""
    n = count(state)
    if n == 0:
        raise ValueError("quantile of an empty sketch is undefined")
    rank = q * (n - 1)
    neg_offset, neg = state["neg"]
    neg_count = sum(neg)
    if rank < neg_count:
        wanted = neg_count - rank  # the library's key_at_rank(neg_count - rank - 1, lower=False)
        running = 0
        for i, c in enumerate(neg):
            running += c
            if running >= wanted:
                return -_value(neg_offset + i)
        return -_value(neg_offset + len(neg) - 1)
    if rank < neg_count + state["zero"]:
        return 0.0
    rank -= neg_count + state["zero"]
    offset, pos = state["pos"]
    running = 0
    for i, c in enumerate(pos):
        running += c
        if running > rank:
            return _value(offset + i)
    return _value(offset + len(pos) - 1)


def to_bytes(state: State) -> bytes:
    """The DDSketch protobuf message of this state."""
    message = pb.DDSketch(
        mapping=pb.IndexMapping(gamma=GAMMA, indexOffset=0.0, interpolation=pb.IndexMapping.NONE),
        positiveValues=_store_message(state["pos"]),
        negativeValues=_store_message(state["neg"]),
        zeroCount=float(state["zero"]),
    )
    data: bytes = message.SerializeToString()
    return data


def valid_count(state: Any) -> int | None:
    """The number of values in a decoded state of this layout, or None when it is not a
    well-formed one (a checkpoint is input too)."""
    if type(state) is not dict or state.get("alpha") != ALPHA:
        return None
    return _valid_stores(state, _MAX_KEY)


# -- the layout of releases before 1.3 ------------------------------------------------------

_V12_GAMMA: Final = 1.005 / 0.995
_V12_LN_GAMMA: Final = math.log(_V12_GAMMA)
_V12_REPRESENTATIVE: Final = 2 / (_V12_GAMMA + 1)
_V12_MAX_KEY: Final = math.ceil(math.log(_MAX) / _V12_LN_GAMMA) + 1


def valid_v12_count(state: Any) -> int | None:
    """As :func:`valid_count`, for a sketch checkpointed by a release before 1.3."""
    if type(state) is not dict or "alpha" in state:
        return None
    return _valid_stores(state, _V12_MAX_KEY)


def from_v12(old: State) -> State:
    """The sketch of a pre-1.3 state (``alpha = 0.005``, bucket ``k`` holding
    ``(g**(k-1), g**k]``): each bucket's count goes to the key of its representative
    value ``2 g**k / (g + 1)``. That representative is within 0.5 % of every value of its
    bucket, the new bin's within 1 % of the representative, so a converted sketch reports
    within ``(1.005 * 1.01) - 1 = 1.505 %`` (fresh ones: 1 %)."""
    state = new()
    state["zero"] = old["zero"]
    for sign in ("pos", "neg"):
        offset, counts = old[sign]
        target = state[sign]
        for i, n in enumerate(counts):
            if not n:
                continue
            value = _v12_value(offset + i)
            if value > _MIN_INDEXABLE:
                key = key_of(value)
                _widen(target, key, key)
                target[1][key - target[0]] += n
            else:
                state["zero"] += n
    return state


def _v12_value(key: int) -> float:
    try:
        return math.exp(key * _V12_LN_GAMMA) * _V12_REPRESENTATIVE
    except OverflowError:
        return _MAX


# -- internals -------------------------------------------------------------------------------


def _valid_stores(state: dict[str, Any], max_key: int) -> int | None:
    zero = state.get("zero")
    if type(zero) is not int or zero < 0:
        return None
    total: int = zero
    for sign in ("pos", "neg"):
        store = state.get(sign)
        if type(store) is not list or len(store) != 2 or type(store[0]) is not int:
            return None
        counts = store[1]
        if type(counts) is not list or not all(type(n) is int and n >= 0 for n in counts):
            return None
        # keys beyond the double range have no value
        if counts and not (store[0] >= -max_key and store[0] + len(counts) <= max_key):
            return None
        total += sum(counts)
    return total


def _value(key: int) -> float:
    """``LogarithmicMapping.value``; in the top bins ``2**x`` alone would overflow where the
    representative does not (the library raises there), so it is scaled down first, and
    a representative beyond the double range is the largest double (as in SQL)."""
    x = key / _MULTIPLIER
    if x < 1020.0:
        return math.pow(2.0, x) * _REPRESENTATIVE
    try:
        return min(math.pow(2.0, x - 8.0) * _REPRESENTATIVE, _MAX / 256.0) * 256.0
    except OverflowError:  # keys above the double range (a valid state may hold some)
        return _MAX


def _count_keys(store: list[Any], keys: list[int]) -> None:
    if not keys:
        return
    _widen(store, min(keys), max(keys))
    counts: list[int] = store[1]
    offset: int = store[0]
    for k in keys:
        counts[k - offset] += 1


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


def _store_message(store: list[Any]) -> Any:
    offset, counts = store
    if not counts:
        return pb.Store()
    # trim zero ends (a merged or widened store may have them): the message stays small
    low, high = 0, len(counts)
    while counts[low] == 0:
        low += 1
        if low == high:
            return pb.Store()
    while counts[high - 1] == 0:
        high -= 1
    return pb.Store(
        contiguousBinCounts=[float(n) for n in counts[low:high]],
        contiguousBinIndexOffset=offset + low,
    )
