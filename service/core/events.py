"""What the service emits (aggregates, dead letters, metrics) and the names they use.

Everything here is a frozen, slotted dataclass so that it is cheap, hashable where it
matters and cannot be changed behind a stage's back.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

__all__ = [
    "AGG_FUNCS",
    "REJECT_REASONS",
    "Aggregate",
    "DeadLetter",
    "Metric",
    "iso_utc",
]

AGG_FUNCS: Final = (
    "sum",
    "avg",
    "min",
    "max",
    "count",
    "first",
    "last",
    "stddev",
    "p50",
    "p90",
    "p95",
    "p99",
)

REJECT_REASONS: Final = (
    "invalid_json",
    "not_an_object",
    "missing_name",
    "invalid_name",
    "missing_value",
    "invalid_value",
    "missing_timestamp",
    "invalid_timestamp",
    "future_timestamp",
    "unknown_agg_func",
    "too_large",
    "late",
    "cardinality_limit",
    "invalid_tags",  # a group-by tag whose value is not a string (<= 200), number or boolean
    "invalid_origin",  # repartitioned input: a malformed vabus-origin header (internal topic)
    "overflow",
    "internal_error",
)


def iso_utc(ts: float) -> str:
    """Unix seconds -> ISO-8601 UTC with a trailing ``Z`` (millisecond precision)."""
    dt = datetime.fromtimestamp(ts, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


@dataclass(frozen=True, slots=True)
class Aggregate:
    """The result of one window for one series (name and tags) and agg_func.

    ``tags`` is None when ``AGGREGATION_GROUP_BY`` is empty (the Kafka value then has
    no ``tags`` field, as before v1.3), else the series' group-by tags (maybe empty).
    ``revision`` is 1 for the first emission, one more for each correction (§12.4).
    ``sketch`` is the DDSketch of a percentile aggregate (protobuf bytes), else None.
    ``route`` is None: a :class:`RoutedAggregate` carries one.
    """

    name: str
    agg_func: str
    value: float
    count: int
    window_start: float
    window_end: float
    emitted_at: float
    tags: Mapping[str, str] | None = None
    revision: int = 1
    sketch: bytes | None = None

    @property
    def route(self) -> str | None:
        """The source rule the series' events were marked with at intake (several
        sources, docs/routes.md "Sources"): only a :class:`RoutedAggregate` has one."""
        return None

    def to_json_obj(self) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "name": self.name,
            "agg_func": self.agg_func,
            "value": self.value,
            "count": self.count,
            "window_start": iso_utc(self.window_start),
            "window_end": iso_utc(self.window_end),
            "emitted_at": iso_utc(self.emitted_at),
            "revision": self.revision,
        }
        if self.tags is not None:
            obj["tags"] = dict(self.tags)
        if self.sketch is not None:
            obj["sketch"] = base64.b64encode(self.sketch).decode("ascii")
        return obj


@dataclass(frozen=True, slots=True)
class RoutedAggregate(Aggregate):
    """An aggregate of a series a source rule took at intake: ``route`` names the rule;
    it picks the destination and is written to no output. A class of its own so that
    every other aggregate is made exactly as before (a field more costs every one)."""

    route: str | None = None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An input the service could not aggregate, with the reason why.

    ``raw`` is the element's JSON text (or the undecodable message text, truncated).
    """

    raw: str
    reason: str
    detail: str
    source: str
    received_at: float

    def to_json_obj(self) -> dict[str, Any]:
        return {
            "raw": self.raw,
            "reason": self.reason,
            "detail": self.detail,
            "source": self.source,
            "received_at": iso_utc(self.received_at),
        }


@dataclass(frozen=True, slots=True)
class Metric:
    """One of the service's own metrics, as sent to the bus."""

    name: str
    value: float
    timestamp: float
    labels: dict[str, str] = field(default_factory=dict)

    def to_json_obj(self) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "name": self.name,
            "value": self.value if math.isfinite(self.value) else None,
            "timestamp": self.timestamp,
        }
        if self.labels:
            obj["labels"] = self.labels
        return obj
