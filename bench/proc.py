"""Child processes of the driver, with their CPU time and peak memory.

A tool's whole-life CPU seconds come from ``wait4``'s rusage when the driver reaps it.
Its peak RSS is the largest VmHWM read from ``/proc`` each time the driver polls it
(every 20-100 ms until it exits): rusage's ``ru_maxrss`` is useless here, because Linux
carries the forking parent's peak (the driver holds the whole workload) across exec.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

_POLL_S = 0.02
_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Usage:
    cpu_s: float
    peak_rss_mb: float
    exit_code: int | None


def proc_cpu_s(pid: int | None) -> float | None:
    """utime + stime of a live process, from /proc; None when it is gone."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / _TICKS


def proc_peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


class Child:
    """A tool process in its own process group; output appended to ``log_path``."""

    def __init__(
        self, argv: Sequence[str], log_path: Path, *, cwd: Path, env: Mapping[str, str]
    ) -> None:
        self.log_path = log_path
        with log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=dict(env),
                process_group=0,
            )
        self.launched_at = time.time()
        self.usage: Usage | None = None
        self._peak_rss_mb = 0.0

    @property
    def pid(self) -> int:
        return self._proc.pid

    def poll(self) -> Usage | None:
        """Reap the process if it has exited (once); its usage, else None."""
        if self.usage is not None:
            return self.usage
        self._peak_rss_mb = max(self._peak_rss_mb, proc_peak_rss_mb(self.pid) or 0.0)
        pid, status, ru = os.wait4(self.pid, os.WNOHANG)
        if pid == 0:
            return None
        code = os.waitstatus_to_exitcode(status)
        self._proc.returncode = code  # Popen must not try to reap it again
        self.usage = Usage(
            cpu_s=ru.ru_utime + ru.ru_stime, peak_rss_mb=self._peak_rss_mb, exit_code=code
        )
        return self.usage

    async def wait(self, timeout_s: float) -> Usage | None:
        deadline = time.monotonic() + timeout_s
        while (usage := self.poll()) is None and time.monotonic() < deadline:
            await asyncio.sleep(_POLL_S)
        return usage

    async def stop(
        self, first: signal.Signals = signal.SIGINT, grace_s: float = 30.0
    ) -> tuple[str, Usage | None]:
        """``first``, then SIGTERM, then SIGKILL, each after a wait; how it ended + usage."""
        if self.poll() is not None:
            return "exited", self.usage
        how = first.name.lower()
        for sig, wait_s in ((first, grace_s), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, sig)
            how = sig.name.lower()
            if await self.wait(wait_s) is not None:
                break
        return how, self.usage
