"""PostgresSink against a real PostgreSQL: schema, idempotent upserts, poison rows, outages."""

from __future__ import annotations

import asyncio
import json
import random
import string
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
import pytest

from service.config import PostgresConfig, Secret
from service.core.clock import SystemClock
from service.core.errors import PermanentError, TransientError
from service.core.events import Aggregate, DeadLetter
from service.dev.postgres_server import EmbeddedPostgres
from service.metrics.collector import MetricsCollector
from service.postgres.schema import migrate
from service.sinks.postgres import PostgresSink

pytestmark = pytest.mark.integration

T0 = 1_700_000_040.0


def agg(name: str, value: float = 1.0, count: int = 1, start: float = T0) -> Aggregate:
    return Aggregate(
        name=name,
        agg_func="sum",
        value=value,
        count=count,
        window_start=start,
        window_end=start + 60,
        emitted_at=start + 61,
    )


def utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC)


def config(dsn: str, prefix: str) -> PostgresConfig:
    return PostgresConfig(
        dsn=Secret(dsn),
        table=f"{prefix}_agg",
        dead_letter_table=f"{prefix}_dlq",
        pool_min_size=1,
        pool_max_size=2,
    )


@pytest.fixture
async def sink(postgres_dsn: str, unique_name: str, conn: Any) -> AsyncIterator[PostgresSink]:
    async with PostgresSink(
        config(postgres_dsn, unique_name), MetricsCollector(), SystemClock()
    ) as s:
        yield s
    await conn.execute(f"DROP TABLE IF EXISTS {unique_name}_agg, {unique_name}_dlq")


async def rows(conn: Any, table: str) -> list[dict[str, Any]]:
    return [
        dict(r)
        for r in await conn.fetch(
            f"SELECT name, agg_func, window_start, window_end, value, count, emitted_at "
            f"FROM {table} ORDER BY name, window_start"
        )
    ]


async def test_migration_creates_the_contract_tables_and_indexes_and_can_run_again(
    postgres_dsn: str, unique_name: str, conn: Any
) -> None:
    table, dlq = f"{unique_name}_agg", f"{unique_name}_dlq"
    try:
        # Several instances starting together must not trip over each other.
        await asyncio.gather(*(migrate(postgres_dsn, table, dlq) for _ in range(4)))
        await migrate(postgres_dsn, table, dlq)

        columns = {
            r["column_name"]: r["data_type"]
            for r in await conn.fetch(
                "SELECT column_name, data_type FROM information_schema.columns "
                "WHERE table_name = $1",
                table,
            )
        }
        assert columns == {
            "name": "text",
            "tags": "jsonb",
            "agg_func": "text",
            "window_start": "timestamp with time zone",
            "window_end": "timestamp with time zone",
            "value": "double precision",
            "count": "bigint",
            "revision": "bigint",
            "sketch": "bytea",
            "emitted_at": "timestamp with time zone",
            "updated_at": "timestamp with time zone",
        }
        pk = await conn.fetchval(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE conrelid = $1::regclass AND contype = 'p'",
            table,
        )
        assert pk == "PRIMARY KEY (name, agg_func, window_start, window_end, tags)"
        dlq_columns = await conn.fetch(
            "SELECT column_name FROM information_schema.columns WHERE table_name = $1", dlq
        )
        assert {r["column_name"] for r in dlq_columns} == {
            "id",
            "raw",
            "reason",
            "detail",
            "source",
            "received_at",
            "stored_at",
            "dedup_key",  # a replay stores a dead letter once (test_dead_letters_once.py)
            "replayed_at",  # dlq replay: each dead letter at most once (docs/dlq.md)
            "replay_outcome",
        }
        indexes = {
            r["indexdef"].split(" USING ")[1]
            for r in await conn.fetch(
                "SELECT indexdef FROM pg_indexes WHERE tablename = ANY($1::text[])", [table, dlq]
            )
        }
        assert {"btree (window_start)", "btree (received_at)", "btree (reason, received_at)"} <= (
            indexes
        )
        assert "btree (dedup_key)" in indexes
        assert await conn.fetchval("SELECT to_regclass('vabus_checkpoints')") is not None
    finally:
        await conn.execute(f"DROP TABLE IF EXISTS {table}, {dlq}")


