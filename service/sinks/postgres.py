"""PostgresSink: idempotent multi-row upserts of aggregates, plus the dead-letter table.

With ``ROUTES_FILE`` (docs/routes.md) each aggregate is upserted into its route's own
table (created like ``POSTGRES_TABLE``), or not here at all; every table of one write,
and the checkpoint that follows it, commit in the same transaction.

A write is one transaction. Aggregates are de-duplicated by key in Python (the highest
revision wins) and upserted with ``INSERT ... SELECT FROM unnest(...) ON CONFLICT DO
UPDATE`` in chunks, so a batch holding one key twice never hits "ON CONFLICT DO UPDATE
command cannot affect row a second time".

Revision guard: a stored row is replaced only by a higher ``(revision, count,
emitted_at)`` (``DO UPDATE ... WHERE (t.revision, t.count, t.emitted_at) <
(EXCLUDED.revision, ...)``): a correction (``revision`` + 1) replaces its window, a stale
replay of an older revision never does, and an exact duplicate costs no row version.
Within one revision more events means newer (a replay that decided differently about an
event far behind its partition) and equal counts are ordered by emission time.

A series is ``(name, tags)``: ``tags`` is a ``jsonb`` column of the primary key,
``'{}'`` for an aggregate without tags; ``sketch`` is ``bytea`` (NULL but for
percentiles).

Dead letters are stored once: each one whose source names where it was read (a Kafka
message: ``topic/partition offset=N``; an HTTP batch: its request cursor) gets a
``dedup_key``, a digest of the input (the checkpoint namespace), that source, the
reason, the raw text and its ordinal among identical ones in the write, and is inserted
``ON CONFLICT (dedup_key) DO NOTHING``; a replay after ``kill -9``, a takeover or a
redelivery computes the same keys. See
:func:`dead_letter_keys` for which dead letters get no key.

Errors by SQLSTATE class (see :func:`service.postgres.errors.pg_error_kind`): connection,
transaction-rollback and resource classes are :class:`TransientError` (the sender
retries); a chunk that PostgreSQL refuses for its data (class 22/23, or 54000: a row too
large for the primary key) is bisected under savepoints until the bad rows are found,
each becomes a dead letter with reason ``invalid_value`` and everything else is stored;
schema and permission errors (42) are a :class:`PermanentError` whose message says what
the operator must do.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, TypeVar

import asyncpg
import orjson

from service.config import PostgresConfig
from service.core.clock import Clock
from service.core.errors import PermanentError, TransientError
from service.core.events import Aggregate, DeadLetter
from service.core.lifecycle import AsyncResource
from service.lease.fence import FencedError, KeepAliveConnection, LeaseFence, keep_alive
from service.metrics.collector import MetricsCollector
from service.postgres.errors import pg_error, pg_error_kind
from service.postgres.schema import TableNames, ensure_schema
from service.postgres.text import json_text
from service.postgres.text import storable_text as _storable_text
from service.routes.matching import Router

__all__ = ["PostgresSink", "SinkStatements", "dead_letter_keys", "write_batch"]

log = logging.getLogger(__name__)

CHUNK_ROWS: Final = 10_000
_SCHEMA_HINT: Final = (
    "run `vabus-aggregator migrate` with a user that may create them, and grant the "
    "service's user SELECT, INSERT, UPDATE on them (and USAGE on the dead-letter id sequence)"
)
_AggKey = tuple[str, str, str, float, float]  # name, tags JSON, agg_func, window
T = TypeVar("T")


class SinkStatements:
    """The SQL of one sink, built once from validated table names. ``dedup_scope`` names
    the input (the checkpoint namespace) in every dead letter's key: two buses sharing
    the table may use the same cursors or topic names."""

    def __init__(self, tables: TableNames, dedup_scope: str = "") -> None:
        self.tables = tables
        self.dedup_scope = dedup_scope
        self.aggregates_label = tables.aggregates.replace('"', "")  # for messages, unquoted
        # Times travel as epoch float8 and become timestamptz in the server: cheaper
        # than building datetimes in Python, and out-of-range values fail per row (22008)
        # where bisection can isolate them.
        self.upsert = f"""
            INSERT INTO {tables.aggregates} AS t
                (name, tags, agg_func, window_start, window_end, value, count, emitted_at,
                 revision, sketch, updated_at)
            SELECT n, tg::jsonb, f, to_timestamp(ws), to_timestamp(we), v, c,
                   to_timestamp(ea), r, sk, now()
            FROM unnest($1::text[], $2::text[], $3::text[], $4::float8[], $5::float8[],
                        $6::float8[], $7::int8[], $8::float8[], $9::int8[], $10::bytea[])
                 AS u(n, tg, f, ws, we, v, c, ea, r, sk)
            ON CONFLICT (name, agg_func, window_start, window_end, tags) DO UPDATE SET
                value = EXCLUDED.value,
                count = EXCLUDED.count,
                emitted_at = EXCLUDED.emitted_at,
                revision = EXCLUDED.revision,
                sketch = EXCLUDED.sketch,
                updated_at = now()
            WHERE (t.revision, t.count, t.emitted_at)
                < (EXCLUDED.revision, EXCLUDED.count, EXCLUDED.emitted_at)"""
        self.insert_dead_letters = f"""
            INSERT INTO {tables.dead_letters}
                (raw, reason, detail, source, received_at, dedup_key)
            SELECT r, re, d, s, to_timestamp(ra), k
            FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::float8[],
                        $6::text[]) AS u(r, re, d, s, ra, k)
            ON CONFLICT (dedup_key) DO NOTHING"""


def _tags_text(a: Aggregate) -> str:
    """The series' tags as JSON text for the ``jsonb`` cast, keys sorted so that equal
    tags are equal text (the in-batch de-dup compares it); no tags is ``{}``."""
    if not a.tags:
        return "{}"
    tags = dict(a.tags)
    try:
        return orjson.dumps(tags, option=orjson.OPT_SORT_KEYS).decode()
    except TypeError:  # a lone surrogate: escaped, for PostgreSQL to refuse row by row
        return json.dumps(tags, sort_keys=True)


def _dedupe(aggregates: Sequence[Aggregate]) -> list[tuple[Aggregate, str]]:
    """One aggregate per primary key, with its tags' JSON text: the highest
    ``(revision, count, emitted_at)``, the last one given among equals."""
    latest: dict[_AggKey, tuple[Aggregate, str]] = {}
    for a in aggregates:
        tags = _tags_text(a)
        key = (a.name, tags, a.agg_func, a.window_start, a.window_end)
        seen = latest.get(key)
        if seen is None or _rank(seen[0]) <= _rank(a):
            latest[key] = (a, tags)
    return list(latest.values())


def _rank(a: Aggregate) -> tuple[int, int, float]:
    return a.revision, a.count, a.emitted_at


async def _upsert(conn: Any, sql: SinkStatements, rows: Sequence[tuple[Aggregate, str]]) -> None:
    await conn.execute(
        sql.upsert,
        [a.name for a, _ in rows],
        [t for _, t in rows],
        [a.agg_func for a, _ in rows],
        [a.window_start for a, _ in rows],
        [a.window_end for a, _ in rows],
        [a.value for a, _ in rows],
        [a.count for a, _ in rows],
        [a.emitted_at for a, _ in rows],
        [a.revision for a, _ in rows],
        [a.sketch for a, _ in rows],
    )


def _positioned(source: str) -> bool:
    """Whether ``source`` says where its dead letter was read, the same at every replay:
    a Kafka offset (as the Kafka sink's read-back tells dead letters apart), or the
    cursor an HTTP batch was asked for (not the first request's ``none``)."""
    return " offset=" in source or ("cursor=" in source and not source.endswith("cursor=none"))


def dead_letter_keys(rows: Sequence[DeadLetter], scope: str = "") -> list[str | None]:
    """The ``dedup_key`` of each dead letter: None where the source names no position
    (the sinks' own, a demo stream), since identical text there may be a new input.

    The ordinal tells apart identical rejects of one message (a JSON array holding the
    same bad element twice). Limits: an HTTP replay whose answers are cut at other
    places than the first run's (it was caught up then, it catches up now) files some
    dead letters under another request cursor, which stores them again; and identical
    rejects of one message split across two writes share an ordinal, storing one.
    """
    seen: Counter[tuple[str, str, str]] = Counter()
    keys: list[str | None] = []
    for d in rows:
        if not _positioned(d.source):
            keys.append(None)
            continue
        ident = (d.source, d.reason, d.raw)
        n = seen[ident]
        seen[ident] = n + 1
        text = repr((scope, *ident, n)).encode("utf-8", "surrogatepass")
        keys.append(hashlib.blake2b(text, digest_size=16).hexdigest())
    return keys


async def _insert_dead_letters(
    conn: Any, sql: SinkStatements, rows: Sequence[tuple[DeadLetter, str | None]]
) -> None:
    await conn.execute(
        sql.insert_dead_letters,
        [_storable_text(d.raw) for d, _ in rows],
        [_storable_text(d.reason) for d, _ in rows],
        [_storable_text(d.detail) for d, _ in rows],
        [_storable_text(d.source) for d, _ in rows],
        [d.received_at for d, _ in rows],
        [k for _, k in rows],
    )


def _refused_for_its_data(exc: Exception) -> bool:
    """A data error (22/23), or a row too large for an index (54000: a long name and
    long tag values in the primary key), which only that row's values cause."""
    return pg_error_kind(exc) == "data" or getattr(exc, "sqlstate", None) == "54000"


async def _store_isolating(
    conn: Any,
    rows: Sequence[T],
    store: Callable[[Sequence[T]], Awaitable[None]],
) -> list[tuple[T, Exception]]:
    """Store ``rows`` in chunks; return the rows PostgreSQL refused for their data.

    Each attempt runs under a savepoint so that a refused statement does not abort the
    enclosing transaction. Non-data errors propagate unchanged.
    """
    refused: list[tuple[T, Exception]] = []
    # A stack popped from the end: chunks are reversed so that rows go in in order.
    pending = [rows[i : i + CHUNK_ROWS] for i in range(0, len(rows), CHUNK_ROWS)][::-1]
    while pending:
        chunk = pending.pop()
        try:
            async with conn.transaction():
                await store(chunk)
        except Exception as exc:
            if not _refused_for_its_data(exc):
                raise
            if len(chunk) == 1:
                refused.append((chunk[0], exc))
            else:
                mid = len(chunk) // 2
                pending += [chunk[mid:], chunk[:mid]]
    return refused


async def write_batch(
    conn: Any,
    sql: SinkStatements,
    aggregates: Sequence[Aggregate],
    dead_letters: Sequence[DeadLetter],
    now: float,
) -> list[DeadLetter]:
    """Store one batch inside the caller's open transaction.

    Returns the dead letters created for aggregates PostgreSQL refused (already stored
    in the dead-letter table). Kept apart from connection handling so that a caller can
    add more rows (e.g. checkpoints) to the same transaction.
    """
    refused = await _store_isolating(
        conn, _dedupe(aggregates), lambda rows: _upsert(conn, sql, rows)
    )
    created = [
        DeadLetter(
            raw=json_text(agg.to_json_obj()),  # a name PostgreSQL refused may not be UTF-8
            reason="invalid_value",
            detail=f"PostgreSQL refused the aggregate (SQLSTATE {_exc_state(exc)}): {exc}",
            source=f"sink:postgres:{sql.aggregates_label}",
            received_at=now,
        )
        for (agg, _), exc in refused
    ]
    letters = [*dead_letters, *created]
    unstorable = await _store_isolating(
        conn,
        list(zip(letters, dead_letter_keys(letters, sql.dedup_scope), strict=True)),
        lambda rows: _insert_dead_letters(conn, sql, rows),
    )
    for (dl, _), exc in unstorable:
        # Nothing further downstream can hold it: say so loudly rather than block the sink.
        log.error("dropping a dead letter PostgreSQL refuses (%s): %r", exc, dl)
    return created


def _exc_state(exc: BaseException) -> str:
    return str(getattr(exc, "sqlstate", "?"))


class PostgresSink(AsyncResource):
    """Aggregates and dead letters into PostgreSQL through an asyncpg pool.

    ``start`` creates the pool and runs the migration; it raises
    :class:`TransientError` while the server is unreachable. The pool outlives server
    restarts: writes fail with :class:`TransientError` while it is down and succeed
    again once it is back.
    """

    name = "postgres"

    def __init__(
        self,
        cfg: PostgresConfig,
        metrics: MetricsCollector,
        clock: Clock,
        *,
        connect_timeout_s: float = 10.0,
        command_timeout_s: float = 60.0,
        check_timeout_s: float = 3.0,
        fence: LeaseFence | None = None,
        dedup_scope: str = "",
        router: Router | None = None,
    ) -> None:
        self._cfg = cfg
        self._fence = fence  # a leased bus's: rows commit only while the epoch is ours
        self._metrics = metrics
        self._clock = clock
        tables = TableNames.of(cfg.table, cfg.dead_letter_table)
        self._sql = SinkStatements(tables, dedup_scope)
        # ROUTES_FILE: aggregates go to their route's table (or nowhere here), all of one
        # write in its one transaction; None: all to POSTGRES_TABLE, as without routing
        self._router = router
        self._routed_sql = {
            t: SinkStatements(TableNames.of(t, cfg.dead_letter_table), dedup_scope)
            for t in (router.destinations("postgres") if router else ())
            if t != cfg.table
        }
        self._connect_timeout_s = connect_timeout_s
        self._command_timeout_s = command_timeout_s
        self._check_timeout_s = check_timeout_s
        self._pool: Any = None

    @property
    def pool(self) -> Any:
        """The started asyncpg pool (the sink's own; the checkpoint store has its own pool)."""
        if self._pool is None:
            raise RuntimeError("PostgresSink is not started")
        return self._pool

    async def start(self) -> None:
        if self._pool is not None:
            return
        try:
            pool = await asyncpg.create_pool(
                self._cfg.dsn.value,
                min_size=self._cfg.pool_min_size,
                max_size=self._cfg.pool_max_size,
                timeout=self._connect_timeout_s,
                command_timeout=self._command_timeout_s,
                init=keep_alive,
                connection_class=KeepAliveConnection,  # a vanished writer's locks go soon
            )
        except Exception as exc:
            raise pg_error(exc, "output start") from exc
        try:
            async with pool.acquire(timeout=self._connect_timeout_s) as conn:
                await ensure_schema(
                    conn, self._cfg.table, self._cfg.dead_letter_table, [*self._routed_sql]
                )
        except BaseException as exc:
            await pool.close()
            if isinstance(exc, Exception):
                raise self._classify(exc, "schema check") from exc
            raise
        self._pool = pool

    async def stop(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def write(
        self, aggregates: Sequence[Aggregate], dead_letters: Sequence[DeadLetter]
    ) -> None:
        """Upsert ``aggregates`` and insert ``dead_letters`` in one transaction."""
        if not aggregates and not dead_letters:
            return
        await self._write(aggregates, dead_letters, None)

    async def write_in_transaction(
        self,
        aggregates: Sequence[Aggregate],
        dead_letters: Sequence[DeadLetter],
        then: Callable[[Any], Awaitable[None]],
    ) -> None:
        """Like :meth:`write`, then ``await then(conn)`` before the same commit (used to
        store checkpoints atomically with the rows they cover). Runs even with no rows."""
        await self._write(aggregates, dead_letters, then)

    async def _write(
        self,
        aggregates: Sequence[Aggregate],
        dead_letters: Sequence[DeadLetter],
        then: Callable[[Any], Awaitable[None]] | None,
    ) -> None:
        pool = self.pool
        started = self._clock.monotonic()
        try:
            async with pool.acquire(timeout=self._connect_timeout_s) as conn, conn.transaction():
                if self._fence is not None and (aggregates or dead_letters):
                    await self._fence.check(conn)
                if self._router is None:
                    created = await write_batch(
                        conn, self._sql, aggregates, dead_letters, self._clock.now()
                    )
                    written = len(aggregates) - len(created)
                else:
                    created, routed = await self._write_routed(conn, aggregates, dead_letters)
                    written = sum(n for _, _, n in routed)
                if then is not None:
                    await then(conn)
        except FencedError:
            raise  # not a failure of this output: the lease is lost
        except Exception as exc:
            err = self._classify(exc, "write")
            self._metrics.on_sink_error(self.name, err.retriable)
            raise err from exc
        if created:
            log.warning(
                "postgres: %d aggregate(s) refused by the database were dead-lettered",
                len(created),
            )
        if not aggregates and not dead_letters:
            return  # a checkpoint alone: no output was written
        if self._router is not None:
            for route, table, n in routed:
                self._metrics.on_route_written(route, f"postgres:{table}", n)
        self._metrics.on_sink_write(
            self.name,
            written,
            len(dead_letters) + len(created),
            self._clock.monotonic() - started,
        )

    async def _write_routed(
        self, conn: Any, aggregates: Sequence[Aggregate], dead_letters: Sequence[DeadLetter]
    ) -> tuple[list[DeadLetter], list[tuple[str, str, int]]]:
        """:func:`write_batch` per route's table, in the caller's transaction: (the dead
        letters created, (route, table, rows stored) of each route)."""
        assert self._router is not None
        now = self._clock.now()
        created: list[DeadLetter] = []
        routed: list[tuple[str, str, int]] = []
        for route, table, aggs in self._router.split(aggregates, "postgres"):
            sql = self._routed_sql.get(table, self._sql)
            made = await write_batch(conn, sql, aggs, (), now)
            created += made
            routed.append((route, table, len(aggs) - len(made)))
        created += await write_batch(conn, self._sql, (), dead_letters, now)
        return created, routed

    async def check(self) -> None:
        pool = self.pool
        try:
            async with pool.acquire(timeout=self._check_timeout_s) as conn:
                await conn.fetchval("SELECT 1", timeout=self._check_timeout_s)
        except Exception as exc:
            raise TransientError(f"PostgreSQL unreachable: {type(exc).__name__}: {exc}") from exc

    def _classify(self, exc: Exception, doing: str) -> TransientError | PermanentError:
        tables = f"{self._sql.tables.aggregates} / {self._sql.tables.dead_letters}"
        return pg_error(exc, f"{doing} of {tables}", schema_hint=_SCHEMA_HINT)
