"""PostgresCheckpointStore: checkpoints as rows of ``vabus_checkpoints``.

One row per (namespace, partition). ``save`` upserts every given row in one
transaction. :func:`save_in_transaction` does the same inside a caller's transaction,
so that a later change can commit checkpoints together with the sink's rows.

**Owners.** Loading a partition's checkpoint is what a new owner does before it reads
the partition (a Kafka assignment, an HTTP lease taken over), so a load also claims
the partition: it raises the partition's epoch in ``vabus_partition_owners`` and this
store remembers the number. A save first reads the epochs of its partitions ``FOR
SHARE`` in its own transaction; if another store has claimed one since, the save
raises :class:`~service.lease.fence.FencedError` and commits nothing. The row lock
orders the two: a claim waits for a save that passed the check, and its load then
reads that save. So an owner that lost a partition without noticing (a consumer-group
member whose session expired while it kept reading; a revoke whose checkpoint outlived
its timeout) can never overwrite the checkpoint its successor restored from or wrote.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from typing import Any, Final

import asyncpg
import orjson

from service.checkpoints.base import PartitionCheckpoint
from service.core.errors import PermanentError, TransientError
from service.core.lifecycle import AsyncResource
from service.lease.fence import FencedError, KeepAliveConnection, LeaseFence, keep_alive
from service.postgres.errors import pg_error
from service.postgres.schema import (
    CHECKPOINT_TABLE,
    LEDGER_TABLE,
    OWNER_TABLE,
    WINDOW_LATE_TABLE,
    ensure_checkpoint_table,
    quote_identifier,
)
from service.postgres.text import storable_text

__all__ = ["ROW_FORMAT", "PostgresCheckpointStore", "save_in_transaction"]

ROW_FORMAT: Final = 1
"""Version of how a row encodes a checkpoint; rows of other versions are refused."""


def _upsert_sql(table: str) -> str:
    return f"""
        INSERT INTO {quote_identifier(table)}
            (namespace, partition, position, state, outputs, format, updated_at)
        SELECT $1, p, pos, st, o, $5, now()
        FROM unnest($2::text[], $3::text[], $4::bytea[], $6::text[]) AS u(p, pos, st, o)
        ON CONFLICT (namespace, partition) DO UPDATE SET
            position = EXCLUDED.position,
            state = EXCLUDED.state,
            outputs = EXCLUDED.outputs,
            format = EXCLUDED.format,
            updated_at = now()"""


_LEDGER_UPSERT: Final = f"""
    INSERT INTO {LEDGER_TABLE} (namespace, partition, interval_start, counter, n, updated_at)
    SELECT $1, p, to_timestamp(i), c, n, now()
    FROM unnest($2::text[], $3::float8[], $4::text[], $5::int8[]) AS u(p, i, c, n)
    ON CONFLICT (namespace, partition, interval_start, counter) DO UPDATE SET
        n = EXCLUDED.n, updated_at = now()"""


def _late_upsert(column: str) -> str:
    """Absolute counts of one column of ``vabus_window_late`` (``late``: dead-lettered,
    ``late_applied``: corrections); one column per statement, so that a window whose
    other count was already forgotten in memory (written, final) keeps it."""
    other = "late_applied" if column == "late" else "late"
    return f"""
    INSERT INTO {WINDOW_LATE_TABLE}
        (namespace, partition, name, agg_func, window_start, {column}, {other}, updated_at)
    SELECT $1, p, nm, f, to_timestamp(w), l, 0, now()
    FROM unnest($2::text[], $3::text[], $4::text[], $5::float8[], $6::int8[])
        AS u(p, nm, f, w, l)
    ON CONFLICT (namespace, partition, name, agg_func, window_start) DO UPDATE SET
        {column} = EXCLUDED.{column}, updated_at = now()"""


_LATE_UPSERTS: Final = {
    field: _late_upsert(column)
    for field, column in (
        ("late_windows", "late"),
        ("late_applied", "late_applied"),
    )
}


_CLAIM: Final = f"""
    INSERT INTO {OWNER_TABLE} AS t (store, namespace, partition, epoch, owner, claimed_at)
    SELECT $1, $2, p, 1, $4, now() FROM unnest($3::text[]) AS u(p)
    ON CONFLICT (store, namespace, partition) DO UPDATE SET
        epoch = t.epoch + 1, owner = EXCLUDED.owner, claimed_at = now()
    RETURNING partition, epoch"""
_OWNERS: Final = f"""
    SELECT partition, epoch, owner FROM {OWNER_TABLE}
    WHERE store = $1 AND namespace = $2 AND partition = ANY($3::text[])
    ORDER BY partition COLLATE "C"
    FOR SHARE"""


async def _save_ledger(conn: Any, namespace: str, rows: Sequence[PartitionCheckpoint]) -> None:
    """The ledger of each checkpoint, as absolute counts: exact after any replay."""
    parts, starts, counters, counts = [], [], [], []
    for c in rows:
        if not c.ledger:
            continue
        for start, bucket in c.ledger.get("intervals", {}).items():
            for counter, n in bucket.items():
                parts.append(c.partition)
                starts.append(float(start))
                counters.append(counter)
                counts.append(n)
    if parts:
        await conn.execute(_LEDGER_UPSERT, namespace, parts, starts, counters, counts)
    for field, upsert in _LATE_UPSERTS.items():
        lparts, names, funcs, windows, lates = [], [], [], [], []
        for c in rows:
            for name, func, window, late in (c.ledger or {}).get(field, []):
                lparts.append(c.partition)
                names.append(storable_text(name))  # never fail the checkpoint on a name
                funcs.append(func)
                windows.append(window)
                lates.append(late)
        if lparts:
            await conn.execute(upsert, namespace, lparts, names, funcs, windows, lates)


async def save_in_transaction(
    conn: Any,
    namespace: str,
    checkpoints: Sequence[PartitionCheckpoint],
    table: str = CHECKPOINT_TABLE,
) -> None:
    """Upsert ``checkpoints`` on ``conn``; the caller owns the transaction."""
    latest = {c.partition: c for c in checkpoints}  # one row per key, last wins
    rows = list(latest.values())
    if not rows:
        return
    await conn.execute(
        _upsert_sql(table),
        namespace,
        [c.partition for c in rows],
        [c.position for c in rows],
        [c.state for c in rows],
        ROW_FORMAT,
        [None if c.outputs is None else orjson.dumps(dict(c.outputs)).decode() for c in rows],
    )
    await _save_ledger(conn, namespace, rows)


class PostgresCheckpointStore(AsyncResource):
    """Implements :class:`~service.checkpoints.base.CheckpointStore` in PostgreSQL.

    Given a pool, the store borrows it (the owner closes it); given a DSN, it opens
    and closes a small pool of its own. ``start`` creates the table if it is missing.
    Errors: :class:`TransientError` while the server is unreachable,
    :class:`PermanentError` for anything retrying cannot fix.
    """

    def __init__(
        self,
        pool_or_dsn: Any,
        namespace: str,
        *,
        table: str = CHECKPOINT_TABLE,
        timeout_s: float = 10.0,
        fence: LeaseFence | None = None,
    ) -> None:
        quote_identifier(table)  # a bad name fails here, not at the first save
        self.namespace = namespace
        self._fence = fence  # a leased bus's: checkpoints commit only while it holds
        self._table = table
        self._dsn = pool_or_dsn if isinstance(pool_or_dsn, str) else None
        self._borrowed = None if isinstance(pool_or_dsn, str) else pool_or_dsn
        self._pool: Any = None
        self._timeout_s = timeout_s
        self._epochs: dict[str, int] = {}  # partition -> the epoch our last load took
        self._owner = f"{socket.gethostname()}:{os.getpid()}"
        self._select = (
            f"SELECT partition, position, state, outputs, format FROM {quote_identifier(table)} "
            "WHERE namespace = $1 AND partition = ANY($2::text[])"
        )

    async def start(self) -> None:
        if self._pool is not None:
            return
        if self._borrowed is not None:
            pool = self._borrowed
        else:
            try:
                pool = await asyncpg.create_pool(
                    self._dsn,
                    min_size=1,
                    max_size=2,
                    timeout=self._timeout_s,
                    init=keep_alive,
                    connection_class=KeepAliveConnection,  # a vanished owner's locks go soon
                )
            except Exception as exc:
                raise pg_error(exc, "checkpoint store start") from exc
        try:
            async with pool.acquire(timeout=self._timeout_s) as conn:
                await ensure_checkpoint_table(conn, self._table)
        except Exception as exc:
            if self._borrowed is None:
                await pool.close()
            raise self._classify(exc) from exc
        self._pool = pool

    async def stop(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None and self._borrowed is None:
            await pool.close()

    def _started_pool(self) -> Any:
        if self._pool is None:
            raise RuntimeError("PostgresCheckpointStore is not started")
        return self._pool

    async def load(self, partitions: Sequence[str]) -> dict[str, PartitionCheckpoint]:
        pool = self._started_pool()
        wanted = list(partitions)
        try:
            async with pool.acquire(timeout=self._timeout_s) as conn, conn.transaction():
                # Claim first: the claim waits for a save that is under way, so the
                # read below sees everything the previous owner could still commit.
                # (In sorted order, as saves lock them: no deadlock between the two.)
                claimed = await conn.fetch(
                    _CLAIM, self._table, self.namespace, sorted(set(wanted)), self._owner
                )
                rows = await conn.fetch(self._select, self.namespace, wanted)
        except Exception as exc:
            raise self._classify(exc) from exc
        self._epochs.update((r["partition"], r["epoch"]) for r in claimed)
        result: dict[str, PartitionCheckpoint] = {}
        for row in rows:
            if row["format"] != ROW_FORMAT:
                raise PermanentError(
                    f"checkpoint of {self.namespace!r}/{row['partition']!r} in {self._table} "
                    f"has format {row['format']}, this service reads {ROW_FORMAT}; run a "
                    "matching service version"
                )
            state, outputs = row["state"], row["outputs"]
            result[row["partition"]] = PartitionCheckpoint(
                partition=row["partition"],
                position=row["position"],
                state=None if state is None else bytes(state),
                outputs=None if outputs is None else orjson.loads(outputs),
            )
        return result

    async def save(self, checkpoints: Sequence[PartitionCheckpoint]) -> None:
        if not checkpoints:
            return
        pool = self._started_pool()
        try:
            async with pool.acquire(timeout=self._timeout_s) as conn, conn.transaction():
                await self.save_in(conn, checkpoints)
        except FencedError:
            raise
        except Exception as exc:
            raise self._classify(exc) from exc

    async def save_in(self, conn: Any, checkpoints: Sequence[PartitionCheckpoint]) -> None:
        """:meth:`save` on a connection whose transaction the caller owns; with a fence,
        raises :class:`FencedError` (committing nothing) once the lease has moved on."""
        if not checkpoints:
            return
        if self._fence is not None:
            await self._fence.check(conn)
        await self._check_owner(conn, {c.partition for c in checkpoints})
        await save_in_transaction(conn, self.namespace, checkpoints, self._table)

    async def _check_owner(self, conn: Any, partitions: set[str]) -> None:
        """Raise :class:`FencedError` if another store claimed one of ``partitions``
        after this one (a partition nobody ever claimed is anyone's to save)."""
        rows = await conn.fetch(_OWNERS, self._table, self.namespace, sorted(partitions))
        lost = {
            r["partition"]: r["owner"]
            for r in rows
            if r["epoch"] != self._epochs.get(r["partition"])
        }
        if lost:
            raise FencedError(
                f"checkpoint of {self.namespace!r} fenced: partition(s) "
                + ", ".join(
                    f"{p!r} (restored since by {o or 'another instance'})"
                    for p, o in sorted(lost.items())
                )
                + "; their new owner continues from there, this save is dropped"
            )

    def _classify(self, exc: Exception) -> TransientError | PermanentError:
        return pg_error(exc, f"checkpoints in {self._table}")
