"""``python -m service.dev.query`` against a real table: a rollup row shows its length,
a tagged series its tags, a corrected row its revision."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from service.dev.query import _show
from service.postgres.schema import migrate, quote_identifier


async def test_rows_show_window_length_tags_and_revision(
    postgres_dsn: str, unique_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    table = f"q_{unique_name}"
    await migrate(postgres_dsn, table, f"{table}_dl")
    start = datetime(2026, 12, 3, 9, 0, tzinfo=UTC)
    conn = await asyncpg.connect(postgres_dsn)
    try:
        await conn.executemany(
            f"INSERT INTO {quote_identifier(table)} (name, tags, agg_func, window_start, "
            "window_end, value, count, revision, emitted_at) "
            "VALUES ($1, $2::jsonb, $3, $4, $5, $6, $7, $8, now())",
            [
                ("cpu", '{"host": "a"}', "avg", start, start + timedelta(seconds=60), 1.5, 2, 3),
                ("cpu", "{}", "sum", start, start + timedelta(seconds=3600), 7.0, 9, 1),
            ],
        )
    finally:
        await conn.close()
    await _show(postgres_dsn, table)
    out = capsys.readouterr().out
    assert "2 aggregates stored" in out
    assert 'cpu {"host": "a"} avg' in out and "+60s" in out and "rev=3" in out
    assert "+3600s cpu sum" in out and "rev=1" in out
