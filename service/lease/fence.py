"""LeaseFence: a lease epoch, checked inside every write transaction of the lease holder.

An advisory lock says who holds the lease *now*; it says nothing to a write that was
already under way when the holder's session ended. Such a holder goes on writing until
it notices the loss (up to ``CHECK_S``), and the checkpoint it takes when it does
(:mod:`service.bus.leased`) would land after the successor's, so the successor's next
restart would continue from the older state.

So every acquisition takes a new epoch: ``vabus_leases.epoch`` of the namespace, raised
by one on the holder's lease session while it holds the lock (so two holders can never
take the same number). Every transaction that writes a checkpoint or output rows first
reads that row ``FOR SHARE`` and compares it with the epoch this instance took. The row
lock orders the two: a successor's acquisition waits for a write that has passed the
check to commit (and then restores from it), and a write that checks after the
acquisition sees the newer epoch and fails with :class:`FencedError`, committing
nothing. The instance then treats the lease as lost (:meth:`PostgresLease.wait_lost
<service.lease.postgres.PostgresLease.wait_lost>` returns at once) and drops that
write instead of retrying it: the successor reads those events again from the
checkpoint it restored.

A write's row lock lives as long as its session: if the old holder's host vanishes in
the middle of a write, the successor's acquisition waits until the server drops that
session. Every session of the writers sets :data:`KEEPALIVES` (:func:`keep_alive`,
:class:`KeepAliveConnection`), as the lease does, so that takes about 11 s, not the
operating system's default of hours.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

import asyncpg

from service.core.errors import PermanentError
from service.postgres.schema import LEASE_TABLE

__all__ = ["KEEPALIVES", "FencedError", "KeepAliveConnection", "LeaseFence", "keep_alive"]

# The server drops a vanished client's session (its advisory lock, its open transaction
# and row locks) after about idle + count * interval seconds; libpq's names, per session.
KEEPALIVES: Final = {
    "tcp_keepalives_idle": "5",
    "tcp_keepalives_interval": "2",
    "tcp_keepalives_count": "3",
}


_SET_KEEPALIVES: Final = "".join(f"SET {name} = {value};\n" for name, value in KEEPALIVES.items())


async def keep_alive(conn: Any) -> None:
    """Set :data:`KEEPALIVES` on a new pooled session (a pool's ``init``), with ``SET``
    rather than start-up parameters, which a pooler such as PgBouncer refuses."""
    await conn.execute(_SET_KEEPALIVES)


class KeepAliveConnection(asyncpg.Connection):  # type: ignore[misc]
    """A pooled session that keeps :data:`KEEPALIVES` when the pool resets it on release
    (``RESET ALL``): set again in the same round trip."""

    def get_reset_query(self) -> str:
        return f"{super().get_reset_query()}\n{_SET_KEEPALIVES}"


_STORED_EPOCH: Final = f"SELECT epoch FROM {LEASE_TABLE} WHERE namespace = $1 FOR SHARE"
_TAKE_EPOCH: Final = f"""
    INSERT INTO {LEASE_TABLE} (namespace, epoch, holder, acquired_at)
    VALUES ($1, 1, $2, now())
    ON CONFLICT (namespace) DO UPDATE SET
        epoch = {LEASE_TABLE}.epoch + 1, holder = EXCLUDED.holder, acquired_at = now()
    RETURNING epoch"""


class FencedError(PermanentError):
    """A write refused because another instance took the lease after this one: it is
    dropped, never retried (its events are the successor's to read again)."""


class LeaseFence:
    """The epoch this instance holds for ``namespace``, and the check writers run."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.epoch: int | None = None  # None until the lease is first acquired
        self.fenced = asyncio.Event()  # set by a refused write; the lease watches it

    async def take(self, conn: Any, holder: str, timeout_s: float) -> int:
        """A new epoch, on the lease's own session, which must hold the lock."""
        epoch = int(await conn.fetchval(_TAKE_EPOCH, self.namespace, holder, timeout=timeout_s))
        self.epoch = epoch
        self.fenced.clear()
        return epoch

    async def check(self, conn: Any) -> None:
        """Raise :class:`FencedError` unless the stored epoch is still this instance's.
        Run inside the write's transaction: the row stays locked until it ends."""
        stored = await conn.fetchval(_STORED_EPOCH, self.namespace)
        if self.epoch is not None and stored == self.epoch:
            return
        self.fenced.set()
        raise FencedError(
            f"lease on {self.namespace} fenced: this instance holds epoch {self.epoch}, "
            f"PostgreSQL ({LEASE_TABLE}) has {stored}: another instance took the lease "
            "over; this write is dropped (the new holder reads its events again)"
        )
