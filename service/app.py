"""Wiring and lifecycle: build the components, run them in one TaskGroup, drain on stop.

Shutdown is a numbered drain under one deadline (SHUTDOWN_TIMEOUT):
1 stop intake -> 2 drain the hub -> 3 checkpoint open windows, flush outputs and commit
positions -> 4 final metrics -> 5 close everything (reverse order of start).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from functools import partial
from typing import TYPE_CHECKING, Any

from service.aggregation.aggregator import EventAggregator
from service.aggregation.source_marks import SourceMarks
from service.aggregation.stage import AggregatorStage
from service.bus.base import Bus, BusItem
from service.bus.leased import LeasedBus
from service.bus.multi import MultiBus
from service.checkpoints.base import CheckpointStore
from service.config import Config
from service.core.clock import Clock, SystemClock
from service.core.errors import TransientError
from service.core.lifecycle import unless_stopped
from service.core.retry import Backoff, output_backoff, retry
from service.lease.base import Lease
from service.metrics.collector import MetricsCollector
from service.ops.sources import source_view, sources_status
from service.ops.web import WebServer, build_web_app
from service.pipeline.flow import INPUT, OUTPUT, CheckpointRequest, Tick
from service.pipeline.hub import EventHub
from service.pipeline.sender import DataSender, ReadBackSink, SharedTransaction
from service.sinks.base import Sink
from service.wiring import build_bus, build_lease, build_outputs, build_router

if TYPE_CHECKING:  # pyarrow is imported only when ARCHIVE_URL is set
    from service.archive.writer import ArchiveWriter

__all__ = ["Service", "build_service", "run"]

log = logging.getLogger(__name__)

TICK_S = 1.0
_CLOSE_RESERVE_S = 2.0  # of SHUTDOWN_TIMEOUT, kept for closing connections (phase 5)
_MIN_CLOSE_S = 0.5  # closing always gets at least this, even past the deadline


_START_BACKOFF = Backoff(initial_s=0.5, maximum_s=15.0)


async def start_with_retry(name: str, start: Callable[[], Awaitable[None]], clock: Clock) -> None:
    """A dependency that is down at start-up delays us, never kills us: a
    :class:`TransientError` is retried for ever (a stop request cancels the start); any
    other error fails the start."""
    await retry(start, name=f"starting {name}", backoff=_START_BACKOFF, clock=clock)


class Service:
    """One running aggregator. Tests build it with fakes; ``run`` builds it from config."""

    def __init__(
        self,
        config: Config,
        *,
        bus: Bus,
        sinks: list[Sink],
        store: CheckpointStore,
        metrics: MetricsCollector,
        clock: Clock,
        serve_http: bool = True,
        http_socket: socket.socket | None = None,
        shared_transaction: SharedTransaction | None = None,
        read_back: Sequence[ReadBackSink] = (),
        lease: Lease | None = None,
        archive: ArchiveWriter | None = None,
    ) -> None:
        self.config = config
        router = build_router(config)
        self.routes = [] if router is None else router.describe()
        self.archive = archive  # ARCHIVE_URL: accepted events as Parquet (docs/archive.md)
        self.bus = bus
        self.sinks = sinks
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self.serve_http = serve_http
        self.http_socket = http_socket  # a worker serves on the socket its supervisor bound
        self.hub = EventHub(metrics, clock)
        self.aggregator = EventAggregator(
            config.aggregation,
            metrics,
            clock,
            max_message_bytes=config.bus.max_message_bytes,
            max_events_per_message=config.bus.max_events_per_message,
            archive=archive is not None,
            marks=SourceMarks(config.routes),  # rules with source, several sources
        )
        runtime = config.runtime
        self.sender = DataSender(
            sinks,
            store,
            bus.commit,
            metrics,
            clock,
            batch_size=runtime.sink_batch_size,
            backoff=output_backoff(
                runtime.retry_backoff, runtime.retry_initial_s, runtime.retry_max_s
            ),
            shared_transaction=shared_transaction,
            read_back=read_back,
            archive=archive,
        )
        stage = AggregatorStage(
            self.aggregator,
            partial(self.hub.publish, OUTPUT),
            clock,
            config.runtime.checkpoint_interval_s,
            rewind=bus.rewind,
        )
        q = config.runtime.queue_size
        self.hub.subscribe(INPUT, "aggregator", stage.handle, maxsize=q, max_batch=16)
        self.hub.subscribe(OUTPUT, "sender", self.sender.handle, maxsize=q, max_batch=256)
        depths = bus.queue_depths if isinstance(bus, MultiBus) else dict
        metrics.set_source_view(
            source_view(len(config.sources), self.aggregator.partitions, depths)
        )
        self.stopping = asyncio.Event()
        self.web: WebServer | None = None
        self.phase = "starting"
        self.lease = lease  # guards a single-reader bus (read only while held), or None

    def request_stop(self) -> None:
        """What a signal does: only set an event."""
        self.stopping.set()

    def status(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "bus": {"transport": self.bus.name, "url": self._bus_urls()},
            "sources": sources_status(self.config, self.metrics),  # contract §12.8
            "lease": None if self.lease is None else self.lease.role,
            "lease_detail": None if self.lease is None else self.lease.describe(),
            "outputs": [s.name for s in self.sinks],
            "routes": self.routes,  # ROUTES_FILE's rules and where each writes; [] none
            "archive": None if self.archive is None else self.config.archive.url,
            "degraded_outputs": dict(self.sender.degraded),
            "watermark": self.aggregator.watermark,
            "open_windows": self.aggregator.open_windows,
            "oldest_open_window_start": self.aggregator.oldest_window_start,
            "resolutions": self.aggregator.resolutions,  # window lengths written (12.6)
            "open_rollup_windows": self.aggregator.rollup_partials,
            "partitions": self.aggregator.partitions(),
            "subscribers": {
                name: {
                    "processed": st.processed,
                    "errors": st.errors,
                    "dropped": st.dropped,
                    "depth": st.depth,
                }
                for name, st in self.hub.stats().items()
            },
            "config": self.config.redacted(),
        }

    def _bus_urls(self) -> str:
        return " ".join(source.url for source in self.config.sources)

    async def check_progress(self) -> None:
        """Readiness: no assigned partition sits on unread data without delivering any of
        it for READINESS_STALL_TIMEOUT (a hung fetch, a stuck stage, an output holding
        everything up). Raises naming each stalled partition."""
        limit = self.config.runtime.readiness_stall_s
        stalled = [
            f"{p} ({v['lag']} unread, nothing delivered for {v['seconds_since_message']:.0f}s)"
            for p, v in self.aggregator.partitions().items()
            if v["lag"] and v["seconds_since_message"] >= limit
        ]
        if stalled:
            raise TransientError(f"stalled partitions: {', '.join(stalled)}")

    def readiness_details(self) -> dict[str, Any]:
        """What /readyz adds about the lease. A standby is *ready* (healthy, its outputs
        reachable, able to take over), it just does not read: a 503 would keep a rolling
        update waiting for a pod that by design never reads while the old one lives."""
        lease = self.lease
        if lease is None:
            return {}
        if lease.role == "leader":
            # the bus reads while the lease is held, until the drain stops intake
            return {"lease": "leader", "reading": self.phase == "running"}
        error = lease.describe().get("error")
        reason = (
            f"standby: cannot compete for the lease: {error}"
            if error
            else "standby: another instance holds the lease"
        )
        return {
            "lease": "standby",
            "reading": False,
            "reason": f"{reason} on {lease.namespace}; this one takes over when it is released",
        }

    async def run(self) -> None:
        """Start, run until stopped, drain, close; everything after the stop request fits
        in one ``SHUTDOWN_TIMEOUT``: the drain (phases 1-4) gets the deadline less a
        reserve for closing connections (phase 5), which gets what is left. A dependency
        that is down cannot hold the process past it, not even while it is starting."""
        rt = self.config.runtime
        loop = asyncio.get_running_loop()
        stack = AsyncExitStack()
        deadline: float | None = None
        try:
            # a permanent start-up failure propagates
            if not await unless_stopped(self._start(stack), self.stopping):
                log.info("stop requested while starting; not started")
                return
            self.phase = "running"
            log.info(
                "running: bus=%s outputs=%s",
                self._bus_urls(),
                ",".join(s.name for s in self.sinks),
            )
            async with asyncio.TaskGroup() as tg:
                intake = tg.create_task(self.bus.run(self._emit, self.store.load), name="intake")
                ticker = tg.create_task(self._tick_forever(), name="ticker")
                reporter = tg.create_task(
                    self.metrics.publish_forever(self.bus.send_metrics, rt.metrics_interval_s),
                    name="metrics",
                )
                stop_wait = tg.create_task(self.stopping.wait(), name="stop-wait")
                await asyncio.wait({intake, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
                stop_wait.cancel()
                deadline = loop.time() + rt.shutdown_timeout_s
                reserve = min(_CLOSE_RESERVE_S, rt.shutdown_timeout_s * 0.25)
                try:
                    async with asyncio.timeout_at(deadline - reserve):
                        await self._drain(intake)
                except TimeoutError:
                    log.error(
                        "shutdown did not finish within %.0fs (phase %s); exiting anyway",
                        rt.shutdown_timeout_s,
                        self.phase,
                    )
                ticker.cancel()
                reporter.cancel()
                intake.cancel()
        finally:
            self.phase = "5/5 close"
            log.info("shutdown 5/5: closing connections")
            if deadline is None:  # stopped while starting, or failed: a deadline of its own
                deadline = loop.time() + rt.shutdown_timeout_s
            try:
                async with asyncio.timeout_at(max(deadline, loop.time() + _MIN_CLOSE_S)):
                    await stack.aclose()
            except TimeoutError:
                log.error(
                    "closing connections did not finish by the shutdown deadline; "
                    "exiting anyway (phase 5/5)"
                )

    async def _start(self, stack: AsyncExitStack) -> None:
        """Connect everything (each retried while unreachable); what started is closed
        by ``stack``, in reverse order."""
        if self.serve_http:
            failing_s = self.config.runtime.readiness_output_failing_s
            checks = {
                "bus": self.bus.check,
                "partitions": self.check_progress,
                **{s.name: self.sender.readiness_check(s, failing_s) for s in self.sinks},
                "checkpoints": self.sender.store_readiness_check(failing_s),
            }
            if self.archive is not None:
                checks[self.archive.name] = self.sender.readiness_check(self.archive, failing_s)
            app = build_web_app(
                self.metrics,
                checks,
                self.status,
                readiness_details=self.readiness_details,
                auth_token=self.config.http.auth_token.value,
            )
            self.web = WebServer(
                self.config.http.host, self.config.http.port, app, sock=self.http_socket
            )
            await self.web.start()
            stack.push_async_callback(self.web.stop)
        for sink in self.sinks:
            stack.push_async_callback(sink.stop)  # before start: a half-started sink closes too
            await start_with_retry(f"output {sink.name}", sink.start, self.clock)
        if self.archive is not None:
            stack.push_async_callback(self.archive.stop)
            await start_with_retry("archive", self.archive.start, self.clock)
        stack.push_async_callback(self.store.stop)
        await start_with_retry("checkpoint store", self.store.start, self.clock)
        stack.push_async_callback(self.bus.stop)
        await start_with_retry(f"bus {self.bus.name}", self.bus.start, self.clock)
        await self.hub.start()
        stack.push_async_callback(self.hub.stop)

    async def _emit(self, item: BusItem) -> None:
        await self.hub.publish(INPUT, item)

    async def _tick_forever(self) -> None:
        while True:
            await self.clock.sleep(TICK_S)
            await self.hub.publish(INPUT, Tick())

    async def _drain(self, intake: asyncio.Task[None]) -> None:
        self.phase = "1/5 stop intake"
        log.info("shutdown 1/5: stopping intake")
        self.bus.stop_intake()
        with contextlib.suppress(asyncio.CancelledError):
            await intake
        self.phase = "2/5 drain"
        log.info("shutdown 2/5: draining queued batches")
        await self.hub.drain()
        self.phase = "3/5 checkpoint"
        log.info(
            "shutdown 3/5: checkpointing %d open window(s), flushing outputs, committing",
            self.aggregator.open_windows,
        )
        request = CheckpointRequest()
        await self.hub.publish(INPUT, request)
        try:
            await request.done.wait()
        except asyncio.CancelledError:
            # the deadline: connections close now, a save not started must not start
            request.done.abandon()
            raise
        self.phase = "4/5 final metrics"
        log.info("shutdown 4/5: final metrics")
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2):
                await self.bus.send_metrics(self.metrics.to_bus_metrics())


def install_signal_handlers(
    service: Service, *, orphan_signal: signal.Signals | None = None
) -> None:
    """First SIGTERM/SIGINT: graceful stop. Second: exit at once.

    ``orphan_signal`` (a worker of WORKERS=N): the signal its death pact sends when the
    supervisor dies. It may come several times (once per thread of the dying
    supervisor), so it only ever asks for the graceful stop.
    """
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        if service.stopping.is_set():
            log.warning("second %s: exiting immediately", sig.name)
            os._exit(130)
        log.info("%s received: shutting down gracefully", sig.name)
        service.request_stop()

    def on_orphaned() -> None:
        if not service.stopping.is_set():
            log.warning("the supervisor is gone: shutting down gracefully")
        service.request_stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    if orphan_signal is not None:
        loop.add_signal_handler(orphan_signal, on_orphaned)


def build_service(
    config: Config,
    clock: Clock | None = None,
    *,
    http_socket: socket.socket | None = None,
    worker: int | None = None,
) -> Service:
    """The service with the bus, outputs and checkpoint store the configuration names."""
    clock = clock or SystemClock()
    metrics = MetricsCollector(clock, {} if worker is None else {"worker": str(worker)})
    lease = build_lease(config, clock)
    outputs = build_outputs(config, metrics, clock, None if lease is None else lease.fence)
    bus = build_bus(config, metrics, clock)
    if lease is not None:
        bus = LeasedBus(bus, lease, metrics)
    archive = None
    if config.archive.enabled:
        from service.archive.writer import build_archive

        archive = build_archive(config.archive, metrics)
    return Service(
        config,
        bus=bus,
        sinks=outputs.sinks,
        store=outputs.store,
        metrics=metrics,
        clock=clock,
        http_socket=http_socket,
        shared_transaction=outputs.shared_transaction,
        read_back=outputs.read_back,
        lease=lease,
        archive=archive,
    )


async def run(
    config: Config,
    *,
    clock: Clock | None = None,
    http_socket: socket.socket | None = None,
    orphan_signal: signal.Signals | None = None,
    worker: int | None = None,
) -> None:
    """Run the service from configuration until SIGTERM/SIGINT. Worker ``worker`` of
    WORKERS=N serves HTTP on ``http_socket`` (bound by its supervisor) instead of
    HTTP_HOST:HTTP_PORT, stops gracefully on ``orphan_signal`` too, and labels the
    metrics it sends to the bus with its index."""
    service = build_service(config, clock, http_socket=http_socket, worker=worker)
    install_signal_handlers(service, orphan_signal=orphan_signal)
    await service.run()
