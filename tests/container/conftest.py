"""Fixtures of the container tests (``make test-container``; deselected from ``make
test`` by the ``container`` marker). They need a Docker engine and the base image: run
``tests/container/machinery.sh up`` first (as root), which ``make test-container`` does.
Without an engine they skip, unless ``VABUS_CONTAINER_REQUIRED=1`` (set by ``make
test-container``) makes that a failure."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.container.docker import DOCKER, REPO_ROOT, docker_env, docker_usable

IMAGE = "vabus-aggregator:local"  # the tag docker-compose.yml gives the image it builds


@pytest.fixture(scope="session")
def docker_ready() -> None:
    if docker_usable():
        return
    why = "no Docker engine: run tests/container/machinery.sh up (or make test-container)"
    if os.environ.get("VABUS_CONTAINER_REQUIRED") == "1":
        pytest.fail(why)
    pytest.skip(why)


@pytest.fixture(scope="session")
def image(docker_ready: None) -> Iterator[str]:
    """The project's Dockerfile, built from this checkout (BuildKit, host network for
    pip). Its build time is printed (`-s` or the summary shows it)."""
    began = time.monotonic()
    build = subprocess.run(
        [DOCKER, "build", "--network", "host", "--tag", IMAGE, str(REPO_ROOT)],
        capture_output=True,
        text=True,
        env=docker_env(),
        timeout=600,
        check=False,
    )
    assert build.returncode == 0, f"docker build failed:\n{build.stderr[-4000:]}"
    seconds = time.monotonic() - began
    size = subprocess.run(
        [DOCKER, "image", "inspect", "--format", "{{.Size}}", IMAGE],
        capture_output=True,
        text=True,
        env=docker_env(),
        check=True,
    ).stdout.strip()
    print(f"\nimage {IMAGE}: built in {seconds:.1f} s, {int(size) / 1e6:.0f} MB")
    yield IMAGE
