"""PostgreSQL schema: the aggregates table, the dead-letter table and the checkpoint table.

Table names come from configuration, so they are validated as identifiers and quoted;
values are never interpolated into SQL. Every statement is idempotent (``IF NOT
EXISTS``), so :func:`migrate` may run at every start-up and from ``vabus-aggregator
migrate`` alike. Concurrent migrations (several instances starting together) are
serialised by a transaction-scoped advisory lock, because concurrent ``CREATE TABLE IF
NOT EXISTS`` can still fail on the catalog's unique indexes.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import asyncpg

from service.core.errors import PermanentError
from service.postgres.errors import pg_error
from service.postgres.sketch_sql import sketch_function_ddl

__all__ = [
    "CHECKPOINT_TABLE",
    "DLQ_RUNS_TABLE",
    "LEASE_TABLE",
    "OWNER_TABLE",
    "TableNames",
    "checkpoint_ddl",
    "dlq_replay_ddl",
    "ensure_checkpoint_table",
    "ensure_lease_table",
    "ensure_schema",
    "lease_ddl",
    "migrate",
    "migrate_connection",
    "quote_identifier",
    "schema_ddl",
]

CHECKPOINT_TABLE: Final = "vabus_checkpoints"
LEDGER_TABLE: Final = "vabus_ledger"
WINDOW_LATE_TABLE: Final = "vabus_window_late"
LEASE_TABLE: Final = "vabus_leases"  # the HTTP bus lease's epoch (service.lease.fence)
OWNER_TABLE: Final = "vabus_partition_owners"  # who last restored a partition's checkpoint
DLQ_RUNS_TABLE: Final = "vabus_dlq_runs"  # dlq replay: marked dead letters to archive

log = logging.getLogger(__name__)

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_MAX_IDENT = 63  # PostgreSQL's NAMEDATALEN - 1; longer names are silently truncated
# Arbitrary constant key for pg_advisory_xact_lock: "vabus" in ASCII.
_MIGRATION_LOCK_KEY: Final = 0x7661627573


def quote_identifier(name: str) -> str:
    """``table`` or ``schema.table`` -> the quoted SQL form; raises ``ValueError`` otherwise.

    Only letters, digits and underscores are accepted (not starting with a digit, at
    most 63 characters per part), so quoting cannot be escaped. Quoting keeps the case
    as written: ``Events`` and ``events`` are different tables.
    """
    parts = name.split(".")
    if len(parts) > 2 or not all(_IDENT.fullmatch(p) for p in parts):
        raise ValueError(
            f"invalid table name {name!r}: expected 'table' or 'schema.table' made of "
            "letters, digits and underscores (not starting with a digit, at most 63 each)"
        )
    return ".".join(f'"{p}"' for p in parts)


def _index_name(table: str, suffix: str) -> str:
    """A quoted, unqualified index name derived from ``table`` that fits in 63 characters."""
    base = table.replace(".", "_")
    name = f"{base}_{suffix}"
    if len(name) > _MAX_IDENT:
        digest = hashlib.sha1(name.encode(), usedforsecurity=False).hexdigest()[:8]
        name = f"{base[: _MAX_IDENT - len(suffix) - 10]}_{digest}_{suffix}"
    return f'"{name}"'


@dataclass(frozen=True, slots=True)
class TableNames:
    """Validated, quoted table names used to build SQL."""

    aggregates: str
    dead_letters: str
    checkpoints: str

    @classmethod
    def of(
        cls, table: str, dead_letter_table: str, checkpoint_table: str = CHECKPOINT_TABLE
    ) -> TableNames:
        """Raises ``ValueError`` naming the bad table name."""
        return cls(
            quote_identifier(table),
            quote_identifier(dead_letter_table),
            quote_identifier(checkpoint_table),
        )


def _add_column_if_missing(quoted_table: str, column: str, definition: str) -> str:
    """DDL adding ``column`` to a table made by an older version (or by hand, without
    ``emitted_at`` and ``updated_at``). It checks the catalog first, so the usual no-op neither
    needs ownership nor takes ALTER TABLE's exclusive lock at every start-up."""
    # quoted_table comes from quote_identifier: letters, digits, _ and " only.
    return f"""DO $$ BEGIN
        IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = '{quoted_table}'::regclass
                       AND attname = '{column}' AND NOT attisdropped) THEN
            ALTER TABLE {quoted_table} ADD COLUMN {column} {definition};
        END IF;
    END $$"""


