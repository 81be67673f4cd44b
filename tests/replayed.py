"""What a replay test reads back: the PostgreSQL rows of a span of window starts."""

from __future__ import annotations

import asyncpg

Window = tuple[str, str, float]  # (name, agg_func, window_start)


async def rows_between(
    dsn: str, table: str, start: float, end: float
) -> dict[Window, tuple[float, int, int]]:
    """(value, count, revision) of every row of ``table`` whose window starts in
    ``[start, end)``."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT name, agg_func, extract(epoch FROM window_start)::float8 AS ws, value, "
            f"count, revision FROM {table} "
            "WHERE window_start >= to_timestamp($1) AND window_start < to_timestamp($2)",
            start,
            end,
        )
    finally:
        await conn.close()
    return {
        (r["name"], r["agg_func"], r["ws"]): (r["value"], r["count"], r["revision"]) for r in rows
    }
