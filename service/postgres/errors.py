"""What a PostgreSQL failure means, decided in one place for the sink, the checkpoint
store and the migration: asyncpg's and the socket's errors by SQLSTATE class, and their
form in the service's error tree."""

from __future__ import annotations

from typing import Final, Literal

import asyncpg

from service.core.errors import PermanentError, TransientError, describe_error

__all__ = ["PgErrorKind", "pg_error", "pg_error_kind"]

PgErrorKind = Literal["transient", "login", "data", "schema", "other"]

# SQLSTATE classes where trying again later can succeed: connection exceptions,
# transaction rollback (serialization failure, deadlock), insufficient resources,
# object not in prerequisite state (lock not available), operator intervention
# (admin shutdown, cannot connect now, query cancelled) and system errors (I/O).
_TRANSIENT_CLASSES: Final = frozenset({"08", "40", "53", "55", "57", "58"})
_DATA_CLASSES: Final = frozenset({"22", "23"})
_LOGIN_CLASSES: Final = frozenset({"28", "3D"})  # authorization; no such database


def pg_error_kind(exc: BaseException) -> PgErrorKind:
    """What an exception from asyncpg means for the caller.

    ``transient``: the server or connection is unavailable, retry later; ``login``: the
    user, password or database name is refused; ``data``: a row's value is refused (find
    it and dead-letter it); ``schema``: tables, columns or privileges do not match (an
    operator must act); ``other``: anything else.
    """
    if isinstance(exc, asyncpg.InvalidCachedStatementError):
        return "transient"  # the table changed under a prepared statement; a retry re-prepares
    sqlstate = getattr(exc, "sqlstate", None)
    if isinstance(exc, asyncpg.PostgresError) and isinstance(sqlstate, str):
        if sqlstate[:2] in _TRANSIENT_CLASSES:
            return "transient"
        if sqlstate[:2] in _LOGIN_CLASSES:
            return "login"
        if sqlstate[:2] in _DATA_CLASSES:
            return "data"
        if sqlstate[:2] == "42":
            return "schema"
        return "other"
    if isinstance(exc, asyncpg.InterfaceError) and isinstance(exc, ValueError):
        return "data"  # asyncpg's client-side DataError: a value it cannot encode
    if isinstance(exc, asyncpg.InterfaceError | OSError | TimeoutError):
        # connection lost or closed, refused, reset, or no answer in time
        return "transient"
    return "other"


def pg_error(
    exc: BaseException, operation: str, *, schema_hint: str = ""
) -> TransientError | PermanentError:
    """``exc``, raised by PostgreSQL during ``operation`` (a few words: "write to t"),
    as a :class:`TransientError` when retrying can help, else a :class:`PermanentError`
    whose message says what to check; ``schema_hint`` is added to schema errors."""
    kind = pg_error_kind(exc)
    sqlstate = getattr(exc, "sqlstate", None)
    state = f", SQLSTATE {sqlstate}" if isinstance(sqlstate, str) else ""
    detail = describe_error(exc)
    if kind == "transient":
        if state:
            return TransientError(f"PostgreSQL unavailable ({operation}{state}): {detail}")
        return TransientError(f"PostgreSQL unreachable ({operation}): {detail}")
    if kind == "login":
        return PermanentError(
            f"PostgreSQL refused the login ({operation}{state}): {detail}; check the user, "
            "password and database name in POSTGRES_DSN"
        )
    hint = f"; {schema_hint}" if kind == "schema" and schema_hint else ""
    verdict = "refused the request" if state else "request failed"
    return PermanentError(f"PostgreSQL {verdict} ({operation}{state}): {detail}{hint}")