# The aggregates table's primary key: a series is (name, tags); tags last, so that the
# per-name range queries the key serves keep their prefix.
_AGGREGATES_KEY: Final = "name, agg_func, window_start, window_end, tags"


def _key_with_tags(quoted_table: str) -> str:
    """DDL swapping the primary key of a v1.2 table (without ``tags``) for one with it,
    in one ALTER TABLE; the catalog is read first, so an upgraded table takes no lock.
    The rows stay: the old key was unique, so it still is with ``tags = '{}'`` added."""
    return f"""DO $$ DECLARE old_key name; BEGIN
        IF NOT EXISTS (
            SELECT 1 FROM pg_constraint c JOIN pg_attribute a
                ON a.attrelid = c.conrelid AND a.attnum = ANY (c.conkey)
            WHERE c.conrelid = '{quoted_table}'::regclass AND c.contype = 'p'
                AND a.attname = 'tags') THEN
            SELECT conname INTO old_key FROM pg_constraint
            WHERE conrelid = '{quoted_table}'::regclass AND contype = 'p';
            IF old_key IS NOT NULL THEN
                EXECUTE format('ALTER TABLE {quoted_table} DROP CONSTRAINT %I', old_key);
            END IF;
            ALTER TABLE {quoted_table} ADD PRIMARY KEY ({_AGGREGATES_KEY});
        END IF;
    END $$"""


def aggregates_ddl(table: str) -> list[str]:
    """DDL for one aggregates table: the default one and each route's alike."""
    agg = quote_identifier(table)
    return [
        f"""CREATE TABLE IF NOT EXISTS {agg} (
            name         text             NOT NULL,
            tags         jsonb            NOT NULL DEFAULT '{{}}',
            agg_func     text             NOT NULL,
            window_start timestamptz      NOT NULL,
            window_end   timestamptz      NOT NULL,
            value        double precision NOT NULL,
            count        bigint           NOT NULL,
            revision     bigint           NOT NULL DEFAULT 1,
            sketch       bytea,
            emitted_at   timestamptz      NOT NULL,
            updated_at   timestamptz      NOT NULL DEFAULT now(),
            PRIMARY KEY ({_AGGREGATES_KEY})
        )""",
        # The revision guard of the upsert compares (revision, count, emitted_at); a table
        # from before emitted_at existed gets it, old rows ranking below any new emission.
        _add_column_if_missing(agg, "emitted_at", "timestamptz NOT NULL DEFAULT '-infinity'"),
        _add_column_if_missing(agg, "updated_at", "timestamptz NOT NULL DEFAULT now()"),
        # v1.3 (contract §12.3-§12.5): rows of a v1.2 table are untagged first emissions.
        _add_column_if_missing(agg, "tags", "jsonb NOT NULL DEFAULT '{}'"),
        _add_column_if_missing(agg, "revision", "bigint NOT NULL DEFAULT 1"),
        _add_column_if_missing(agg, "sketch", "bytea"),
        _key_with_tags(agg),
        # The primary key serves per-name range queries; this one serves "all names
        # in a time range" (dashboards, reports, retention deletes).
        f"CREATE INDEX IF NOT EXISTS {_index_name(table, 'window_start_idx')} "
        f"ON {agg} (window_start)",
    ]


def schema_ddl(table: str, dead_letter_table: str, route_tables: Sequence[str] = ()) -> list[str]:
    """DDL for the aggregates and dead-letter tables (docs/delivery.md#outputs-what-is-written),
    and the routes' own aggregates tables (ROUTES_FILE, docs/routes.md) with the same DDL."""
    dlq = quote_identifier(dead_letter_table)
    return [
        *aggregates_ddl(table),
        *(stmt for t in route_tables if t != table for stmt in aggregates_ddl(t)),
        f"""CREATE TABLE IF NOT EXISTS {dlq} (
            id          bigserial   PRIMARY KEY,
            raw         text        NOT NULL,
            reason      text        NOT NULL,
            detail      text        NOT NULL DEFAULT '',
            source      text        NOT NULL DEFAULT '',
            received_at timestamptz NOT NULL,
            stored_at   timestamptz NOT NULL DEFAULT now()
        )""",
        # A dead letter's identity where its source names a position (see
        # service.sinks.postgres.dead_letter_keys): a replay inserts nothing twice. Rows
        # of older versions keep NULL, which never conflicts.
        _add_column_if_missing(dlq, "dedup_key", "text"),
        f"CREATE UNIQUE INDEX IF NOT EXISTS {_index_name(dead_letter_table, 'dedup_key_idx')} "
        f"ON {dlq} (dedup_key)",
        f"CREATE INDEX IF NOT EXISTS {_index_name(dead_letter_table, 'received_at_idx')} "
        f"ON {dlq} (received_at)",
        f"CREATE INDEX IF NOT EXISTS {_index_name(dead_letter_table, 'reason_idx')} "
        f"ON {dlq} (reason, received_at)",
        *sketch_function_ddl(),  # vabus_quantile & co. (contract 12.5, docs/sketches.md)
        *dlq_replay_ddl(dead_letter_table),
    ]


