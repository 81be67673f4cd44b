"""The routing rules as frozen values: what ``ROUTES_FILE`` says, already validated."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = ["DEFAULT_ROUTE", "Route", "Routes"]

DEFAULT_ROUTE: Final = "default"
"""The route of aggregates that no rule matches (no rule may take this name)."""


@dataclass(frozen=True, slots=True)
class Route:
    """One rule. ``match`` are globs on the event name (any may match); ``tags`` exact
    group-by tag values, as their stored text (``"true"``, ``"2"``); ``source`` the
    1-based position of a source in ``VABUS_URL``; ``outputs`` a subset of
    ``STORAGE_TYPE``; a ``None`` topic or table means the default one."""

    name: str
    match: tuple[str, ...]
    outputs: tuple[str, ...]
    source: int | None = None
    tags: tuple[tuple[str, str], ...] = ()
    postgres_table: str | None = None
    kafka_topic: str | None = None


@dataclass(frozen=True, slots=True)
class Routes:
    """The ordered rules of ``ROUTES_FILE`` (first match wins); empty: no file, every
    aggregate goes to every output's default destination, as without routing."""

    file: str | None = None
    rules: tuple[Route, ...] = ()
    sources: int = 1  # URLs in VABUS_URL

    def __bool__(self) -> bool:
        return bool(self.rules)

    @property
    def by_source(self) -> bool:
        """Whether events are marked with their source rule at intake: several sources
        and a rule with ``source`` (docs/routes.md, "Sources"). With one source a
        ``source: 1`` rule matches every event, like a rule without it."""
        return self.sources > 1 and any(r.source is not None for r in self.rules)

    def tables(self) -> tuple[str, ...]:
        """The rules' own PostgreSQL tables, each once, in rule order."""
        return tuple(dict.fromkeys(r.postgres_table for r in self.rules if r.postgres_table))

    def topics(self) -> tuple[str, ...]:
        """The rules' own Kafka topics, each once, in rule order."""
        return tuple(dict.fromkeys(r.kafka_topic for r in self.rules if r.kafka_topic))
