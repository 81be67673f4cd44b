"""Sub-commands: run, demo, check, migrate, replay, dlq, emulator (and ``worker``,
internal: one worker of ``run`` with WORKERS above 1). Exit codes: 0 ok, 1 failure, 2
invalid configuration or usage."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
from collections.abc import Sequence
from dataclasses import replace

from service.config import Config, load_config
from service.core.errors import ConfigError
from service.ops.logs import setup_logging

__all__ = ["main"]

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAIL, EXIT_CONFIG = 0, 1, 2


def _parser(command: str | None = None) -> argparse.ArgumentParser:
    """``command``: the sub-command asked for; the emulator's options are added only for
    it, so that service.dev stays out of the production import graph."""
    p = argparse.ArgumentParser(
        prog="vabus-aggregator",
        description="Aggregate VaBus events into tumbling windows; write them to Kafka/PostgreSQL.",
    )
    public = ("run", "demo", "check", "migrate", "replay", "dlq", "emulator")
    sub = p.add_subparsers(dest="command", required=True, metavar="{" + ",".join(public) + "}")
    run = sub.add_parser(
        "run", help="run the service, configured by environment variables and .env"
    )
    run.add_argument(
        "--workers",
        metavar="N",
        help="worker processes, each a member of the consumer group (sets WORKERS; default 1)",
    )
    demo = sub.add_parser(
        "demo", help="run on an embedded broker + PostgreSQL with the emulator as the bus"
    )
    demo.add_argument("--rate", type=float, default=2000.0, help="events per second (2000)")
    demo.add_argument("--names", type=int, default=20, help="distinct event names (20)")
    demo.add_argument("--interval", type=float, default=10.0, help="window seconds (10)")
    demo.add_argument("--seconds", type=float, default=0.0, help="stop after this long (0: Ctrl-C)")
    demo.add_argument("--workdir", default=".demo", help="data directory (.demo)")
    demo.add_argument("--http-port", type=int, default=8080, help="service HTTP port (8080)")
    sub.add_parser("check", help="test every configured connection; exit 0 if all are reachable")
    sub.add_parser("migrate", help="create or upgrade the PostgreSQL schema")
    rep = sub.add_parser(
        "replay", help="recompute windows from ARCHIVE_URL; write those that differ (revision + 1)"
    )
    when = "ISO-8601 with an offset, or Unix seconds"
    rep.add_argument(
        "--from", dest="since", required=True, metavar="T1", help=f"windows from: {when}"
    )
    rep.add_argument("--to", dest="until", required=True, metavar="T2", help="up to (excluded)")
    rep.add_argument("--names", metavar="PATTERN", help="a glob on event names (default: all)")
    dlq = sub.add_parser(
        "dlq", help="dead letters: `dlq replay` sends them through validation again"
    )
    dlq_sub = dlq.add_subparsers(dest="dlq_command", required=True, metavar="{replay}")
    dlq_replay = dlq_sub.add_parser(
        "replay", help="revalidate dead letters of a reason; count the accepted once"
    )
    dlq_replay.add_argument("--reason", required=True, metavar="R", help="a dead-letter reason")
    dlq_replay.add_argument("--since", metavar="T", help=f"received at or after: {when}")
    emu = sub.add_parser("emulator", help="run the VaBus HTTP emulator (protocol v1)")
    if command == "emulator":
        from service.dev.emulator import add_arguments as add_emulator_arguments

        add_emulator_arguments(emu)
    # internal: started by the supervisor of `run` with WORKERS above 1, never by hand
    worker = sub.add_parser("worker")
    worker.add_argument("--index", type=int, required=True)
    worker.add_argument("--http-fd", type=int, required=True, help="bound socket to serve on")
    worker.add_argument(
        "--shutdown-timeout",
        type=float,
        required=True,
        help="seconds for its graceful stop: the supervisor's SHUTDOWN_TIMEOUT less a margin",
    )
    return p


def _load(args: argparse.Namespace) -> Config:
    # `migrate` needs only PostgreSQL; `run` and `check` need a real bus. `run --workers`
    # goes through WORKERS, so that it is checked (and reported) like the variable.
    environ = None
    if getattr(args, "workers", None) is not None:
        environ = {**os.environ, "WORKERS": args.workers}
    config = load_config(environ, require_bus=args.command in ("run", "check", "worker"))
    if args.command == "worker":
        # the supervisor's deadline for this worker replaces SHUTDOWN_TIMEOUT, which
        # stays the operator's value for the whole WORKERS=N service
        runtime = replace(config.runtime, shutdown_timeout_s=args.shutdown_timeout)
        config = replace(config, runtime=runtime)
    return config


def main(argv: Sequence[str]) -> int:
    args = _parser(argv[0] if argv else None).parse_args(argv)
    if args.command == "emulator":
        from service.dev.emulator import main as emulator_main

        setup_logging("INFO", "text")
        return asyncio.run(emulator_main(args))
    if args.command == "demo":
        from service.dev.demo import main as demo_main

        return demo_main(args)
    try:
        config = _load(args)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "worker":
        from service.app import run
        from service.workers.supervisor import ORPHAN_SIGNAL

        setup_logging(config.log.level, config.log.format, worker=args.index)
        sock = socket.socket(fileno=args.http_fd)
        asyncio.run(run(config, http_socket=sock, orphan_signal=ORPHAN_SIGNAL, worker=args.index))
        return EXIT_OK
    setup_logging(config.log.level, config.log.format)
    if args.command == "run":
        log.info("configuration: %s", config.redacted())
        if config.runtime.workers > 1:
            from service.workers import run_supervised

            asyncio.run(run_supervised(config))
            return EXIT_OK
        from service.app import run

        asyncio.run(run(config))
        return EXIT_OK
    if args.command == "check":
        from service.commands import check_all

        return asyncio.run(check_all(config))
    if args.command == "migrate":
        from service.commands import migrate

        return asyncio.run(migrate(config))
    if args.command == "replay":
        from service.replay.cli import replay_command

        return replay_command(config, args.since, args.until, args.names)
    if args.command == "dlq":
        from service.dlq.cli import dlq_command

        return dlq_command(config, args.reason, args.since)
    return EXIT_CONFIG