def dlq_replay_ddl(dead_letter_table: str) -> list[str]:
    """``dlq replay`` (docs/dlq.md): when each dead letter was replayed and how it went
    (NULL on rows never replayed), and the runs whose windows are still to recompute."""
    dlq = quote_identifier(dead_letter_table)
    return [
        _add_column_if_missing(dlq, "replayed_at", "timestamptz"),
        _add_column_if_missing(dlq, "replay_outcome", "text"),
        f"""CREATE TABLE IF NOT EXISTS {DLQ_RUNS_TABLE} (
            id                bigserial   PRIMARY KEY,
            dead_letter_table text        NOT NULL,
            events            jsonb       NOT NULL,
            started_at        timestamptz NOT NULL DEFAULT now(),
            finished_at       timestamptz
        )""",
    ]


def checkpoint_ddl(checkpoint_table: str = CHECKPOINT_TABLE) -> list[str]:
    """DDL for the checkpoint table (one row per namespace and source partition)."""
    cp = quote_identifier(checkpoint_table)
    return [
        f"""CREATE TABLE IF NOT EXISTS {cp} (
            namespace  text        NOT NULL,
            partition  text        NOT NULL,
            position   text,
            state      bytea,
            format     int         NOT NULL,
            updated_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (namespace, partition)
        )""",
        # how far each output topic partition was written at the checkpoint (JSON)
        _add_column_if_missing(cp, "outputs", "text"),
        # the ledger, written with each checkpoint (absolute counts per input partition,
        # so a replay never counts twice): per interval of receipt, and late events per
        # emitted window
        f"""CREATE TABLE IF NOT EXISTS {LEDGER_TABLE} (
            namespace      text        NOT NULL,
            partition      text        NOT NULL,
            interval_start timestamptz NOT NULL,
            counter        text        NOT NULL,
            n              bigint      NOT NULL,
            updated_at     timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (namespace, partition, interval_start, counter)
        )""",
        f"""CREATE TABLE IF NOT EXISTS {WINDOW_LATE_TABLE} (
            namespace    text        NOT NULL,
            partition    text        NOT NULL,
            name         text        NOT NULL,
            agg_func     text        NOT NULL,
            window_start timestamptz NOT NULL,
            late         bigint      NOT NULL,
            late_applied bigint      NOT NULL DEFAULT 0,
            updated_at   timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (namespace, partition, name, agg_func, window_start)
        )""",
        # v1.3: late events applied as corrections (AGGREGATION_ALLOWED_LATENESS); a
        # table of an older release gets the column, its rows 0 (they had none)
        _add_column_if_missing(
            quote_identifier(WINDOW_LATE_TABLE), "late_applied", "bigint NOT NULL DEFAULT 0"
        ),
        # the epoch of each partition's owner: raised by every restore (a load), checked
        # by every save (service.checkpoints.postgres); ``store`` is the checkpoint table
        f"""CREATE TABLE IF NOT EXISTS {OWNER_TABLE} (
            store      text        NOT NULL,
            namespace  text        NOT NULL,
            partition  text        NOT NULL,
            epoch      bigint      NOT NULL,
            owner      text        NOT NULL DEFAULT '',
            claimed_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (store, namespace, partition)
        )""",
        *lease_ddl(),
    ]


def lease_ddl() -> list[str]:
    """One row per lease namespace: the epoch its latest holder took on acquiring it."""
    return [
        f"""CREATE TABLE IF NOT EXISTS {LEASE_TABLE} (
            namespace   text        PRIMARY KEY,
            epoch       bigint      NOT NULL,
            holder      text        NOT NULL DEFAULT '',
            acquired_at timestamptz NOT NULL DEFAULT now()
        )""",
    ]


async def _run_ddl(conn: Any, statements: list[str]) -> None:
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK_KEY)
        for stmt in statements:
            await conn.execute(stmt)


