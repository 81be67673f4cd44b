"""The supervisor of WORKERS=N: N worker processes under one command.

Each worker is a whole service (``python -m service worker --index I --http-fd FD``) and
a member of the Kafka consumer group; it reads the same environment and ``.env`` as the
supervisor. The supervisor binds each worker's HTTP socket on 127.0.0.1, port 0, and
hands it over (``pass_fds``): the port is known before the worker starts and nothing can
take it in between. It never listens on it itself, so a worker that is not up yet
refuses connections instead of leaving them hanging.

- A worker that exits while the supervisor runs is started again after
  ``RESTART_BACKOFF.delay(n)``, n counting the exits in a row of that worker that came
  within ``STABLE_S`` of its start; every exit and restart is logged. The others go on.
- SIGTERM/SIGINT: SIGTERM to every worker, which then drains as a single service does,
  under a deadline of its own that ends ``_WORKER_MARGIN_S`` before the supervisor's
  ``SHUTDOWN_TIMEOUT`` (handed over as the worker's ``--shutdown-timeout``, see
  :func:`worker_command`); a worker still running when the supervisor's deadline (less
  ``_KILL_RESERVE_S``) comes is killed. Exit 0. A second signal kills every worker and
  exits 130 at once.
- No worker outlives the supervisor. Workers have their own process group, so a
  terminal's Ctrl-C reaches only the supervisor (which stops them once, in order), and a
  death pact (``service/workers/child_process.py``): when the supervisor dies, even by
  ``kill -9``, each worker receives ``ORPHAN_SIGNAL`` and stops gracefully on its own.
  Not SIGTERM: the kernel sends the pact's signal once per thread of the dying parent,
  and a second SIGTERM would make the worker exit at once, skipping its drain.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from typing import Any, Final

from service.config import Config
from service.core.clock import Clock, SystemClock
from service.core.retry import Backoff, sleep_unless_stopped
from service.ops.web import WebServer
from service.workers.child_process import death_pact
from service.workers.slot import WorkerExit, WorkerSlot, describe_exit
from service.workers.surface import WorkerClient, build_surface_app

__all__ = [
    "ORPHAN_SIGNAL",
    "RESTART_BACKOFF",
    "STABLE_S",
    "Supervisor",
    "WorkerCommand",
    "run_supervised",
]

log = logging.getLogger(__name__)

RESTART_BACKOFF: Final = Backoff(initial_s=0.5, maximum_s=30.0)
ORPHAN_SIGNAL: Final = signal.SIGUSR1  # what a worker gets when the supervisor dies
STABLE_S: Final = 60.0  # a worker that ran this long starts the backoff afresh when it exits
_KILL_RESERVE_S: Final = 0.5  # of SHUTDOWN_TIMEOUT, for killing and reaping stragglers
_WORKER_MARGIN_S: Final = 1.0  # a worker's own deadline comes this much earlier
_KILL_WAIT_S: Final = 5.0

WorkerCommand = Callable[[int, int, float], Sequence[str]]
"""``(worker index, HTTP socket fd, shutdown timeout in s) -> argv`` of one worker."""


def worker_command(index: int, http_fd: int, shutdown_timeout_s: float) -> list[str]:
    """The worker reads everything else from the environment, as the supervisor did;
    its shutdown deadline is an argument because it is not the operator's
    SHUTDOWN_TIMEOUT: it ends earlier, so that the supervisor still has time to kill
    and reap a worker that overruns it within SHUTDOWN_TIMEOUT."""
    return [
        sys.executable,
        "-m",
        "service",
        "worker",
        "--index",
        str(index),
        "--http-fd",
        str(http_fd),
        "--shutdown-timeout",
        f"{shutdown_timeout_s:.3f}",
    ]


def _fraction(timeout_s: float, seconds: float, share: float) -> float:
    """``seconds``, but at most ``share`` of a short ``timeout_s``."""
    return min(seconds, timeout_s * share)


class Supervisor:
    """Runs ``config.runtime.workers`` workers and the HTTP surface until stopped."""

    def __init__(
        self,
        config: Config,
        *,
        clock: Clock,
        command: WorkerCommand = worker_command,
        backoff: Backoff = RESTART_BACKOFF,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self._command = command
        self._backoff = backoff
        timeout_s = config.runtime.shutdown_timeout_s
        self._worker_timeout_s = timeout_s - _fraction(timeout_s, _WORKER_MARGIN_S, 0.2)
        self._environ = {
            **(os.environ if environ is None else environ),
            "WORKERS": str(config.runtime.workers),
        }
        self._slots = [WorkerSlot(i) for i in range(config.runtime.workers)]
        self.stopping = asyncio.Event()
        self.phase = "starting"
        self.web: WebServer | None = None
        self._started_mono = self.clock.monotonic()

    # -- what the HTTP surface reads --------------------------------------------------
    @property
    def running(self) -> bool:
        return self.phase in ("running", "stopping")

    @property
    def slots(self) -> Sequence[WorkerSlot]:
        return self._slots

    def monotonic(self) -> float:
        return self.clock.monotonic()

    def status(self) -> dict[str, Any]:
        now = self.clock.monotonic()
        return {
            "phase": self.phase,
            "pid": os.getpid(),
            "uptime_seconds": round(now - self._started_mono, 3),
            "workers_configured": len(self._slots),
            "workers_alive": sum(1 for s in self._slots if s.alive),
            "restarts": sum(s.restarts for s in self._slots),
            "workers": {str(s.index): s.view(now) for s in self._slots},
        }

    # -- lifecycle ----------------------------------------------------------------------
    def request_stop(self) -> None:
        """What a signal does: only set an event."""
        self.stopping.set()

    def kill_all(self) -> None:
        for slot in self._slots:
            slot.send(signal.SIGKILL)

    async def run(self) -> None:
        """Serve HTTP, keep every worker running until stopped, then stop them all within
        SHUTDOWN_TIMEOUT. Whatever happens, no worker is left running on return."""
        async with AsyncExitStack() as stack:
            client = WorkerClient(self.config.http.auth_token.value)
            await client.start()
            stack.push_async_callback(client.stop)
            http = self.config.http
            surface = build_surface_app(self, client, http.auth_token.value)
            self.web = WebServer(http.host, http.port, surface)
            await self.web.start()
            stack.push_async_callback(self.web.stop)
            try:
                async with asyncio.TaskGroup() as tg:
                    keepers = [
                        tg.create_task(self._keep(slot), name=f"worker-{slot.index}")
                        for slot in self._slots
                    ]
                    self.phase = "running"
                    log.info("supervising %d workers", len(self._slots))
                    await self.stopping.wait()
                    await self._stop_all(keepers)
            finally:
                self.kill_all()  # only does anything after a failure of our own
                self.phase = "stopped"

    async def _stop_all(self, keepers: list[asyncio.Task[None]]) -> None:
        loop = asyncio.get_running_loop()
        timeout_s = self.config.runtime.shutdown_timeout_s
        deadline = loop.time() + timeout_s - _fraction(timeout_s, _KILL_RESERVE_S, 0.1)
        self.phase = "stopping"
        running = [s for s in self._slots if s.alive]
        log.info(
            "stopping %d worker(s) (pids %s) within %gs",
            len(running),
            ", ".join(str(s.pid) for s in running) or "-",
            timeout_s,
        )
        for slot in running:
            slot.send(signal.SIGTERM)
        _, pending = await asyncio.wait(keepers, timeout=max(0.0, deadline - loop.time()))
        if pending:
            left = [s for s in self._slots if s.alive]
            log.error(
                "worker(s) %s still running at the shutdown deadline; killing them",
                ", ".join(f"{s.index} (pid {s.pid})" for s in left),
            )
            for slot in left:
                slot.send(signal.SIGKILL)
            _, pending = await asyncio.wait(pending, timeout=_KILL_WAIT_S)
            for keeper in pending:  # a process that not even SIGKILL ends (stuck in I/O)
                keeper.cancel()
        log.info("all workers stopped")

    async def _keep(self, slot: WorkerSlot) -> None:
        """Keep ``slot`` filled with a running worker until the supervisor stops."""
        failures = 0
        while not self.stopping.is_set():
            ended = await self._run_once(slot)
            if self.stopping.is_set():
                return
            failures = 1 if ended.after_s >= STABLE_S else failures + 1
            delay = self._backoff.delay(failures)
            slot.restart_at = self.clock.now() + delay
            log.warning(
                "worker %d (pid %s) %s after %.1fs; starting it again in %.1fs (exit %d in a row)",
                slot.index,
                ended.pid,
                describe_exit(ended.code),
                ended.after_s,
                delay,
                failures,
            )
            if not await sleep_unless_stopped(self.clock, delay, self.stopping):
                return
            slot.restarts += 1
            log.warning("restarting worker %d (restart %d)", slot.index, slot.restarts)

    async def _run_once(self, slot: WorkerSlot) -> WorkerExit:
        """Start one process for ``slot`` and wait until it exits."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
            process = await asyncio.create_subprocess_exec(
                *self._command(slot.index, sock.fileno(), self._worker_timeout_s),
                stdin=asyncio.subprocess.DEVNULL,
                env=self._environ,
                pass_fds=(sock.fileno(),),
                process_group=0,
                preexec_fn=death_pact(os.getpid(), ORPHAN_SIGNAL),
            )
        except OSError as exc:
            log.error("worker %d could not be started: %s", slot.index, exc)
            return slot.exited(None, self.clock.now(), self.clock.monotonic())
        finally:
            sock.close()  # the worker holds its own copy
        slot.started(process, port, self.clock.now(), self.clock.monotonic())
        log.info("worker %d started: pid %d, HTTP on 127.0.0.1:%d", slot.index, process.pid, port)
        if self.stopping.is_set():  # the stop came while it was being spawned
            slot.send(signal.SIGTERM)
        code = await process.wait()
        ended = slot.exited(code, self.clock.now(), self.clock.monotonic())
        if self.stopping.is_set():
            log.info("worker %d (pid %d) stopped: %s", slot.index, process.pid, describe_exit(code))
        return ended


def install_signal_handlers(supervisor: Supervisor) -> None:
    """First SIGTERM/SIGINT: stop every worker gracefully. Second: kill them, exit now."""
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        if supervisor.stopping.is_set():
            log.warning("second %s: killing the workers and exiting immediately", sig.name)
            supervisor.kill_all()
            os._exit(130)
        log.info("%s received: stopping the workers gracefully", sig.name)
        supervisor.request_stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)


async def run_supervised(config: Config) -> None:
    """``run`` with WORKERS above 1: the supervisor until SIGTERM/SIGINT."""
    supervisor = Supervisor(config, clock=SystemClock())
    install_signal_handlers(supervisor)
    await supervisor.run()