async def test_writing_the_same_aggregate_twice_leaves_one_row_with_the_new_values(
    sink: PostgresSink, conn: Any, unique_name: str
) -> None:
    await sink.write([agg("cpu", 1.0, 1), agg("mem", 5.0, 2)], [])
    await sink.write([agg("cpu", 7.5, 3)], [])
    await sink.write([agg("cpu", 7.5, 3)], [])

    assert await rows(conn, f"{unique_name}_agg") == [
        {
            "name": "cpu",
            "agg_func": "sum",
            "window_start": utc(T0),
            "window_end": utc(T0 + 60),
            "value": 7.5,
            "count": 3,
            "emitted_at": utc(T0 + 61),
        },
        {
            "name": "mem",
            "agg_func": "sum",
            "window_start": utc(T0),
            "window_end": utc(T0 + 60),
            "value": 5.0,
            "count": 2,
            "emitted_at": utc(T0 + 61),
        },
    ]


async def test_a_batch_holding_one_key_twice_stores_the_last_one(
    sink: PostgresSink, conn: Any, unique_name: str
) -> None:
    await sink.write([agg("cpu", 1.0, 1), agg("cpu", 2.0, 2), agg("cpu", 3.0, 3)], [])

    stored = await rows(conn, f"{unique_name}_agg")
    assert [(r["value"], r["count"]) for r in stored] == [(3.0, 3)]


async def test_a_row_postgresql_refuses_is_dead_lettered_alone_and_the_rest_is_stored(
    sink: PostgresSink, conn: Any, unique_name: str
) -> None:
    good = [agg(f"name-{i:05d}", float(i), i) for i in range(2_500)]
    poison = [agg("bad\x00name", 1.0), agg("late-bad\x00", 2.0)]
    batch = [*good[:1000], poison[0], *good[1000:], poison[1]]

    await sink.write(batch, [])

    stored = await rows(conn, f"{unique_name}_agg")
    assert [r["name"] for r in stored] == [a.name for a in good]
    letters = await conn.fetch(
        f"SELECT raw, reason, detail, source FROM {unique_name}_dlq ORDER BY id"
    )
    assert [orjson.loads(r["raw"]) for r in letters] == [p.to_json_obj() for p in poison]
    assert {r["reason"] for r in letters} == {"invalid_value"}
    assert all("22021" in r["detail"] for r in letters)


async def test_dead_letters_are_stored_with_every_contract_field(
    sink: PostgresSink, conn: Any, unique_name: str
) -> None:
    letters = [
        DeadLetter(
            raw='{"name": 1}',
            reason="invalid_name",
            detail="name must be a string",
            source="kafka:events/0@17",
            received_at=T0 + 0.25,
        ),
        # Raw text straight from the wire may hold bytes PostgreSQL text cannot.
        DeadLetter(
            raw="not json \x00 at all",
            reason="invalid_json",
            detail="bad JSON",
            source="http:cursor=9",
            received_at=T0 + 1,
        ),
    ]

    await sink.write([agg("cpu")], letters)

    stored = await conn.fetch(
        f"SELECT id, raw, reason, detail, source, received_at, stored_at "
        f"FROM {unique_name}_dlq ORDER BY id"
    )
    fields = ("raw", "reason", "detail", "source", "received_at")
    assert [tuple(r[f] for f in fields) for r in stored] == [
        (
            '{"name": 1}',
            "invalid_name",
            "name must be a string",
            "kafka:events/0@17",
            utc(T0 + 0.25),
        ),
        ("not json \\u0000 at all", "invalid_json", "bad JSON", "http:cursor=9", utc(T0 + 1)),
    ]
    assert all(r["id"] is not None and r["stored_at"] is not None for r in stored)
    assert len(await rows(conn, f"{unique_name}_agg")) == 1


async def test_a_dropped_table_is_a_permanent_error_that_says_to_run_migrate(
    sink: PostgresSink, conn: Any, unique_name: str
) -> None:
    await conn.execute(f"DROP TABLE {unique_name}_agg")

    with pytest.raises(PermanentError, match=r"42P01.*vabus-aggregator migrate"):
        await sink.write([agg("cpu")], [])


