"""``python -m service.dev.query DSN [TABLE]``: print the newest stored aggregates.

A convenience for the demo and for operators without psql at hand.
"""

from __future__ import annotations

import asyncio
import sys

import asyncpg

from service.postgres.schema import quote_identifier

__all__ = ["main"]


async def _show(dsn: str, table: str, limit: int = 20) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            f"SELECT name, tags::text AS tags, agg_func, window_start, window_end, value, "
            f"count, revision FROM {quote_identifier(table)} "
            f"ORDER BY window_start DESC, name LIMIT $1",
            limit,
        )
        total = await conn.fetchval(f"SELECT count(*) FROM {quote_identifier(table)}")
    finally:
        await conn.close()
    print(f"{total} aggregates stored; newest {len(rows)}:")
    for r in rows:
        print(f"  {_line(r)}")


def _line(r: asyncpg.Record) -> str:
    """One row: its window (start and length, so rollup rows stand out), series,
    function, value, count and revision (above 1 after corrections)."""
    length = (r["window_end"] - r["window_start"]).total_seconds()
    tags = "" if r["tags"] in (None, "{}") else f" {r['tags']}"
    return (
        f"{r['window_start']:%Y-%m-%d %H:%M:%S} +{length:g}s {r['name']}{tags} "
        f"{r['agg_func']:<6} value={r['value']:<14.6g} count={r['count']} rev={r['revision']}"
    )


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m service.dev.query DSN [TABLE]", file=sys.stderr)
        return 2
    asyncio.run(_show(argv[0], argv[1] if len(argv) > 1 else "aggregated_events"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
