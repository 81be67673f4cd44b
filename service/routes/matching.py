"""Which route an aggregate takes, and where each output then writes it.

A route is decided from the aggregate alone: its name and its group-by tags are in it.
With one source in ``VABUS_URL`` every event is from source 1, so a ``source`` rule is
decided here like any other. With several, the route of a source rule is decided per
event at intake (service.aggregation.source_marks) and the aggregate carries it
(``route``); an aggregate without one is routed by the other rules only
(docs/routes.md, "Sources").

The decision is cached per series: aggregates of one series repeat every window and
for every function, and the globs cost far more than a dict look-up. The cache is
bounded (cleared when full), so a stream of ever-new names cannot grow it forever.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from fnmatch import translate
from typing import Final, Literal

from service.core.events import Aggregate
from service.routes.rules import DEFAULT_ROUTE, Route, Routes

__all__ = ["DEFAULT_ROUTE", "Compiled", "Destined", "Router"]

_CACHE_LIMIT: Final = 100_000

Output = Literal["kafka", "postgres"]
Destined = tuple[str, str, list[Aggregate]]
"""(route name, destination: a topic or a table, the aggregates)."""


class Compiled:
    __slots__ = ("name", "outputs", "pattern", "source", "table", "tags", "topic")

    def __init__(self, route: Route) -> None:
        self.name = route.name
        self.source = route.source
        self.pattern = re.compile("|".join(f"(?:{translate(p)})" for p in route.match))
        self.tags = route.tags
        self.outputs = frozenset(route.outputs)
        self.table = route.postgres_table
        self.topic = route.kafka_topic

    def matches(self, name: str, tags: Mapping[str, str] | None) -> bool:
        if self.pattern.match(name) is None:
            return False
        if not self.tags:
            return True
        return tags is not None and all(tags.get(k) == v for k, v in self.tags)


class Router:
    """The rules of :class:`Routes` in order; ``split`` groups a batch per destination."""

    def __init__(
        self,
        routes: Routes,
        *,
        outputs: Sequence[str],
        kafka_topic: str,
        postgres_table: str,
    ) -> None:
        self.routes = routes
        self._outputs = tuple(outputs)
        self._rules = [Compiled(r) for r in routes.rules]
        self._by_tags = any(r.tags for r in self._rules)
        # several sources: a source rule routes only the aggregates marked with it
        self._by_source = routes.by_source
        self._plain = [
            (i, r) for i, r in enumerate(self._rules) if not self._by_source or r.source is None
        ]
        self._marked = {r.name: i for i, r in enumerate(self._rules) if r.source is not None}
        self._default = {"kafka": kafka_topic, "postgres": postgres_table}
        self._cache: dict[object, int] = {}

    def index_of(self, name: str, tags: Mapping[str, str] | None) -> int:
        """The position of the first rule matching, or -1 (the default route); with
        several sources the rules with ``source`` are left out (they take only the
        aggregates marked with them: :meth:`marked_index`)."""
        key: object = (name, tuple(sorted(tags.items()))) if self._by_tags and tags else name
        found = self._cache.get(key)
        if found is not None:
            return found
        found = next((i for i, r in self._plain if r.matches(name, tags)), -1)
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[key] = found
        return found

    def marked_index(self, route: str) -> int | None:
        """The position of the source rule an aggregate is marked with; None when no
        rule of that name has a source (the rules changed since a checkpoint kept the
        mark: such an aggregate is routed like an unmarked one)."""
        return self._marked.get(route) if self._by_source else None

    def route_of(self, a: Aggregate) -> str:
        i = None if a.route is None else self.marked_index(a.route)
        if i is None:
            i = self.index_of(a.name, a.tags)
        return DEFAULT_ROUTE if i < 0 else self._rules[i].name

    def split(self, aggregates: Sequence[Aggregate], output: Output) -> list[Destined]:
        """The aggregates ``output`` writes, grouped by route (in rule order, the
        default last) with the topic or table of each; a route whose outputs leave out
        ``output`` gets nothing there."""
        groups: dict[int, list[Aggregate]] = {}
        cache, index_of = self._cache, self.index_of
        by_name = not self._by_tags  # then the cache is keyed by name: look it up inline
        by_source, marked = self._by_source, self.marked_index
        for a in aggregates:
            i = cache.get(a.name) if by_name else None
            if by_source and a.route is not None:
                i = marked(a.route)
            if i is None:
                i = index_of(a.name, a.tags)
            group = groups.get(i)
            if group is None:
                groups[i] = [a]
            else:
                group.append(a)
        default = self._default[output]
        out: list[Destined] = []
        for i in sorted(groups, key=lambda i: len(self._rules) if i < 0 else i):
            if i < 0:
                out.append((DEFAULT_ROUTE, default, groups[i]))
                continue
            rule = self._rules[i]
            if output not in rule.outputs:
                continue
            own = rule.topic if output == "kafka" else rule.table
            out.append((rule.name, own or default, groups[i]))
        return out

    def destinations(self, output: Output) -> tuple[str, ...]:
        """Every topic or table ``output`` may write aggregates to, the default first."""
        own = (
            (r.topic if output == "kafka" else r.table) for r in self._rules if output in r.outputs
        )
        return tuple(dict.fromkeys([self._default[output], *(d for d in own if d)]))

    def describe(self) -> list[dict[str, object]]:
        """The rules for ``/status``: each with where each of its outputs writes."""
        rows: list[dict[str, object]] = []
        for rule, route in zip(self._rules, self.routes.rules, strict=True):
            where = {
                o: (rule.topic if o == "kafka" else rule.table) or self._default[o]
                for o in route.outputs
            }
            rows.append(
                {
                    "name": route.name,
                    "match": list(route.match),
                    "tags": dict(route.tags),
                    "source": route.source,
                    "writes_to": where,
                }
            )
        rows.append(
            {
                "name": DEFAULT_ROUTE,
                "match": ["*"],
                "tags": {},
                "source": None,
                "writes_to": {o: self._default[o] for o in self._outputs},
            }
        )
        return rows
