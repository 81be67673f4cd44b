"""The embedded dev stack: a Kafka-protocol broker (tansu) and PostgreSQL from pip packages.

Used by ``vabus-aggregator demo``, the test fixtures and the benchmarks. Both servers
listen on free loopback ports and run as direct children of this process, which none of
them may outlive (``service/dev/children.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import tempfile
from contextlib import AsyncExitStack
from pathlib import Path

from service.core.lifecycle import AsyncResource
from service.dev.broker import EmbeddedKafka
from service.dev.postgres_server import EmbeddedPostgres

__all__ = ["DevStack"]


class DevStack(AsyncResource):
    """Broker and PostgreSQL together under ``work_dir``; stopped in reverse start order."""

    def __init__(
        self,
        work_dir: Path,
        *,
        kafka: bool = True,
        postgres: bool = True,
        kafka_storage_url: str | None = None,
    ) -> None:
        work_dir = Path(work_dir)
        self.kafka = (
            EmbeddedKafka(work_dir / "kafka", storage_url=kafka_storage_url) if kafka else None
        )
        self.postgres = EmbeddedPostgres(work_dir / "pgdata") if postgres else None
        self._exit_stack: AsyncExitStack | None = None

    async def start(self) -> None:
        if self._exit_stack is not None:
            return
        async with AsyncExitStack() as stack:
            for server in (self.kafka, self.postgres):
                if server is not None:
                    await stack.enter_async_context(server)
            self._exit_stack = stack.pop_all()

    async def stop(self) -> None:
        stack, self._exit_stack = self._exit_stack, None
        if stack is not None:
            await stack.aclose()

    def env(self) -> dict[str, str]:
        """The variables that point the service at the started servers."""
        env: dict[str, str] = {}
        if self.kafka is not None:
            env["KAFKA_BOOTSTRAP_SERVERS"] = self.kafka.bootstrap_servers
        if self.postgres is not None:
            env["POSTGRES_DSN"] = self.postgres.dsn
        return env

    def pids(self) -> list[int]:
        """PIDs of the server processes this stack started directly (not their children)."""
        servers = (self.kafka, self.postgres)
        return [s.pid for s in servers if s is not None and s.pid is not None]


async def _serve(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    with tempfile.TemporaryDirectory(prefix="vabus-devstack-") as tmp:
        work_dir = Path(args.work_dir) if args.work_dir else Path(tmp)
        async with DevStack(
            work_dir, kafka=not args.no_kafka, postgres=not args.no_postgres
        ) as stack:
            for name, value in stack.env().items():
                print(f"export {name}={value}", flush=True)
            print(f"# data and logs in {work_dir}; Ctrl-C stops everything", flush=True)
            await stop.wait()


def main(argv: list[str] | None = None) -> None:
    """``python -m service.dev.devstack``: start the stack, print its variables, wait for Ctrl-C."""
    parser = argparse.ArgumentParser(
        prog="python -m service.dev.devstack", description=main.__doc__
    )
    parser.add_argument("--work-dir", help="keep data and logs here (default: a temp dir)")
    parser.add_argument("--no-kafka", action="store_true", help="start only PostgreSQL")
    parser.add_argument("--no-postgres", action="store_true", help="start only the broker")
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    asyncio.run(_serve(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
