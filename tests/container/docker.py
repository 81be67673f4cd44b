"""The Docker CLI for the container tests: asynchronous (the test's own event loop
serves the emulator the containers read), always Debian's 20.10 client with BuildKit."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import uuid4

import orjson

DOCKER = "/usr/bin/docker"  # a newer client at /usr/local/bin refuses BuildKit without buildx
REPO_ROOT = Path(__file__).resolve().parents[2]


def docker_env() -> dict[str, str]:
    env = dict(os.environ)
    env["DOCKER_BUILDKIT"] = "1"
    env["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin:" + env.get("PATH", "")
    return env


class DockerError(AssertionError):
    pass


async def run(*args: str, timeout: float = 120, check: bool = True, cmd: str = DOCKER) -> str:
    """``docker ARGS`` (or ``cmd ARGS``); its stdout. Raises :class:`DockerError` with the
    output when it fails and ``check`` is set."""
    proc = await asyncio.create_subprocess_exec(
        cmd,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=docker_env(),
    )
    try:
        async with asyncio.timeout(timeout):
            out, _ = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise DockerError(f"{cmd} {' '.join(args)}: no answer in {timeout} s") from None
    text = out.decode(errors="replace")
    if check and proc.returncode != 0:
        raise DockerError(f"{cmd} {' '.join(args)} exited {proc.returncode}:\n{text[-4000:]}")
    return text


def docker_usable() -> bool:
    import subprocess

    try:
        done = subprocess.run(
            [DOCKER, "info"], capture_output=True, timeout=20, env=docker_env(), check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@dataclass
class Container:
    """A detached container on the host network; ``remove()`` ends it and its logs."""

    name: str
    image: str
    env: Mapping[str, str]
    stopped_in: float | None = field(default=None)

    async def inspect(self) -> dict[str, Any]:
        data = orjson.loads(await run("inspect", self.name))
        return dict(data[0])

    async def state(self) -> dict[str, Any]:
        return dict((await self.inspect())["State"])

    async def logs(self) -> str:
        return await run("logs", self.name, check=False)

    async def assert_running(self) -> None:
        state = await self.state()
        if not state["Running"]:
            raise AssertionError(
                f"{self.name} exited {state['ExitCode']}:\n{(await self.logs())[-4000:]}"
            )

    async def stop(self, timeout: float) -> int:
        """``docker stop`` (SIGTERM, SIGKILL after ``timeout``); the container's exit code.
        Sets ``stopped_in`` to the seconds the stop took."""
        began = time.monotonic()
        await run("stop", "--time", str(int(timeout)), self.name, timeout=timeout + 30)
        self.stopped_in = time.monotonic() - began
        return int((await self.state())["ExitCode"])

    async def remove(self) -> None:
        await run("rm", "--force", self.name, check=False)


async def start_container(
    image: str,
    env: Mapping[str, str],
    *,
    options: Sequence[str] = (),
    command: Sequence[str] = (),
) -> Container:
    """``docker run --detach --network host`` with ``env`` as its only configuration."""
    name = f"vabus-test-{uuid4().hex[:10]}"
    args = ["run", "--detach", "--name", name, "--network", "host", *options]
    for key, value in env.items():
        args += ["--env", f"{key}={value}"]
    await run(*args, image, *command)
    return Container(name, image, env)


async def volume_files(image: str, volume: str) -> list[tuple[str, int, int, str]]:
    """(path, uid, gid, mode) of every file in ``volume``, read through ``image``."""
    out = await run(
        "run",
        "--rm",
        "--network",
        "none",
        "--user",
        "0:0",
        "--volume",
        f"{volume}:/v:ro",
        "--entrypoint",
        "find",
        image,
        "/v",
        "-mindepth",
        "1",
        "-printf",
        r"%P %U %G %m\n",
    )
    rows = []
    for line in out.splitlines():
        path, uid, gid, mode = line.rsplit(" ", 3)
        rows.append((path, int(uid), int(gid), mode))
    return rows
