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
            f"SELECT name, agg_func, window_start, window_end, value, count "
            f"FROM {quote_identifier(table)} ORDER BY window_start DESC, name LIMIT $1",
            limit,
        )
        total = await conn.fetchval(f"SELECT count(*) FROM {quote_identifier(table)}")
    finally:
        await conn.close()
    print(f"{total} aggregates stored; newest {len(rows)}:")
    for r in rows:
        print(
            f"  {r['window_start']:%Y-%m-%d %H:%M:%S} {r['name']:<16} {r['agg_func']:<6} "
            f"value={r['value']:<14.6g} count={r['count']}"
        )


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m service.dev.query DSN [TABLE]", file=sys.stderr)
        return 2
    asyncio.run(_show(argv[0], argv[1] if len(argv) > 1 else "aggregated_events"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
