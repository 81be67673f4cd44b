"""Source rules decided at intake, per event (several sources; docs/routes.md, "Sources").

A window of one name merges the events of every partition, so once several sources
feed one name its aggregate no longer tells which source an event came from. A rule
with ``source`` is therefore decided when an event is read, from its name, its group-by
tags and its source: an event whose first matching rule (among the rules without
``source`` and those of its own source) has a ``source`` gets its series marked with
that rule (:func:`service.aggregation.series.mark`), so that it is a series of its own
everywhere a series goes (windows, corrections, rollups, checkpoints) and its aggregate
carries the route. Every other event keeps its series, and the outputs route it by the
rules without ``source`` (:class:`service.routes.matching.Router`), which gives the same
route the first matching rule gave.

A batch is of one partition, a partition of one source (:mod:`service.bus.sources`):
the aggregator asks :meth:`SourceMarks.for_partition` once per batch, and only the
batches of a source that some rule names get a :class:`Marker`; no other event is
looked at.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final

from service.aggregation.series import mark, split
from service.bus.sources import source_of
from service.routes.matching import Compiled
from service.routes.rules import Routes

__all__ = ["Marker", "SourceMarks"]

_CACHE_LIMIT: Final = 100_000  # series remembered per source (cleared when full)


class Marker:
    """The series of one source's events, marked where a source rule takes them:
    ``marker(series)``. The decision is cached per series, since a stream repeats its
    series and the globs cost far more than a look-up."""

    __slots__ = ("_cache", "_rules", "known")

    def __init__(self, rules: Sequence[Compiled]) -> None:
        self._rules = tuple(rules)  # those without source and this source's, in order
        self._cache: dict[str, str] = {}
        # the decision for a series decided before, else None: a C call for the hot
        # path. Only checked names are ever decided (the decoders check them first).
        self.known: Callable[[str], str | None] = self._cache.get

    def __call__(self, series: str) -> str:
        got = self._cache.get(series)
        if got is not None:
            return got
        name, tags = split(series)
        rule = next((r for r in self._rules if r.matches(name, tags)), None)
        got = series if rule is None or rule.source is None else mark(series, rule.name)
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[series] = got
        return got


class SourceMarks:
    """A :class:`Marker` per source that some rule names (none with one source)."""

    __slots__ = ("_markers",)

    def __init__(self, routes: Routes) -> None:
        self._markers: dict[int, Marker] = {}
        if not routes.by_source:
            return
        compiled = [Compiled(r) for r in routes.rules]
        for k in sorted({r.source for r in routes.rules if r.source is not None}):
            self._markers[k] = Marker([r for r in compiled if r.source in (None, k)])

    def __bool__(self) -> bool:
        return bool(self._markers)

    def for_partition(self, partition: str) -> Marker | None:
        """The marker of the source ``partition`` belongs to; None when no rule names
        that source (its events keep their series)."""
        return self._markers.get(source_of(partition))
