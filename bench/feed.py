"""The HTTP input: the project's VaBus emulator in its own process, fed by the driver.

A fresh emulator per run, so every run starts from an empty queue. It is either
preloaded with the whole workload before the service starts (``POST /events`` in JSON
array chunks: throughput), or fed at a fixed rate while the service runs (latency).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import time
from pathlib import Path

import aiohttp

from bench.proc import Child

CHUNK_EVENTS = 50_000
_PACE_TICK_S = 0.02


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def start_emulator(run_dir: Path, max_events: int, env: dict[str, str]) -> tuple[Child, str]:
    """The emulator process and its base URL, once it answers."""
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "service",
        "emulator",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-events",
        str(max_events),
    ]
    child = Child(argv, run_dir / "emulator.log", cwd=run_dir, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if child.poll() is not None:
                break
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{url}/stats") as resp:
                    if resp.status == 200:
                        return child, url
            await asyncio.sleep(0.05)
    await child.stop()
    raise RuntimeError(f"emulator did not start; see {child.log_path}")


async def post_events(session: aiohttp.ClientSession, url: str, values: list[bytes]) -> None:
    body = b"[" + b",".join(values) + b"]"
    async with session.post(
        f"{url}/events", data=body, headers={"Content-Type": "application/json"}
    ) as resp:
        if resp.status != 200:
            raise RuntimeError(f"emulator refused events: {resp.status} {await resp.text()}")


async def preload(url: str, values: list[bytes]) -> None:
    async with aiohttp.ClientSession() as session:
        for i in range(0, len(values), CHUNK_EVENTS):
            await post_events(session, url, values[i : i + CHUNK_EVENTS])


async def feed_paced(url: str, values: list[bytes], rate: float) -> float:
    """Append ``values`` at ``rate`` events/s (in ticks of 20 ms); returns when all are in.

    Falling behind is caught up in the next tick, so the mean rate holds. Returns the
    mean rate achieved.
    """
    started = time.monotonic()
    done = 0
    async with aiohttp.ClientSession() as session:
        while done < len(values):
            due = min(len(values), int((time.monotonic() - started) * rate))
            if due > done:
                await post_events(session, url, values[done:due])
                done = due
            await asyncio.sleep(_PACE_TICK_S)
    return len(values) / max(1e-9, time.monotonic() - started)


async def wait_healthy(port: int, child: Child, timeout_s: float) -> bool:
    """True once the service answers ``/healthz`` with 200."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while time.monotonic() < deadline and child.poll() is None:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(f"http://127.0.0.1:{port}/healthz") as resp:
                    if resp.status == 200:
                        return True
            await asyncio.sleep(0.02)
    return False


def clean_env() -> dict[str, str]:
    """The driver's environment without any service settings that could leak in."""
    prefixes = (
        "VABUS_",
        "KAFKA_",
        "POSTGRES_",
        "STORAGE_",
        "AGGREGATION_",
        "HTTP_",
        "LOG_",
        "STATE_",
        "METRICS_",
        "CHECKPOINT_",
        "SHUTDOWN_",
        "HUB_",
        "SINK_",
    )
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
