"""Fixtures shared by the integration tests against the real PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from service.config import PostgresConfig, Secret


@pytest.fixture
async def conn(postgres_dsn: str) -> AsyncIterator[Any]:
    """A connection of the test's own, for set-up and for reading back what was written."""
    c = await asyncpg.connect(postgres_dsn)
    yield c
    await c.close()


@pytest.fixture
def pg_outputs(postgres_dsn: str, unique_name: str) -> PostgresConfig:
    """PostgreSQL outputs of the test's own: tables ``<unique>_agg`` and ``<unique>_dlq``."""
    return PostgresConfig(
        dsn=Secret(postgres_dsn),
        table=f"{unique_name}_agg",
        dead_letter_table=f"{unique_name}_dlq",
        pool_max_size=2,
    )
