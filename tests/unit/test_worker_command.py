"""A worker of WORKERS=N gets its shutdown deadline as an argument from its supervisor,
while SHUTDOWN_TIMEOUT stays the operator's value in its environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.cli import _load, _parser
from service.workers.supervisor import worker_command


def test_a_worker_runs_under_the_deadline_its_supervisor_hands_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)  # no .env
    monkeypatch.setenv("VABUS_URL", "kafka://127.0.0.1:9/in")
    monkeypatch.setenv("SHUTDOWN_TIMEOUT", "30")
    argv = worker_command(1, 7, 29.0)
    assert argv[1:4] == ["-m", "service", "worker"]
    args = _parser("worker").parse_args(argv[3:])
    assert (args.index, args.http_fd) == (1, 7)
    assert _load(args).runtime.shutdown_timeout_s == 29.0


def test_run_keeps_the_operators_shutdown_timeout(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VABUS_URL", "kafka://127.0.0.1:9/in")
    monkeypatch.setenv("SHUTDOWN_TIMEOUT", "30")
    assert _load(_parser("run").parse_args(["run"])).runtime.shutdown_timeout_s == 30.0
