"""``vabus-aggregator demo``: the whole job on an embedded stack, with live progress.

Starts a Kafka-protocol broker (tansu) and PostgreSQL from pip packages, the VaBus
emulator with a load generator as the bus, and the service writing to both outputs.
Ctrl-C stops everything (children die with us even on a hard kill).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from pathlib import Path

from service.app import Service, build_service, install_signal_handlers
from service.config import load_config
from service.dev.devstack import DevStack
from service.dev.emulator import Emulator
from service.dev.load import LoadGenerator
from service.metrics.collector import MetricsCollector
from service.ops.logs import setup_logging

__all__ = ["main"]

log = logging.getLogger(__name__)


def main(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    setup_logging("WARNING", "text")  # keep the terminal for the progress line
    file_log = logging.FileHandler(workdir / "service.log")
    file_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    file_log.setLevel(logging.INFO)
    root = logging.getLogger()
    root.addHandler(file_log)
    root.setLevel(logging.INFO)
    for h in root.handlers[:1]:
        h.setLevel(logging.WARNING)
    return asyncio.run(_demo(args, workdir))


def _say(text: str) -> None:
    print(text, flush=True)


async def _demo(args: argparse.Namespace, workdir: Path) -> int:
    _say("VaBus Aggregator demo: starting an embedded Kafka broker (tansu) and PostgreSQL ...")
    async with DevStack(workdir / "stack") as stack, Emulator() as emulator:
        env = {
            **stack.env(),
            "VABUS_URL": emulator.url,
            "VABUS_WAIT": "1",
            "STORAGE_TYPE": "kafka,postgres",
            "AGGREGATION_INTERVAL": str(args.interval),
            "AGGREGATION_GRACE": "1",
            "METRICS_INTERVAL": "5",
            "HTTP_HOST": "127.0.0.1",
            "HTTP_PORT": str(args.http_port),
            "STATE_DIR": str(workdir / "state"),
        }
        config = load_config(env, dotenv=None)
        service = build_service(config)
        metrics = service.metrics
        install_signal_handlers(service)
        generator = LoadGenerator(
            emulator,
            rate=args.rate,
            names=args.names,
            seed=42,
            fixed_per_name=True,
            invalid_fraction=0.001,
            late_fraction=0.001,
            late_by_s=3 * args.interval,
        )
        _say(f"  Status page  : http://127.0.0.1:{args.http_port}/  (open it in a browser)")
        _say(f"  Kafka broker : {env['KAFKA_BOOTSTRAP_SERVERS']}  (topic {config.kafka.topic})")
        _say(f"  PostgreSQL   : {env['POSTGRES_DSN']}  (table {config.postgres.table})")
        _say(f"  VaBus        : {emulator.url}  ({args.rate:g} events/s over {args.names} names)")
        _say(f"  Service      : http://127.0.0.1:{args.http_port}/status  /metrics  /readyz")
        _say(
            f"  Windows of {args.interval:g}s; first aggregates after about {args.interval + 2:g}s."
        )
        _say("  Press Ctrl-C to stop.\n")
        async with asyncio.TaskGroup() as tasks:
            running = tasks.create_task(service.run())
            feeding = tasks.create_task(generator.run())
            showing = tasks.create_task(_progress(service, metrics))
            if args.seconds > 0:
                tasks.create_task(_stop_after(service, args.seconds))
            await asyncio.wait({running})
            feeding.cancel()
            showing.cancel()
        snap = metrics.snapshot()
        _say(
            f"\nStopped. {snap['events_received']:,} events in, "
            f"{snap['aggregates_emitted']:,} aggregates emitted, "
            f"{snap['events_rejected']:,} rejected, {snap['events_late']:,} late."
        )
        _say(
            "Query them while the demo runs (Python, no psql needed):\n"
            f"  .venv/bin/python -m service.dev.query '{env['POSTGRES_DSN']}'"
        )
    return 0


async def _stop_after(service: Service, seconds: float) -> None:
    await asyncio.sleep(seconds)
    service.request_stop()


async def _progress(service: Service, metrics: MetricsCollector) -> None:
    tty = sys.stdout.isatty()
    started = asyncio.get_running_loop().time()
    while True:
        await asyncio.sleep(1.0)
        s = metrics.snapshot()
        latest = ""
        if metrics.latest_aggregates:
            a = metrics.latest_aggregates[-1]
            latest = f" | latest {a.name} {a.agg_func}={a.value:.6g} n={a.count}"
        line = (
            f"[{asyncio.get_running_loop().time() - started:5.0f}s] "
            f"in {s['events_received']:,} ({s['events_per_second']:,.0f}/s) | "
            f"open {s['open_windows']:,} | emitted {s['aggregates_emitted']:,} | "
            f"rejected {s['events_rejected']:,} | late {s['events_late']:,}{latest}"
        )
        with contextlib.suppress(Exception):
            if tty:
                sys.stdout.write("\r\x1b[2K" + line[:200])
                sys.stdout.flush()
            else:
                print(line, flush=True)
