"""Series: a name split by its group-by tags (contract §12.3, docs/series.md).

Inside the aggregator a window key stays ``(series, agg_func)``: two strings. ``series``
is the event name when ``AGGREGATION_GROUP_BY`` is empty or the event carries none of
its keys, else ``name + "\\x1f" + canonical JSON of the group-by tags`` (sorted keys,
no spaces). A name cannot hold a control character (decode.name_fault), so the first
``"\\x1f"`` always ends the name. Only this module builds and splits the key; every
other module treats it as opaque.

A series of a source-routed event (a rule with ``source``, several sources in
``VABUS_URL``: docs/routes.md, "Sources") is *marked* with that rule's name:
``series + "\x1e" + rule name``. Neither a name nor the tags' JSON (which escapes
control characters) can hold ``"\x1e"``, so the first one ends the unmarked series;
the mark keeps that series apart from the same name's events of other sources in every
window, kept window, rollup and checkpoint, and tells the outputs its route.

The series budget (``AGGREGATION_MAX_SERIES_PER_NAME``) counts distinct tag sets per
partition, window and name; a tag set beyond it is aggregated into the name's overflow
series (every group-by key -> ``"__overflow__"``), which is not counted against it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, Final

import orjson
from msgspec import UNSET
from msgspec.structs import astuple

from service.aggregation.decode import (
    MAX_TAG_LENGTH,
    Rejected,
    name_fault,
    tag_fault,
    tagged_decoder,
)

__all__ = [
    "OVERFLOW",
    "ROUTE_SEP",
    "SEP",
    "SeriesBudget",
    "TagRule",
    "fast_series",
    "is_overflow",
    "is_plain",
    "mark",
    "name_of",
    "overflow_of",
    "overflow_series",
    "route_of",
    "series_key",
    "split",
    "split_route",
    "tag_text",
    "unmarked",
    "valid_series",
]

SEP: Final = "\x1f"
ROUTE_SEP: Final = "\x1e"  # before a source rule's name (docs/routes.md, "Sources")
OVERFLOW: Final = "__overflow__"
_SORTED: Final = orjson.OPT_SORT_KEYS
_INT64: Final = 2**63


def tag_text(value: Any) -> str:
    """A group-by tag value as stored: a string as it is, a number or a boolean as its
    JSON text (``true``, ``2``, ``1.5``); raises :class:`Rejected` (``invalid_tags``)."""
    kind = type(value)
    if kind is str:
        if len(value) > MAX_TAG_LENGTH:
            raise Rejected("invalid_tags", f"a tag value is longer than {MAX_TAG_LENGTH}")
        fault = tag_fault(value)
        if fault is not None:
            raise Rejected("invalid_tags", fault)
        return value  # type: ignore[no-any-return]
    if kind is bool:
        return "true" if value else "false"
    if kind is int:
        text = str(value)
    elif kind is float and math.isfinite(value):
        text = repr(value)
    else:
        what = "a non-finite number" if kind is float else kind.__name__
        raise Rejected(
            "invalid_tags", f"a tag value must be a string, a number or a boolean, not {what}"
        )
    if len(text) > MAX_TAG_LENGTH:
        raise Rejected("invalid_tags", f"a tag value is longer than {MAX_TAG_LENGTH}")
    return text


def series_key(name: str, tags: Any, group_by: tuple[str, ...]) -> str:
    """The series of an event named ``name`` carrying ``tags`` (the event's field, maybe
    absent: None); raises :class:`Rejected` (``invalid_tags``) when it is not an object
    or a group-by value is not usable. Other keys of ``tags`` are ignored."""
    if tags is None:
        return name
    if type(tags) is not dict:
        raise Rejected("invalid_tags", f"'tags' must be a JSON object, not {type(tags).__name__}")
    picked = {k: tag_text(tags[k]) for k in group_by if k in tags}
    if not picked:
        return name
    return name + SEP + orjson.dumps(picked, option=_SORTED).decode()


def fast_series(name: str, values: tuple[Any, ...], group_by: tuple[str, ...]) -> str | None:
    """:func:`series_key` for the fast path, from the group-by values msgspec decoded
    (``UNSET`` where absent): None where the reference decoder might read them
    differently (an integer beyond 64 bits, which orjson reads as a float) or refuses
    them; it then decides. The name is not checked."""
    tags = {}
    for k, v in zip(group_by, values, strict=True):
        if v is UNSET:
            continue
        if type(v) is int and not -_INT64 <= v < _INT64:
            return None
        tags[k] = v
    try:
        return series_key(name, tags, group_by)
    except Rejected:
        return None


def mark(series: str, route: str) -> str:
    """``series`` marked as an event of the source rule ``route`` (a rule name)."""
    return series + ROUTE_SEP + route


def route_of(series: str) -> str | None:
    """The source rule a series is marked with, or None."""
    _, sep, route = series.partition(ROUTE_SEP)
    return route if sep else None


def unmarked(series: str) -> str:
    """``series`` without its mark (the same object when it has none)."""
    return series.partition(ROUTE_SEP)[0] if ROUTE_SEP in series else series


def is_plain(series: str) -> bool:
    """Whether ``series`` is only a name: no tags, no mark."""
    return SEP not in series and ROUTE_SEP not in series


def name_of(series: str) -> str:
    name = series.partition(SEP)[0]
    return name.partition(ROUTE_SEP)[0] if ROUTE_SEP in name else name


def split(series: str) -> tuple[str, dict[str, str]]:
    """``series`` -> (name, group-by tags); ``{}`` for a series without tags. A mark
    is left out (:func:`split_route`)."""
    name, sep, tags = unmarked(series).partition(SEP)
    return name, (orjson.loads(tags) if sep else {})


def split_route(series: str) -> tuple[str, dict[str, str] | None, str | None]:
    """``series`` -> (name, group-by tags or None for none, route mark or None)."""
    base, marked, route = series.partition(ROUTE_SEP)
    name, sep, tags = base.partition(SEP)
    return name, (orjson.loads(tags) if sep else None), (route if marked else None)


def valid_series(series: str) -> bool:
    """Whether a series key read from a checkpoint splits into a name, string tags (if
    it has a tag separator) and a rule name (if it has a mark)."""
    base, marked, route = series.partition(ROUTE_SEP)
    if marked and (not route or not route.isprintable()):
        return False
    if SEP not in base:
        return bool(base) and name_fault(base) is None
    try:
        name, tags = split(base)
    except orjson.JSONDecodeError:
        return False
    return (
        bool(name)
        and type(tags) is dict
        and bool(tags)
        and all(type(v) is str for v in tags.values())
    )


def overflow_series(name: str, group_by: tuple[str, ...]) -> str:
    return name + SEP + orjson.dumps(dict.fromkeys(group_by, OVERFLOW), option=_SORTED).decode()


def overflow_of(series: str, group_by: tuple[str, ...]) -> str:
    """The overflow series of ``series``'s name, with ``series``'s mark: a source
    rule's events overflow into a series of their own route."""
    over = overflow_series(name_of(series), group_by)
    route = route_of(series)
    return over if route is None else mark(over, route)


