"""Where things go under ARCHIVE_URL: file names that derive from source positions.

``hour=2026-12-03T09/<partition>@<start>-<end>.parquet`` holds the accepted events of
one source partition read from positions ``[start, end)`` whose event time falls in
that hour (UTC). ``_intents/<partition>.json`` records, before any of them is written,
which files the partition's current slice is writing (see :mod:`.writer`). Readers that
glob ``**/*.parquet`` (duckdb, pyarrow datasets) never see intents or temporary files:
those start with ``_`` or ``.``.
"""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime
from typing import Final

__all__ = ["INTENTS", "data_name", "hour_dir", "intent_name", "token"]

INTENTS: Final = "_intents"
_PLAIN: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")


def token(text: str | None) -> str:
    """A file-name-safe form of a partition id or a position, one-to-one: plain text
    stays readable (Kafka offsets); anything else becomes ``~`` and a digest."""
    if text is None:
        return "origin"  # no position: the partition's beginning
    # ':' -> '_' (a Kafka partition "topic:3") stays one-to-one without '_' of its own
    safe = text.replace(":", "_")
    plain = "_" not in text and safe != "origin" and not safe.startswith(".")
    if plain and _PLAIN.fullmatch(safe):
        return safe
    return "~" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def hour_dir(hour: int) -> str:
    """``hour``: hours since the epoch."""
    at = datetime.fromtimestamp(hour * 3600, UTC)
    return f"hour={at:%Y-%m-%dT%H}"


def data_name(hour: int, partition: str, start: str | None, end: str | None) -> str:
    return f"{hour_dir(hour)}/{token(partition)}@{token(start)}-{token(end)}.parquet"


def intent_name(partition: str) -> str:
    return f"{INTENTS}/{token(partition)}.json"