async def migrate_connection(
    conn: Any, table: str, dead_letter_table: str, route_tables: Sequence[str] = ()
) -> None:
    """Create every table and index on an open asyncpg connection, in one transaction;
    ``route_tables``: the routes' own aggregates tables (docs/routes.md)."""
    await _run_ddl(conn, schema_ddl(table, dead_letter_table, route_tables) + checkpoint_ddl())


async def ensure_schema(
    conn: Any, table: str, dead_letter_table: str, route_tables: Sequence[str] = ()
) -> None:
    """:func:`migrate_connection` for start-up: a user without ``CREATE`` privilege (the
    schema having been created by ``vabus-aggregator migrate`` as another user) passes
    as long as every table already exists in this release's shape."""
    await _ensure(
        conn,
        [
            table,
            *route_tables,
            dead_letter_table,
            CHECKPOINT_TABLE,
            LEDGER_TABLE,
            WINDOW_LATE_TABLE,
            OWNER_TABLE,
            LEASE_TABLE,
        ],
        schema_ddl(table, dead_letter_table, route_tables) + checkpoint_ddl(),
    )
    for aggregates_table in dict.fromkeys([table, *route_tables]):
        await _require_upgraded(conn, aggregates_table)


async def _require_upgraded(conn: Any, table: str) -> None:
    """Raise :class:`PermanentError` when the aggregates table still has the v1.2 shape
    (a user without ownership cannot upgrade it at start-up), instead of failing at the
    first write; the rows are kept by ``migrate``, so say to run it."""
    missing = await conn.fetchval(
        """SELECT array_agg(c ORDER BY c) FROM unnest(ARRAY['tags', 'revision', 'sketch']) c
           WHERE NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = $1::regclass
                             AND attname = c AND NOT attisdropped)""",
        quote_identifier(table),
    )
    keyed = await conn.fetchval(
        """SELECT EXISTS (SELECT 1 FROM pg_constraint c JOIN pg_attribute a
               ON a.attrelid = c.conrelid AND a.attnum = ANY (c.conkey)
           WHERE c.conrelid = $1::regclass AND c.contype = 'p' AND a.attname = 'tags')""",
        quote_identifier(table),
    )
    if missing or not keyed:
        lacks = f"columns {', '.join(missing)}" if missing else "tags in its primary key"
        raise PermanentError(
            f"table {table} was created by an earlier release and lacks {lacks}; run "
            "`vabus-aggregator migrate` as its owner: it upgrades the table in place, "
            "keeping its rows"
        )


async def ensure_checkpoint_table(conn: Any, checkpoint_table: str = CHECKPOINT_TABLE) -> None:
    """Create the checkpoint table only (for a checkpoint store used without the sink);
    like :func:`ensure_schema`, an existing table needs no ``CREATE`` privilege."""
    tables = [checkpoint_table, LEDGER_TABLE, WINDOW_LATE_TABLE, OWNER_TABLE, LEASE_TABLE]
    await _ensure(conn, tables, checkpoint_ddl(checkpoint_table))


async def ensure_lease_table(conn: Any) -> None:
    """The lease table alone, for a lease that may compete before the outputs start."""
    await _ensure(conn, [LEASE_TABLE], lease_ddl())


async def _ensure(conn: Any, tables: list[str], statements: list[str]) -> None:
    try:
        await _run_ddl(conn, statements)
    except asyncpg.InsufficientPrivilegeError:
        found = await conn.fetchval(
            "SELECT count(to_regclass(t)) FROM unnest($1::text[]) AS t",
            [quote_identifier(t) for t in tables],
        )
        if found != len(tables):
            raise
        log.info("schema: no CREATE privilege, but tables %s exist; using them", tables)


async def migrate(
    dsn: str,
    table: str,
    dead_letter_table: str,
    *,
    route_tables: Sequence[str] = (),
    timeout_s: float = 30.0,
) -> None:
    """Create or upgrade the schema behind ``dsn``.

    Raises ``ValueError`` for a bad table name, :class:`TransientError` when the server
    cannot be reached and :class:`PermanentError` when it refuses (e.g. missing
    ``CREATE`` privilege or wrong credentials).
    """
    for t in (table, *route_tables):
        TableNames.of(t, dead_letter_table)  # fail on bad names before connecting
    try:
        conn = await asyncpg.connect(dsn, timeout=timeout_s)
        try:
            await migrate_connection(conn, table, dead_letter_table, route_tables)
        finally:
            await conn.close()
    except Exception as exc:
        raise pg_error(
            exc,
            "schema migration",
            schema_hint="the database user needs CREATE privilege on the target schema",
        ) from exc
