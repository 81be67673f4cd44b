"""The dead letters of ``dlq replay`` in PostgreSQL: selecting them, marking them with
the ledger and the run in one transaction, the runs still to finish (docs/dlq.md)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Final

import orjson

from service.core.errors import PermanentError, TransientError
from service.dlq.base import DeadLetterRow, Marked, PendingRun, Redriven
from service.postgres.schema import DLQ_RUNS_TABLE, LEDGER_TABLE, dlq_replay_ddl, quote_identifier

__all__ = ["LEDGER_PARTITION", "PostgresDeadLetters", "lock", "prepare"]

LEDGER_PARTITION: Final = "dlq"


class PostgresDeadLetters:
    """:class:`~service.dlq.base.DeadLetterSource` of a dead-letter table, on one
    connection (which holds the command's lock)."""

    def __init__(
        self,
        conn: Any,
        table: str,
        namespace: str,
        interval_start: float,
        aggregate_tables: Sequence[str],
    ) -> None:
        self.conn, self.table = conn, table
        self.namespace, self.interval_start = namespace, interval_start
        self.aggregate_tables = aggregate_tables

    async def pending(self) -> list[PendingRun]:
        return await pending_runs(self.conn, self.table)

    async def select(self, reason: str, since: float | None) -> tuple[list[DeadLetterRow], int]:
        rows = await select(self.conn, self.table, reason, since)
        return rows, await count_replayed(self.conn, self.table, reason, since)

    async def mark(
        self,
        outcomes: Sequence[Marked],
        accepted: Sequence[Redriven],
    ) -> PendingRun | None:
        ids = [(int(row.key), outcome) for row, outcome, _ in outcomes]
        ledger: Counter[str] = Counter()
        for _, _, counts in outcomes:
            ledger.update(counts)
        run_id = await mark(
            self.conn, self.table, ids, ledger, self.namespace, self.interval_start, accepted
        )
        return None if run_id is None else PendingRun(run_id, list(accepted))

    async def finished(self, run: PendingRun) -> None:
        await finish_run(self.conn, run.ref)

    async def through(self, since: float) -> float:
        latest = -math.inf
        for t in self.aggregate_tables:
            got = await self.conn.fetchval(
                f"SELECT extract(epoch FROM max(window_end))::float8 FROM {quote_identifier(t)}"
            )
            if got is not None:
                latest = max(latest, float(got))
        return latest


async def prepare(conn: Any, table: str) -> None:
    """The columns and the runs table (as start-up and ``migrate`` add them); nothing
    to do, so no privilege needed, once they are there."""
    ready = await conn.fetchval(
        """SELECT to_regclass($1) IS NOT NULL AND (
               SELECT count(*) FROM pg_attribute WHERE attrelid = to_regclass($2)
               AND attname IN ('replayed_at', 'replay_outcome') AND NOT attisdropped) = 2""",
        DLQ_RUNS_TABLE,
        quote_identifier(table),
    )
    if ready:
        return
    if await conn.fetchval("SELECT to_regclass($1)", quote_identifier(table)) is None:
        raise PermanentError(
            f"table {table} does not exist: run `vabus-aggregator migrate` (or the service) first"
        )
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", 0x7661627573)  # schema.py's
        for stmt in dlq_replay_ddl(table):
            await conn.execute(stmt)


async def lock(conn: Any, table: str) -> bool:
    """One ``dlq replay`` per dead-letter table at a time (held with the connection)."""
    got: bool = await conn.fetchval(
        "SELECT pg_try_advisory_lock(hashtext($1))", f"vabus dlq replay {table}"
    )
    return got


async def select(conn: Any, table: str, reason: str, since: float | None) -> list[DeadLetterRow]:
    q = quote_identifier(table)
    rows = await conn.fetch(
        f"SELECT id, raw, reason, detail FROM {q} WHERE reason = $1 AND replayed_at IS NULL "
        "AND ($2::float8 IS NULL OR received_at >= to_timestamp($2)) ORDER BY id",
        reason,
        since,
    )
    return [
        DeadLetterRow(r["id"], r["raw"], r["reason"], r["detail"], str(r["id"]), str(r["id"] + 1))
        for r in rows
    ]


async def count_replayed(conn: Any, table: str, reason: str, since: float | None) -> int:
    q = quote_identifier(table)
    n: int = await conn.fetchval(
        f"SELECT count(*) FROM {q} WHERE reason = $1 AND replayed_at IS NOT NULL "
        "AND ($2::float8 IS NULL OR received_at >= to_timestamp($2))",
        reason,
        since,
    )
    return n


async def mark(
    conn: Any,
    table: str,
    outcomes: Sequence[tuple[int, str]],
    ledger: Mapping[str, int],
    namespace: str,
    interval_start: float,
    events: Sequence[Redriven],
) -> int | None:
    """In one transaction: each dead letter's ``replayed_at`` and outcome, the ledger's
    counters, and the run holding the accepted events (its id; None without any).
    Raises when a row was marked meanwhile (nothing is then written)."""
    q = quote_identifier(table)
    async with conn.transaction():
        done = await conn.execute(
            f"""UPDATE {q} d SET replayed_at = now(), replay_outcome = u.outcome
                FROM unnest($1::int8[], $2::text[]) AS u(id, outcome)
                WHERE d.id = u.id AND d.replayed_at IS NULL""",
            [i for i, _ in outcomes],
            [o for _, o in outcomes],
        )
        if int(done.split()[-1]) != len(outcomes):
            raise TransientError("dead letters were marked by another run meanwhile")
        counters = sorted(ledger)
        await conn.execute(
            f"""INSERT INTO {LEDGER_TABLE}
                    (namespace, partition, interval_start, counter, n, updated_at)
                SELECT $1, $2, to_timestamp($3), c, n, now()
                FROM unnest($4::text[], $5::int8[]) AS u(c, n)
                ON CONFLICT (namespace, partition, interval_start, counter) DO UPDATE SET
                    n = {LEDGER_TABLE}.n + EXCLUDED.n, updated_at = now()""",
            namespace,
            LEDGER_PARTITION,
            interval_start,
            counters,
            [ledger[c] for c in counters],
        )
        if not events:
            return None
        run_id: int = await conn.fetchval(
            f"INSERT INTO {DLQ_RUNS_TABLE} (dead_letter_table, events) VALUES ($1, $2::jsonb) "
            "RETURNING id",
            table,
            orjson.dumps([list(e) for e in events]).decode(),
        )
        return run_id


async def pending_runs(conn: Any, table: str) -> list[PendingRun]:
    rows = await conn.fetch(
        f"SELECT id, events::text AS events FROM {DLQ_RUNS_TABLE} "
        "WHERE dead_letter_table = $1 AND finished_at IS NULL ORDER BY id",
        table,
    )
    out = []
    for r in rows:
        events: list[Redriven] = [
            (start, end, [(e[0], e[1], float(e[2]), float(e[3]), e[4]) for e in evs])
            for start, end, evs in orjson.loads(r["events"])
        ]
        out.append(PendingRun(r["id"], events))
    return out


async def finish_run(conn: Any, run_id: int) -> None:
    await conn.execute(f"UPDATE {DLQ_RUNS_TABLE} SET finished_at = now() WHERE id = $1", run_id)
