"""Reading and checking ``ROUTES_FILE`` before anything connects.

Every problem is collected, each naming the rule (its position and name), the key, the
value and the expected form, e.g. ``rule 2 "billing": outputs=['s3']: expected a
non-empty list of outputs of STORAGE_TYPE (kafka)``. The configuration loader turns
them into one ``ROUTES_FILE`` problem (exit 2).

Names, tables and topics are checked with the caller's parsers (the configuration's own
rules for ``POSTGRES_TABLE`` and ``KAFKA_TOPIC``), so both accept exactly the same names.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from fnmatch import translate
from pathlib import Path
from typing import Any, Final

from service.routes.rules import DEFAULT_ROUTE, Route, Routes

__all__ = ["RouteContext", "RoutesProblem", "parse_routes", "read_routes_file"]

_KEYS: Final = ("name", "match", "source", "tags", "outputs", "postgres_table", "kafka_topic")
_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_NAME_FORM: Final = (
    f"a unique rule name other than {DEFAULT_ROUTE!r} (1-63 of A-Z a-z 0-9 _ . -, "
    "starting alphanumeric)"
)
_GLOB_FORM: Final = (
    "a non-empty list of glob patterns on the event name (* ? [...]; each non-empty, "
    "printable, brackets closed)"
)
_TAG_FORM: Final = "an object of AGGREGATION_GROUP_BY keys to strings, numbers or booleans"
_OWN_TABLES: Final = "vabus_"  # checkpoints, ledger, leases: the service's own tables
_OWN_TOPICS: Final = "vabus-"  # the checkpoint and repartition topics of a group
_SHOWN: Final = 80  # characters of a bad value quoted in a message


class RoutesProblem(ValueError):
    """``ROUTES_FILE`` cannot be used: ``problems`` says why, one line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class RouteContext:
    """What the rules are checked against: the rest of the configuration."""

    outputs: tuple[str, ...]  # STORAGE_TYPE
    group_by: tuple[str, ...]  # AGGREGATION_GROUP_BY
    sources: int  # URLs in VABUS_URL
    table_ok: Callable[[str], object]  # raises ValueError for a bad table name
    topic_ok: Callable[[str], object]  # raises ValueError for a bad topic name
    reserved_tables: Collection[str] = ()  # dead letters, checkpoints: never a route's
    reserved_topics: Collection[str] = ()  # the dead-letter and bus topics
    default_table: str = ""  # POSTGRES_TABLE
    default_topic: str = ""  # KAFKA_TOPIC


