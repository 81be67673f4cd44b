"""The live harness on the session's broker, with each test's own names and directory."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.live import LiveRun

LiveFactory = Callable[..., LiveRun]


@pytest.fixture
def live(kafka_bootstrap: str, unique_name: str, tmp_path: Path) -> LiveFactory:
    """``LiveRun`` with everything but the workload and what the test sets."""
    return functools.partial(
        LiveRun, kafka_bootstrap=kafka_bootstrap, unique_name=unique_name, workdir=tmp_path
    )