async def test_a_user_without_create_privilege_can_run_on_tables_made_by_migrate(
    postgres_dsn: str, unique_name: str, conn: Any
) -> None:
    table, dlq, role = f"{unique_name}_agg", f"{unique_name}_dlq", f"{unique_name}_writer"
    await migrate(postgres_dsn, table, dlq)
    await conn.execute(f"CREATE ROLE {role} LOGIN")
    try:
        assert not await conn.fetchval(f"SELECT has_schema_privilege('{role}', 'public', 'CREATE')")
        await conn.execute(f"GRANT SELECT, INSERT, UPDATE ON {table}, {dlq} TO {role}")
        await conn.execute(f"GRANT SELECT, INSERT, UPDATE ON vabus_checkpoints TO {role}")
        await conn.execute(f"GRANT USAGE ON SEQUENCE {dlq}_id_seq TO {role}")
        assert postgres_dsn.startswith("postgresql://postgres@")  # the test edits the user
        writer_dsn = postgres_dsn.replace("postgres@", f"{role}@", 1)

        async with PostgresSink(
            config(writer_dsn, unique_name), MetricsCollector(), SystemClock()
        ) as sink:
            await sink.write([agg("cpu")], [])
        assert len(await rows(conn, table)) == 1
    finally:
        await conn.execute(f"DROP TABLE IF EXISTS {table}, {dlq}")
        await conn.execute(f"DROP OWNED BY {role}")
        await conn.execute(f"DROP ROLE {role}")


def test_a_table_name_that_is_not_an_identifier_is_refused_before_connecting() -> None:
    cfg = PostgresConfig(dsn=Secret("postgresql://nowhere/db"), table='events"; DROP TABLE x; --')

    with pytest.raises(ValueError, match="invalid table name"):
        PostgresSink(cfg, MetricsCollector(), SystemClock())


async def test_writes_fail_transiently_while_postgresql_is_down_and_succeed_after_restart(
    pg_restartable: EmbeddedPostgres, unique_name: str
) -> None:
    sink = PostgresSink(config(pg_restartable.dsn, unique_name), MetricsCollector(), SystemClock())
    async with sink:
        await sink.write([agg("cpu", 1.0)], [])
        await sink.check()

        await pg_restartable.stop()
        with pytest.raises(TransientError):
            await sink.write([agg("cpu", 2.0)], [])
        with pytest.raises(TransientError):
            await sink.check()

        await pg_restartable.start()
        await sink.write([agg("cpu", 3.0, count=3)], [])
        await sink.check()

    c = await asyncpg.connect(pg_restartable.dsn)
    try:
        assert await c.fetchval(f"SELECT value FROM {unique_name}_agg") == 3.0
    finally:
        await c.close()


async def test_start_fails_transiently_when_postgresql_is_unreachable(unique_name: str) -> None:
    cfg = config("postgresql://postgres@127.0.0.1:1/postgres", unique_name)

    with pytest.raises(TransientError, match="unreachable"):
        await PostgresSink(cfg, MetricsCollector(), SystemClock(), connect_timeout_s=2).start()


def emitted(a: Aggregate, at: float) -> Aggregate:
    return Aggregate(a.name, a.agg_func, a.value, a.count, a.window_start, a.window_end, at)


async def test_a_stale_replay_never_overwrites_a_newer_row(
    sink: PostgresSink, conn: Any, unique_name: str
) -> None:
    newer = emitted(agg("cpu", 9.0, count=9), T0 + 100)
    await sink.write([newer], [])

    await sink.write([agg("cpu", 4.0, count=4)], [])  # fewer events: an older revision
    await sink.write([emitted(agg("cpu", 8.0, count=9), T0 + 99)], [])  # same count, earlier
    [row] = await rows(conn, f"{unique_name}_agg")
    assert (row["value"], row["count"], row["emitted_at"]) == (9.0, 9, utc(T0 + 100))

    await sink.write([emitted(agg("cpu", 10.0, count=10), T0 + 50)], [])  # more events wins
    [row] = await rows(conn, f"{unique_name}_agg")
    assert (row["value"], row["count"]) == (10.0, 10)


