"""Session fixtures for the real broker and PostgreSQL.

``kafka_bootstrap`` and ``postgres_dsn`` use ``TEST_KAFKA_BOOTSTRAP_SERVERS`` /
``TEST_POSTGRES_DSN`` when set; otherwise they start the embedded server once per
session and stop it at the end. The fixtures are synchronous and drive the async
start/stop on a private event loop, so they work with pytest-asyncio's
function-scoped loops (the devstack keeps no loop-bound state).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from uuid import uuid4

import pytest

if TYPE_CHECKING:
    from service.dev.postgres_server import EmbeddedPostgres

T = TypeVar("T")


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion on a private loop that is never made current."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()


@pytest.fixture(scope="session")
def devstack_dir() -> Iterator[Path]:
    """A private directory for embedded servers' data and logs.

    Not under pytest's basetemp: that directory is reset to mode 0700 by every new
    pytest session, which would lock out PostgreSQL's unprivileged user while it runs.
    """
    path = Path(tempfile.mkdtemp(prefix="vabus-devstack-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def kafka_bootstrap(devstack_dir: Path) -> Iterator[str]:
    """``host:port`` of a Kafka-protocol broker for the whole session."""
    external = os.environ.get("TEST_KAFKA_BOOTSTRAP_SERVERS")
    if external:
        yield external
        return
    from service.dev.broker import EmbeddedKafka

    broker = EmbeddedKafka(devstack_dir / "kafka")
    _run(broker.start())
    try:
        yield broker.bootstrap_servers
    finally:
        _run(broker.stop())


@pytest.fixture(scope="session")
def postgres_dsn(devstack_dir: Path) -> Iterator[str]:
    """A DSN (``postgresql://postgres@127.0.0.1:PORT/postgres``) for the whole session."""
    external = os.environ.get("TEST_POSTGRES_DSN")
    if external:
        yield external
        return
    from service.dev.postgres_server import EmbeddedPostgres

    server = EmbeddedPostgres(devstack_dir / "pgdata")
    _run(server.start())
    try:
        yield server.dsn
    finally:
        _run(server.stop())


@pytest.fixture
def pg_restartable(devstack_dir: Path) -> Iterator[EmbeddedPostgres]:
    """A started PostgreSQL of this test's own, which the test may ``stop()`` and ``start()``.

    Skipped when ``TEST_POSTGRES_DSN`` is set: an external server cannot be restarted.
    """
    if os.environ.get("TEST_POSTGRES_DSN"):
        pytest.skip("TEST_POSTGRES_DSN is set; an external PostgreSQL cannot be restarted")
    from service.dev.postgres_server import EmbeddedPostgres

    data_dir = devstack_dir / f"pg-{uuid4().hex[:8]}"
    server = EmbeddedPostgres(data_dir)
    _run(server.start())
    try:
        yield server
    finally:
        _run(server.stop())
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture
def unique_name() -> str:
    """A short name unique to this test, valid as a Kafka topic and a SQL identifier."""
    return f"t{uuid4().hex[:10]}"
