"""Which key each event of an input message gets on the internal topic: its name."""

from __future__ import annotations

from typing import Any, cast

import orjson

from service.aggregation.decode import Rejected, WireEvent, decode_fast, fast_ok, parse_event
from service.aggregation.series import TagRule, series_key

__all__ = ["Routed", "route"]

Routed = tuple[bytes, bytes, float | None]
"""(key, value, event time when the event is valid) of one record for the internal topic."""


def route(
    value: bytes | None, fallback: bytes, max_ts: float, tags: TagRule | None = None
) -> list[Routed]:
    """One record per event of one input message, in order. An object keeps its exact
    text; array elements are written one each; a message without a usable name goes
    whole, keyed by ``fallback`` (its input partition), to be dead-lettered downstream.
    The event time is given for the events the windowing stage will accept (``max_ts``:
    the latest acceptable one; ``tags``: AGGREGATION_GROUP_BY set, so their tags must
    be usable too), the only ones that move the input partition's progress. The key is
    the name: every series of a name is aggregated in one partition."""
    raw = value or b""
    try:  # the common case, one valid event, as the aggregator's own fast path reads it
        fast = decode_fast(raw) if tags is None else tags.decode(raw)
    except Exception:  # noqa: S110 - any refusal: the reference path below decides
        pass
    else:
        if (
            type(fast) is (WireEvent if tags is None else tags.wire)
            and fast_ok(fast, max_ts)
            and (tags is None or tags.fast_key(fast.name, fast.tags) is not None)  # type: ignore[attr-defined]
        ):
            return [(fast.name.encode(), raw, cast(float, fast.timestamp))]
    try:
        decoded = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return [(fallback, raw, None)]
    group_by = () if tags is None else tags.group_by
    if type(decoded) is list:
        return [
            (_key(e, fallback), orjson.dumps(e), _event_time(e, max_ts, group_by)) for e in decoded
        ]
    return [(_key(decoded, fallback), raw, _event_time(decoded, max_ts, group_by))]


def _key(event: Any, fallback: bytes) -> bytes:
    name = event.get("name") if type(event) is dict else None
    return name.encode("utf-8", "surrogatepass") if type(name) is str and name else fallback


def _event_time(event: Any, max_ts: float, group_by: tuple[str, ...]) -> float | None:
    try:
        name, _, _, ts = parse_event(event, max_ts)  # the windowing stage's own validation
        if group_by:
            series_key(name, event.get("tags"), group_by)
    except Rejected:
        return None
    return ts
