"""One worker index of WORKERS=N, and whichever process currently fills it."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from dataclasses import dataclass
from typing import Any

__all__ = ["WorkerExit", "WorkerSlot", "describe_exit"]


def describe_exit(code: int | None) -> str:
    if code is None:
        return "could not be started"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


@dataclass(frozen=True, slots=True)
class WorkerExit:
    pid: int | None
    code: int | None  # None: the process could not be started; < 0: killed by signal -code
    at: float  # wall time, Unix seconds
    after_s: float  # how long the process ran

    def view(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "code": self.code,
            "reason": describe_exit(self.code),
            "at": self.at,
            "after_seconds": round(self.after_s, 3),
        }


class WorkerSlot:
    """Worker ``index``: its current process (if any), that process's HTTP port on
    127.0.0.1, how often the slot was restarted and how its last process ended."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: asyncio.subprocess.Process | None = None
        self.port: int | None = None
        self.restarts = 0
        self.last_exit: WorkerExit | None = None
        self.restart_at: float | None = None  # wall time of the next start, while backing off
        self._started_mono = 0.0
        self._started_at = 0.0

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def started(
        self, process: asyncio.subprocess.Process, port: int, now: float, now_mono: float
    ) -> None:
        self.process, self.port, self.restart_at = process, port, None
        self._started_at, self._started_mono = now, now_mono

    def exited(self, code: int | None, now: float, now_mono: float) -> WorkerExit:
        ran = now_mono - self._started_mono if self.process is not None else 0.0
        self.last_exit = WorkerExit(self.pid, code, now, ran)
        self.process, self.port = None, None
        return self.last_exit

    def uptime_s(self, now_mono: float) -> float | None:
        return now_mono - self._started_mono if self.alive else None

    def send(self, sig: signal.Signals) -> None:
        """Signal the process if it still runs (it may exit at any moment)."""
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)

    def view(self, now_mono: float) -> dict[str, Any]:
        uptime = self.uptime_s(now_mono)
        return {
            "pid": self.pid,
            "alive": self.alive,
            "http_port": self.port,
            "started_at": self._started_at if self.alive else None,
            "uptime_seconds": None if uptime is None else round(uptime, 3),
            "restarts": self.restarts,
            "restart_at": self.restart_at,
            "last_exit": None if self.last_exit is None else self.last_exit.view(),
        }