def is_overflow(series: str) -> bool:
    _, sep, tags = unmarked(series).partition(SEP)
    return bool(sep) and all(v == OVERFLOW for v in orjson.loads(tags).values())


_KEYS_KEPT: Final = 100_000  # series keys remembered by TagRule.fast_key


class TagRule:
    """What a run needs when ``AGGREGATION_GROUP_BY`` is set: the fast decoder of its
    group-by keys, and the series keys of recent events (one per aggregator): making a
    key costs more than the rest of an event's hot path, and a stream repeats its
    series."""

    __slots__ = ("_keys", "decode", "group_by", "max_series", "wire")

    def __init__(self, group_by: tuple[str, ...], max_series: int) -> None:
        self.group_by = group_by
        self.max_series = max_series  # AGGREGATION_MAX_SERIES_PER_NAME
        self.wire, self.decode = tagged_decoder(group_by)
        # (name, group-by values) -> series key, for events whose group-by values are
        # all strings or absent (a number or a boolean may equal another of a different
        # text: 1 == 1.0 == True)
        self._keys: dict[tuple[str, tuple[Any, ...]], str] = {}

    def fast_key(self, name: str, tags: Any) -> str | None:
        """The series key of a fast-decoded event (``tags``: its group-by struct or
        None) whose name is checked here too; None when the reference decoder must
        decide."""
        if tags is None:
            return name if name.isprintable() or name_fault(name) is None else None
        probe = (name, astuple(tags))
        try:
            key = self._keys.get(probe)
        except TypeError:  # an unhashable value (refused below)
            key = None
        if key is not None:
            return key
        if not name.isprintable() and name_fault(name) is not None:
            return None
        values = probe[1]
        key = fast_series(name, values, self.group_by)
        if key is not None and all(type(v) is str or v is UNSET for v in values):
            if len(self._keys) >= _KEYS_KEPT:
                self._keys.clear()  # a stream of ever new series: start over
            self._keys[probe] = key
        return key


class SeriesBudget:
    """A partition's tag sets open per window start and name, for the budget: derived
    from its windows (restored ones too), never checkpointed. Deterministic under
    replay: the first tag sets in partition order get the places."""

    __slots__ = ("sets",)

    def __init__(self) -> None:
        self.sets: dict[float, dict[str, set[str]]] = {}

    @classmethod
    def of(cls, windows: Mapping[float, Iterable[tuple[str, str]]]) -> SeriesBudget:
        """The budget state of ``windows`` (start -> keys)."""
        budget = cls()
        for start, keys in windows.items():
            by_name: dict[str, set[str]] = {}
            for series, _ in keys:
                if not is_overflow(series):
                    by_name.setdefault(name_of(series), set()).add(series)
            budget.sets[start] = by_name
        return budget

    def admit(self, start: float, series: str, limit: int, group_by: tuple[str, ...]) -> str:
        """The series an event of ``series`` goes to in the window at ``start``: its
        own (the same object), or its name's overflow series when the name's budget
        there is spent (:meth:`record` counts a series once its key is open). An
        overflow series never counts against the budget."""
        by_name = self.sets.get(start)
        name = name_of(series)
        open_sets = None if by_name is None else by_name.get(name)
        if open_sets is None or series in open_sets or len(open_sets) < limit:
            return series
        if OVERFLOW in series and is_overflow(series):
            return series
        return overflow_of(series, group_by)

    def record(self, start: float, series: str) -> None:
        """A key of ``series`` was opened in the window at ``start``."""
        if OVERFLOW in series and is_overflow(series):
            return
        by_name = self.sets.get(start)
        if by_name is None:
            by_name = self.sets[start] = {}
        name = name_of(series)
        open_sets = by_name.get(name)
        if open_sets is None:
            open_sets = by_name[name] = set()
        open_sets.add(series)

    def forget(self, start: float) -> None:
        """The window at ``start`` left the partition (emitted)."""
        self.sets.pop(start, None)

    def open_series(self) -> int:
        return sum(len(s) for by_name in self.sets.values() for s in by_name.values())