async def test_a_batch_keeps_the_highest_revision_of_a_key_whatever_the_order(
    sink: PostgresSink, conn: Any, unique_name: str
) -> None:
    await sink.write([agg("cpu", 5.0, 5), agg("cpu", 2.0, 2), agg("cpu", 3.0, 3)], [])

    [row] = await rows(conn, f"{unique_name}_agg")
    assert (row["value"], row["count"]) == (5.0, 5)


async def test_migration_adds_emitted_at_to_a_table_made_from_the_contract_columns_only(
    postgres_dsn: str, unique_name: str, conn: Any
) -> None:
    table, dlq = f"{unique_name}_agg", f"{unique_name}_dlq"
    await conn.execute(
        f"""CREATE TABLE {table} (name text, agg_func text, window_start timestamptz,
            window_end timestamptz, value double precision, count bigint, updated_at timestamptz,
            PRIMARY KEY (name, agg_func, window_start, window_end))"""
    )
    await conn.execute(
        f"INSERT INTO {table} VALUES ('cpu', 'sum', $1, $2, 1.0, 1, now())", utc(T0), utc(T0 + 60)
    )
    try:
        await migrate(postgres_dsn, table, dlq)
        await migrate(postgres_dsn, table, dlq)  # and again: nothing left to do
        async with PostgresSink(
            config(postgres_dsn, unique_name), MetricsCollector(), SystemClock()
        ) as s:
            await s.write([agg("cpu", 2.0, count=1)], [])  # same count: beats the old row

        [row] = await rows(conn, table)
        assert (row["value"], row["emitted_at"]) == (2.0, utc(T0 + 61))
    finally:
        await conn.execute(f"DROP TABLE IF EXISTS {table}, {dlq}")


async def test_write_in_transaction_commits_the_extra_step_with_the_rows_or_neither(
    sink: PostgresSink, conn: Any, unique_name: str
) -> None:
    marks = f"{unique_name}_marks"
    await conn.execute(f"CREATE TABLE {marks} (k text PRIMARY KEY)")
    try:

        async def mark(c: Any) -> None:
            await c.execute(f"INSERT INTO {marks} VALUES ('one')")

        await sink.write_in_transaction([agg("a")], [], mark)
        with pytest.raises(PermanentError):  # 23505 outside any row: not isolatable
            await sink.write_in_transaction([agg("b")], [], mark)
        await sink.write_in_transaction([], [], lambda c: c.execute(f"DELETE FROM {marks}"))

        assert [r["name"] for r in await rows(conn, f"{unique_name}_agg")] == ["a"]
        assert await conn.fetchval(f"SELECT count(*) FROM {marks}") == 0
    finally:
        await conn.execute(f"DROP TABLE {marks}")


async def series_rows(conn: Any, table: str) -> list[tuple[Any, ...]]:
    found = await conn.fetch(
        f"SELECT name, tags::text, value, count, revision, sketch FROM {table}"
    )
    return sorted(
        [
            (r["name"], orjson.loads(r["tags"]), r["value"], r["count"], r["revision"], r["sketch"])
            for r in found
        ],
        key=repr,
    )


ODD_TAGS = [
    {"host": "h\u00e9\u0301", "region": "\u05d0\u05d1 \u202e rtl"},
    {"host": "\U0001f600 \u2028\u2029\ufeff", "region": '"quoted" \\ back\\slash {}'},
    {"host": "", "region": "x" * 200},
]


async def test_tags_round_trip_and_series_differing_only_in_tags_are_separate_rows(
    sink: PostgresSink, conn: Any, unique_name: str
) -> None:
    series = [replace(agg("cpu", float(i), i + 1), tags=tags) for i, tags in enumerate(ODD_TAGS)]
    untagged = [agg("cpu", 9.0, 9), replace(agg("mem", 1.0, 1), tags={})]

    await sink.write([*series, *untagged], [])
    await sink.write(series, [])  # a replay: no new rows

    assert await series_rows(conn, f"{unique_name}_agg") == sorted(
        [
            *[("cpu", t, float(i), i + 1, 1, None) for i, t in enumerate(ODD_TAGS)],
            ("cpu", {}, 9.0, 9, 1, None),
            ("mem", {}, 1.0, 1, 1, None),
        ],
        key=repr,
    )
    found = await conn.fetchval(
        f"SELECT value FROM {unique_name}_agg WHERE tags @> $1::jsonb",
        orjson.dumps({"host": ODD_TAGS[1]["host"]}).decode(),
    )
    assert found == 1.0


