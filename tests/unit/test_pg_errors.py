"""PostgreSQL failures onto the error tree: one classification for every PostgreSQL user."""

from __future__ import annotations

import asyncpg
import pytest

from service.core.errors import PermanentError, TransientError
from service.postgres.errors import pg_error, pg_error_kind


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (asyncpg.SerializationError("could not serialize"), "transient"),  # 40001
        (asyncpg.CannotConnectNowError("starting up"), "transient"),  # 57P03
        (asyncpg.InvalidCachedStatementError("plan changed"), "transient"),  # 0A000
        (ConnectionRefusedError(111, "refused"), "transient"),
        (TimeoutError(), "transient"),
        (asyncpg.InterfaceError("connection is closed"), "transient"),
        (asyncpg.InvalidPasswordError("bad password"), "login"),  # 28P01
        (asyncpg.InvalidCatalogNameError("no such database"), "login"),  # 3D000
        (asyncpg.CharacterNotInRepertoireError("NUL"), "data"),  # 22021
        (asyncpg.UniqueViolationError("duplicate"), "data"),  # 23505
        (asyncpg.exceptions.DataError("cannot encode"), "data"),  # client side
        (asyncpg.UndefinedTableError("no table"), "schema"),  # 42P01
        (asyncpg.InsufficientPrivilegeError("denied"), "schema"),  # 42501
        (asyncpg.InternalServerError("bug"), "other"),  # XX000
        (RuntimeError("surprise"), "other"),
    ],
)
def test_kinds_follow_the_sqlstate_class_or_the_socket(exc: BaseException, kind: str) -> None:
    assert pg_error_kind(exc) == kind


def test_a_lost_server_is_transient_and_says_unreachable() -> None:
    err = pg_error(ConnectionRefusedError(111, "Connect call failed"), "output start")
    assert isinstance(err, TransientError)
    assert str(err) == (
        "PostgreSQL unreachable (output start): ConnectionRefusedError: [Errno 111] "
        "Connect call failed"
    )


def test_a_transient_sqlstate_is_named() -> None:
    err = pg_error(asyncpg.DeadlockDetectedError("deadlock"), "write of t")
    assert isinstance(err, TransientError)
    assert "(write of t, SQLSTATE 40P01)" in str(err)


def test_a_refused_login_says_what_to_check() -> None:
    err = pg_error(asyncpg.InvalidAuthorizationSpecificationError('role "x"'), "output start")
    assert isinstance(err, PermanentError)
    assert "SQLSTATE 28000" in str(err) and "POSTGRES_DSN" in str(err)


def test_the_schema_hint_is_given_for_schema_errors_only() -> None:
    hint = "run `vabus-aggregator migrate`"
    schema = pg_error(asyncpg.UndefinedTableError("no table"), "write of t", schema_hint=hint)
    data = pg_error(asyncpg.UniqueViolationError("dup"), "write of t", schema_hint=hint)
    assert isinstance(schema, PermanentError) and isinstance(data, PermanentError)
    assert str(schema) == (
        "PostgreSQL refused the request (write of t, SQLSTATE 42P01): UndefinedTableError: "
        "no table; run `vabus-aggregator migrate`"
    )
    assert "23505" in str(data) and hint not in str(data)


def test_anything_else_is_permanent() -> None:
    err = pg_error(RuntimeError("boom"), "checkpoints in t")
    assert isinstance(err, PermanentError)
    assert str(err) == "PostgreSQL request failed (checkpoints in t): RuntimeError: boom"
