"""Reading an archive back (tests): every Parquet file under a directory, as rows."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow.parquet as pq

__all__ = ["Row", "archive_files", "archive_rows"]

Row = tuple[str, str, float, int, str | None]
"""(name, agg_func, value, timestamp in microseconds, tags)"""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def archive_files(root: Path) -> list[Path]:
    """The data files a reader globbing ``**/*.parquet`` sees (no intents, no temporaries)."""
    return sorted(p for p in root.rglob("*.parquet") if not p.name.startswith("."))


def archive_rows(root: Path) -> Counter[Row]:
    """Every archived event, counted (a duplicate counts 2)."""
    rows: Counter[Row] = Counter()
    for path in archive_files(root):
        table = pq.read_table(path)
        hour = path.parent.name
        for r in table.to_pylist():
            ts = r["timestamp"]
            micros = (ts - _EPOCH) // timedelta(microseconds=1)
            assert hour == f"hour={ts:%Y-%m-%dT%H}", (path, ts)  # in its hour's directory
            rows[(r["name"], r["agg_func"], r["value"], micros, r["tags"])] += 1
    return rows
