"""Server processes of the dev stack, each a direct child of this process.

No child may outlive it: each asks the kernel (``PR_SET_PDEATHSIG``, see
``service/workers/child_process.py``) to signal it when its parent dies, so Ctrl-C, an
exception or ``kill -9`` of the parent all end the servers. Servers are always spawned
from the event loop's thread (the kernel's "parent" is the spawning thread).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import IO

from service.workers.child_process import death_pact

__all__ = ["Child", "ServerStartError", "free_port", "log_tail", "wait_ready"]

logger = logging.getLogger(__name__)

_POLL_S = 0.01  # how often a server's readiness and exit are looked at


class ServerStartError(RuntimeError):
    """An embedded server exited or did not become ready in time; the message ends with its log."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the caller must tolerate a race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def log_tail(path: Path, limit: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return "<no log>"


class Child:
    """One server process: spawned with a death pact, its output appended to a log file."""

    def __init__(
        self,
        argv: list[str],
        log_path: Path,
        *,
        death_signal: signal.Signals,
        env: Mapping[str, str] | None = None,
        user: int | None = None,
        group: int | None = None,
    ) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            self._proc = _spawn(argv, log, death_signal, env, user, group)
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def exited(self) -> bool:
        return self._proc.poll() is not None

    async def stop(self, stop_signal: signal.Signals, timeout_s: float) -> None:
        """Send ``stop_signal``; SIGKILL if the process has not exited within ``timeout_s``."""
        if self.exited:
            return
        self._proc.send_signal(stop_signal)
        if await self._wait(timeout_s):
            return
        logger.warning(
            "pid %s ignored %s for %.1f s; killing it", self.pid, stop_signal.name, timeout_s
        )
        self._proc.kill()
        await self._wait(timeout_s)

    async def _wait(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not self.exited:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(_POLL_S)
        return True


async def wait_ready(
    child: Child, name: str, ready: Callable[[], Awaitable[bool]], timeout_s: float
) -> None:
    """Poll ``ready`` until it says yes; :class:`ServerStartError`, ending with the
    child's log, if the child exits first or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if child.exited:
            raise ServerStartError(f"{name} exited:\n{log_tail(child.log_path)}")
        if await ready():
            return
        await asyncio.sleep(_POLL_S)
    raise ServerStartError(f"{name} not ready within {timeout_s} s:\n{log_tail(child.log_path)}")


def _spawn(
    argv: list[str],
    log: IO[bytes],
    death_signal: signal.Signals,
    env: Mapping[str, str] | None,
    user: int | None,
    group: int | None,
) -> subprocess.Popen[bytes]:
    # Own process group: a terminal's Ctrl-C reaches only us, and we stop servers in order.
    return subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=None if env is None else {**os.environ, **env},
        user=user,
        group=group,
        extra_groups=[] if user is not None else None,
        process_group=0,
        preexec_fn=death_pact(os.getpid(), death_signal),
    )
