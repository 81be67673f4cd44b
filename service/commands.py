"""``check`` and ``migrate``: one-shot operations on the configured connections."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from service.config import Config
from service.core.clock import SystemClock
from service.metrics.collector import MetricsCollector
from service.wiring import build_bus, build_outputs

__all__ = ["check_all", "migrate"]

log = logging.getLogger(__name__)


async def _probe(name: str, start: object, check: object) -> tuple[str, str | None]:
    try:
        async with asyncio.timeout(15):
            await start()  # type: ignore[operator]
            await check()  # type: ignore[operator]
    except Exception as exc:
        return name, f"{type(exc).__name__}: {exc}"
    return name, None


async def check_all(config: Config) -> int:
    """Print one line per connection; 0 when every one is reachable."""
    metrics = MetricsCollector()
    clock = SystemClock()
    bus = build_bus(config, metrics, clock)
    sinks = build_outputs(config, metrics, clock).sinks
    urls = " ".join(source.url for source in config.sources)  # MultiBus names a failing one
    targets: list[tuple[str, Any]] = [(f"bus {bus.name} {urls}", bus)]
    targets += [(f"output {s.name}", s) for s in sinks]
    if config.archive.enabled:  # ARCHIVE_URL: its directory or bucket (pyarrow only then)
        from service.archive.writer import build_archive

        targets.append((f"archive {config.archive.url}", build_archive(config.archive, metrics)))
    failed = 0
    for label, comp in targets:
        name, error = await _probe(label, comp.start, comp.check)
        try:
            await comp.stop()
        except Exception as exc:
            log.debug("stopping %s: %s", name, exc)
        if error is None:
            print(f"ok    {name}")
        else:
            failed += 1
            print(f"FAIL  {name}: {error}")
    return 0 if failed == 0 else 1


async def migrate(config: Config) -> int:
    if not config.postgres.dsn:
        print("migrate: POSTGRES_DSN is not set", flush=True)
        return 2
    from service.postgres.schema import migrate as run_migration

    routed = config.routes.tables()  # ROUTES_FILE's own tables, created alike
    await run_migration(
        config.postgres.dsn.value,
        config.postgres.table,
        config.postgres.dead_letter_table,
        route_tables=routed,
    )
    tables = ", ".join(dict.fromkeys([config.postgres.table, *routed]))
    print(f"schema ready: tables {tables}, {config.postgres.dead_letter_table}")
    return 0