async def test_a_batch_holding_one_series_twice_in_any_key_order_stores_the_highest_revision(
    sink: PostgresSink, conn: Any, unique_name: str
) -> None:
    first = replace(agg("cpu", 1.0, 1), tags={"host": "a", "region": "eu"})
    second = replace(agg("cpu", 2.0, 2), tags={"region": "eu", "host": "a"}, revision=2)

    await sink.write([second, first], [])

    assert await series_rows(conn, f"{unique_name}_agg") == [
        ("cpu", {"host": "a", "region": "eu"}, 2.0, 2, 2, None)
    ]


async def test_a_stale_revision_never_replaces_a_correction(
    sink: PostgresSink, conn: Any, unique_name: str
) -> None:
    tags = {"host": "a"}
    await sink.write([replace(agg("cpu", 5.0, 5), tags=tags, revision=2)], [])

    # revision 1 replayed after kill -9: later, and even with more events (a replay that
    # decided differently about an event far behind its partition), it stays older
    stale = replace(emitted(agg("cpu", 9.0, 9), T0 + 500), tags=tags)
    await sink.write([stale], [])
    assert await series_rows(conn, f"{unique_name}_agg") == [("cpu", tags, 5.0, 5, 2, None)]

    await sink.write([replace(agg("cpu", 6.0, 6), tags=tags, revision=3)], [])
    assert await series_rows(conn, f"{unique_name}_agg") == [("cpu", tags, 6.0, 6, 3, None)]


async def test_a_sketch_round_trips_as_bytea_and_a_correction_replaces_it(
    sink: PostgresSink, conn: Any, unique_name: str
) -> None:
    sketch = bytes(range(256)) * 4  # every byte value, NUL included
    p99 = replace(agg("lat", 0.5, 3), agg_func="p99", sketch=sketch)
    await sink.write([p99, agg("lat", 1.5, 3)], [])

    stored = await conn.fetch(f"SELECT agg_func, sketch FROM {unique_name}_agg ORDER BY 1")
    assert [(r["agg_func"], r["sketch"]) for r in stored] == [("p99", sketch), ("sum", None)]

    await sink.write([replace(p99, value=0.7, count=4, revision=2, sketch=b"\x02")], [])
    assert await conn.fetchval(f"SELECT sketch FROM {unique_name}_agg WHERE agg_func = 'p99'") == (
        b"\x02"
    )


@pytest.mark.parametrize("value", ["nul\x00", "lone \ud800 surrogate"])
async def test_a_tag_value_jsonb_cannot_hold_is_dead_lettered_and_the_rest_stored(
    sink: PostgresSink, conn: Any, unique_name: str, value: str
) -> None:
    bad = replace(agg("cpu"), tags={"host": value})
    good = replace(agg("cpu", 2.0, 2), tags={"host": "ok"})

    await sink.write([bad, good], [])

    assert await series_rows(conn, f"{unique_name}_agg") == [
        ("cpu", {"host": "ok"}, 2.0, 2, 1, None)
    ]
    [letter] = await conn.fetch(f"SELECT raw, reason, detail FROM {unique_name}_dlq")
    assert letter["reason"] == "invalid_value"
    assert json.loads(letter["raw"])["tags"] == {"host": value}


async def test_a_series_too_large_for_the_primary_key_is_dead_lettered_and_the_rest_stored(
    sink: PostgresSink, conn: Any, unique_name: str
) -> None:
    """Tag values are at most 200 characters each, but many group-by keys add up."""
    rng = random.Random(17)
    tags = {f"k{i}": "".join(rng.choices(string.ascii_letters, k=200)) for i in range(30)}
    huge = replace(agg("cpu"), tags=tags)
    good = replace(agg("cpu", 2.0, 2), tags={"host": "ok"})

    await sink.write([huge, good], [])

    assert await series_rows(conn, f"{unique_name}_agg") == [
        ("cpu", {"host": "ok"}, 2.0, 2, 1, None)
    ]
    [letter] = await conn.fetch(f"SELECT reason, detail FROM {unique_name}_dlq")
    assert letter["reason"] == "invalid_value"
    assert "54000" in letter["detail"]
