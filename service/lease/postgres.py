"""PostgresLease: the lease as a PostgreSQL session-level advisory lock.

Why an advisory lock: it belongs to a session (one connection), and PostgreSQL releases
it when that session ends, whatever ends it: a clean close, a crash or ``kill -9`` of
the holder (the kernel closes its socket and the idle server backend sees it at once),
a server restart. Nothing expires on a timer and no clock has to be trusted. The key
is a stable 64-bit hash of the namespace (:func:`lease_key`), so every instance of one
HTTP bus competes for the same lock in the database that holds its checkpoints.

**The takeover bound.** A standby calls ``pg_try_advisory_lock`` every ``poll_s``
(default 1 s) on a connection of its own, so it holds the lease at most ``poll_s`` plus
one round trip after the holder's session ended. The session ends:

* at once when the holder's process dies (``kill -9``, a crash, the OOM killer);
* when the holder's host or network silently goes away, once the server's TCP
  keepalive gives up: this connection asks for 5 s idle, then 3 probes 2 s apart, so
  about 11 s (keepalives do not apply over a Unix socket, where the host cannot vanish);
* when PostgreSQL restarts: every session ends, the first instance to connect again wins.

**The holder steps down** when it can no longer show that it holds the lock: every
``check_s`` (default 1 s) it asks PostgreSQL whether its own session holds it, with a
timeout, and it is woken at once when asyncpg sees the connection terminated. A failed
or negative check means "lost": the caller stops reading, and competes again. So does a
write that the lease's fence refused (:mod:`service.lease.fence`): every acquisition
takes a new epoch, and a write checks it inside its transaction, so a holder that lost
the lease cannot commit after its successor took it, whatever it has noticed yet.

**Limits.** The DSN must reach PostgreSQL directly or through a pooler in *session*
mode. In transaction mode a session lock lands on a server connection that the next
query may not use; the check then sees no lock and the leader steps down rather than
read without one (and the pooled server connection keeps the orphaned lock until it
closes).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
from typing import Any, Final

import asyncpg

from service.core.clock import Clock
from service.core.errors import describe_error
from service.lease.base import LeaseRole
from service.lease.fence import KEEPALIVES, LeaseFence
from service.postgres.errors import pg_error
from service.postgres.schema import ensure_lease_table

__all__ = ["CHECK_S", "POLL_S", "PostgresLease", "lease_key"]

log = logging.getLogger(__name__)

POLL_S: Final = 1.0
CHECK_S: Final = 1.0
_QUERY_TIMEOUT_S: Final = 5.0
_CONNECT_TIMEOUT_S: Final = 10.0
_CLOSE_TIMEOUT_S: Final = 1.0  # a goodbye to a server that may be gone; it fits phase 5
_WHERE_LOCK: Final = """
    l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
    AND l.classid = $1::oid AND l.objid = $2::oid
    AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"""
_HOLDS: Final = f"""
    SELECT EXISTS (SELECT 1 FROM pg_locks l WHERE {_WHERE_LOCK}
                   AND l.pid = pg_backend_pid())"""
_HOLDER: Final = f"""
    SELECT l.pid, a.application_name
    FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
    WHERE {_WHERE_LOCK}"""


def lease_key(namespace: str) -> int:
    """The advisory lock key of ``namespace``: the first 8 bytes of a SHA-256, signed
    (PostgreSQL's bigint), the same in every process and every release."""
    digest = hashlib.sha256(f"vabus-aggregator lease:{namespace}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _lock_tag(key: int) -> tuple[int, int]:
    """How ``pg_locks`` shows a bigint key: (classid, objid), its high and low halves."""
    unsigned = key & 0xFFFF_FFFF_FFFF_FFFF
    return unsigned >> 32, unsigned & 0xFFFF_FFFF


class PostgresLease:
    """Implements :class:`~service.lease.base.Lease` with ``pg_try_advisory_lock``.

    One dedicated connection, opened by :meth:`acquire` and kept while standing by; it
    becomes the lease's session once the lock is taken. Its ``application_name`` names
    this host and process, so an operator (and a standby's ``/status``) can tell who
    holds the lease.
    """

    kind = "postgres advisory lock"

    def __init__(
        self,
        dsn: str,
        namespace: str,
        clock: Clock,
        *,
        poll_s: float = POLL_S,
        check_s: float = CHECK_S,
        query_timeout_s: float = _QUERY_TIMEOUT_S,
    ) -> None:
        self.namespace = namespace
        self.key = lease_key(namespace)
        self._tag = _lock_tag(self.key)
        self._dsn = dsn
        self._clock = clock
        self._poll_s = poll_s
        self._check_s = check_s
        self._timeout_s = query_timeout_s
        self.application_name = f"vabus-aggregator lease {socket.gethostname()}:{os.getpid()}"[
            :63  # PostgreSQL truncates longer names
        ]
        self._conn: Any = None
        self.fence = LeaseFence(namespace)  # the writers of this lease's holder check it
        self._terminated = asyncio.Event()
        self._role: LeaseRole = "standby"
        self._since = clock.now()
        self._holder: dict[str, Any] | None = None
        self._failing: str | None = None  # the last connection error while standing by
        self.losses = 0
        self.last_lost_reason: str | None = None

    @property
    def role(self) -> LeaseRole:
        return self._role

    def describe(self) -> dict[str, Any]:
        view: dict[str, Any] = {
            "role": self._role,
            "kind": self.kind,
            "namespace": self.namespace,
            "key": self.key,
            "since": self._since,
            "poll_s": self._poll_s,
            "losses": self.losses,
            "last_lost_reason": self.last_lost_reason,
            "error": self._failing,  # why it cannot compete just now
        }
        if self._role == "leader":
            pid = None if self._conn is None else self._conn.get_server_pid()
            view["holder"] = {"pid": pid, "name": self.application_name}
        else:
            view["holder"] = self._holder
        return view

    async def acquire(self) -> None:
        while True:
            try:
                if await self._try_lock():
                    return
            except Exception as exc:
                self._drop_connection()
                error = pg_error(exc, "lease")
                if not error.retriable:
                    raise error from exc
                if self._failing is None:
                    log.warning(
                        "lease %s: %s; trying again every %g s", self.namespace, error, self._poll_s
                    )
                self._failing = str(error)
            await self._clock.sleep(self._poll_s)

    async def _try_lock(self) -> bool:
        conn = self._conn or await self._connect()
        if self._failing is not None:
            log.info("lease %s: PostgreSQL answers again", self.namespace)
            self._failing = None
        got = await conn.fetchval(
            "SELECT pg_try_advisory_lock($1)", self.key, timeout=self._timeout_s
        )
        if got:
            # Taken while the lock is held, so no other holder can take the same epoch;
            # should this fail, acquire() drops the connection and the lock with it.
            epoch = await self.fence.take(conn, self.application_name, self._timeout_s)
            self._become("leader")
            self._holder = None
            log.info(
                "lease %s: acquired (%s, key %d, epoch %d): this instance reads the bus",
                self.namespace,
                self.kind,
                self.key,
                epoch,
            )
            return True
        row = await conn.fetchrow(_HOLDER, *self._tag, timeout=self._timeout_s)
        holder = None if row is None else {"pid": row["pid"], "name": row["application_name"]}
        if holder != self._holder:
            log.info(
                "lease %s: standby; held by %s; polling every %g s",
                self.namespace,
                "nobody (released just now)"
                if holder is None
                else f"{holder['name'] or 'a session'} (server pid {holder['pid']})",
                self._poll_s,
            )
            self._holder = holder
        return False

    async def _connect(self) -> Any:
        conn = await asyncpg.connect(
            self._dsn,
            timeout=_CONNECT_TIMEOUT_S,
            server_settings={"application_name": self.application_name, **KEEPALIVES},
        )
        self._terminated.clear()
        conn.add_termination_listener(self._on_terminated)
        self._conn = conn
        await ensure_lease_table(conn)  # where its epochs are taken (service.lease.fence)
        return conn

    def _on_terminated(self, conn: Any) -> None:
        # Only the current connection's end counts: a late call for one already dropped
        # would otherwise leave the event set and make wait_lost() spin.
        if conn is self._conn:
            self._terminated.set()

    async def wait_lost(self) -> str:
        conn = self._conn
        if conn is None or self._role != "leader":
            raise RuntimeError("wait_lost() needs a held lease")
        while True:
            await self._pause(self._check_s)
            reason = await self._check(conn)
            if reason is not None:
                break
        self._become("standby")
        self.losses += 1
        self.last_lost_reason = reason
        self._drop_connection()
        log.error("lease %s: lost: %s", self.namespace, reason)
        return reason

    async def _pause(self, seconds: float) -> None:
        """``seconds`` on the clock, or less if the connection terminates meanwhile."""
        sleeper = asyncio.ensure_future(self._clock.sleep(seconds))
        terminated = asyncio.ensure_future(self._terminated.wait())
        fenced = asyncio.ensure_future(self.fence.fenced.wait())
        try:
            await asyncio.wait({sleeper, terminated, fenced}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            terminated.cancel()
            fenced.cancel()

    async def _check(self, conn: Any) -> str | None:
        """Why the lease is lost, or None while this session still holds the lock."""
        if self.fence.fenced.is_set():
            return "a write was fenced: another instance took the lease over"
        if conn.is_closed():
            return "its PostgreSQL connection was closed"
        try:
            held = await conn.fetchval(_HOLDS, *self._tag, timeout=self._timeout_s)
        except Exception as exc:
            return f"its PostgreSQL connection failed ({describe_error(exc)})"
        if not held:
            return "PostgreSQL no longer shows the lock held by this session"
        return None

    def _become(self, role: LeaseRole) -> None:
        self._role = role
        self._since = self._clock.now()

    def _drop_connection(self) -> None:
        """Close at once, without a goodbye: the socket may be dead already."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()

    async def stop(self) -> None:
        """Close the session, which releases the lock; a standby takes over within its
        poll interval."""
        conn, self._conn = self._conn, None
        was_leader = self._role == "leader"
        self._become("standby")
        if conn is None or conn.is_closed():
            return
        try:
            await conn.close(timeout=_CLOSE_TIMEOUT_S)
        except Exception:
            conn.terminate()
        if was_leader:
            log.info("lease %s: released", self.namespace)