def read_routes_file(path: str, ctx: RouteContext) -> Routes:
    """Read ``path`` (JSON, or YAML: a ``.json`` file is read as JSON, anything else
    with YAML's safe loader, which also reads JSON) and check it against ``ctx``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RoutesProblem([f"cannot read the file: {exc}"]) from exc
    # imported here: only a deployment with ROUTES_FILE pays for it at start-up
    import yaml  # type: ignore[import-untyped]  # PyYAML ships no types

    try:
        data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        kind = "JSON" if path.endswith(".json") else "YAML"
        raise RoutesProblem([f"not valid {kind}: {first}"]) from exc
    return Routes(file=path, rules=parse_routes(data, ctx), sources=ctx.sources)


def parse_routes(data: Any, ctx: RouteContext) -> tuple[Route, ...]:
    """The rules of a parsed file, or :class:`RoutesProblem` listing every problem."""
    if not isinstance(data, dict) or set(data) != {"routes"}:
        keys = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise RoutesProblem([f"top level {keys}: expected an object with one key, 'routes'"])
    rules = data["routes"]
    if not isinstance(rules, list) or not rules:
        raise RoutesProblem([f"routes={_show(rules)}: expected a non-empty list of rules"])
    problems: list[str] = []
    parsed: list[Route] = []
    positions: list[int] = []
    seen: dict[str, int] = {}
    for position, raw in enumerate(rules, start=1):
        rule = _Rule(position, raw, ctx, problems)
        route = rule.parse()
        name = raw.get("name") if isinstance(raw, dict) else None
        if isinstance(name, str) and name in seen:
            rule.fail("name", name, f"a name no other rule has (rule {seen[name]} has it)")
        elif isinstance(name, str):
            seen[name] = position
        if route is not None and not rule.failed:
            parsed.append(route)
            positions.append(position)
    if ctx.sources > 1:
        problems += _shared_destinations(parsed, positions, ctx)
    if problems:
        raise RoutesProblem(problems)
    return tuple(parsed)


class _Rule:
    """One rule being checked: each ``fail`` names it, its key and its value."""

    def __init__(self, position: int, raw: Any, ctx: RouteContext, problems: list[str]) -> None:
        self.position = position
        self.raw = raw
        self.ctx = ctx
        self.problems = problems
        name = raw.get("name") if isinstance(raw, dict) else None
        self.label = f"rule {position}" + (f" {name!r}" if isinstance(name, str) else "")
        self.failed = False

    def fail(self, key: str, value: Any, form: str) -> None:
        self.failed = True
        self.problems.append(f"{self.label}: {key}={_show(value)}: expected {form}")

    def parse(self) -> Route | None:
        raw = self.raw
        if not isinstance(raw, dict):
            self.fail("rule", raw, "an object with name, match and outputs")
            return None
        for key in raw:
            if key not in _KEYS:
                self.fail(str(key), raw[key], f"only the keys {', '.join(_KEYS)}")
        name = self._name(raw.get("name"))
        match = self._globs(raw.get("match"))
        outputs = self._outputs(raw.get("outputs"))
        source = self._source(raw.get("source"))
        tags = self._tags(raw.get("tags"))
        table = self._own("postgres_table", raw, outputs, self.ctx.table_ok)
        topic = self._own("kafka_topic", raw, outputs, self.ctx.topic_ok)
        if self.failed:
            return None
        return Route(name, match, outputs, source, tags, table, topic)

    def _name(self, value: Any) -> str:
        if not isinstance(value, str) or not _NAME.fullmatch(value) or value == DEFAULT_ROUTE:
            self.fail("name", value, _NAME_FORM)
            return ""
        return value

    def _globs(self, value: Any) -> tuple[str, ...]:
        if isinstance(value, str):
            value = [value]  # one pattern written without brackets
        if not isinstance(value, list) or not value:
            self.fail("match", value, _GLOB_FORM)
            return ()
        for pattern in value:
            if not _good_glob(pattern):
                self.fail("match", pattern, _GLOB_FORM)
        return tuple(value)

    def _outputs(self, value: Any) -> tuple[str, ...]:
        configured = self.ctx.outputs
        form = f"a non-empty list of outputs of STORAGE_TYPE ({', '.join(configured)})"
        if isinstance(value, str):
            value = [value]
        if (
            not isinstance(value, list)
            or not value
            or any(v not in configured for v in value)
            or len(set(value)) != len(value)
        ):
            self.fail("outputs", value, form)
            return ()
        return tuple(value)

    def _source(self, value: Any) -> int | None:
        if value is None:
            return None
        n = self.ctx.sources
        if type(value) is not int or not 1 <= value <= n:
            self.fail("source", value, f"the position of a source in VABUS_URL (1 to {n})")
            return None
        return value

    def _tags(self, value: Any) -> tuple[tuple[str, str], ...]:
        if value is None:
            return ()
        group_by = self.ctx.group_by
        form = f"{_TAG_FORM} ({', '.join(group_by) or 'AGGREGATION_GROUP_BY is empty'})"
        if not isinstance(value, dict) or not value:
            self.fail("tags", value, form)
            return ()
        items: list[tuple[str, str]] = []
        for key, tag in value.items():
            text = _tag_text(tag)
            if key not in group_by or text is None:
                self.fail(f"tags.{key}", tag, form)
            else:
                items.append((key, text))
        return tuple(sorted(items))

    def _own(
        self,
        key: str,
        raw: Mapping[str, Any],
        outputs: tuple[str, ...],
        ok: Callable[[str], object],
    ) -> str | None:
        value = raw.get(key)
        if value is None:
            return None
        output = key.split("_", 1)[0]
        reserved = self.ctx.reserved_tables if output == "postgres" else self.ctx.reserved_topics
        kind = "an SQL table name" if output == "postgres" else "a Kafka topic name"
        own = _OWN_TABLES if output == "postgres" else _OWN_TOPICS
        others = ", ".join([*sorted(reserved), f"{own}*"])
        form = f"{kind} other than {others}, with {output} in outputs"
        if (
            not isinstance(value, str)
            or value in reserved
            or (outputs and output not in outputs)  # () when outputs itself is wrong
            or (output == "postgres" and value.lower().startswith(_OWN_TABLES))
            or (output == "kafka" and value.startswith(_OWN_TOPICS))
        ):
            self.fail(key, value, form)
            return None
        try:
            ok(value)
        except ValueError:
            self.fail(key, value, form)
            return None
        return value


def _shared_destinations(routes: list[Route], positions: list[int], ctx: RouteContext) -> list[str]:
    """With several sources, a rule with ``source`` writes series of names that other
    sources may feed too (service.aggregation.source_marks): each of its outputs needs a
    table or topic of its own, which no other rule and not the default one writes, else
    two series of one name would meet in one destination (docs/routes.md, "Sources")."""
    problems: list[str] = []
    for route, position in zip(routes, positions, strict=True):
        if route.source is None:
            continue
        for output in route.outputs:
            key, default = (
                ("postgres_table", ctx.default_table)
                if output == "postgres"
                else ("kafka_topic", ctx.default_topic)
            )
            own = route.postgres_table if output == "postgres" else route.kafka_topic
            why = None
            if own is None or own == default:
                why = f"the default {default!r}"
            else:
                for other, at in zip(routes, positions, strict=True):
                    theirs = other.postgres_table if output == "postgres" else other.kafka_topic
                    if other is not route and output in other.outputs and theirs == own:
                        why = f"rule {at} {other.name!r}"
                        break
            if why is not None:
                problems.append(
                    f"rule {position} {route.name!r}: {key}={_show(own)}: expected a "
                    f"{key.split('_')[1]} of its own for a rule with source while VABUS_URL "
                    f"holds several sources (it would share {why}, mixing its series with "
                    "other sources' of the same names; docs/routes.md)"
                )
    return problems


def _good_glob(pattern: Any) -> bool:
    if not isinstance(pattern, str) or not pattern or not pattern.isprintable():
        return False
    try:
        re.compile(translate(pattern))
    except re.error:
        return False
    # fnmatch reads an unclosed '[' as a literal: almost surely a typo
    depth = 0
    for ch in pattern:
        if ch == "[":
            depth = 1
        elif ch == "]":
            depth = 0
    return depth == 0


def _tag_text(value: Any) -> str | None:
    """A tag value as the aggregator stores it (service.aggregation.series.tag_text)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    return None


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."
