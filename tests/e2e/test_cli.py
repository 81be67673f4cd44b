"""The command line as an operator meets it: exit codes and messages."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.workload import checkout_on_path, free_port


def run_cli(
    args: list[str], env: dict[str, str], cwd: Path, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    ours = ("VABUS_", "KAFKA_", "POSTGRES_", "STORAGE_", "AGGREGATION_", "HTTP_", "WORKERS")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
    clean["PYTHONPATH"] = checkout_on_path(clean.get("PYTHONPATH"))
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        env={**clean, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("VABUS_URL", "ftp://bus"),
        ("STORAGE_TYPE", "mongo"),
        ("AGGREGATION_INTERVAL", "-5"),
        ("AGGREGATION_GRACE", "soon"),
        ("HTTP_PORT", "99999"),
        ("LOG_FORMAT", "xml"),
        ("SHUTDOWN_TIMEOUT", "0"),
        ("KAFKA_SECURITY_PROTOCOL", "SASL_SSL"),
        ("RETRY_BACKOFF", "sometimes"),
        ("WORKERS", "0"),
    ],
)
def test_invalid_configuration_exits_2_naming_the_variable(
    variable: str, value: str, tmp_path: Path
) -> None:
    result = run_cli(["run"], {variable: value}, tmp_path)
    assert result.returncode == 2, result.stderr
    assert variable in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["run"], {"WORKERS": "2"}),
        (["run", "--workers", "2"], {}),
    ],
)
def test_several_workers_on_the_http_bus_exit_2_naming_workers_and_the_bus_url(
    args: list[str], env: dict[str, str], tmp_path: Path
) -> None:
    env = {**env, "VABUS_URL": "http://127.0.0.1:1", "STORAGE_TYPE": "kafka"}
    result = run_cli(args, env, tmp_path)
    assert result.returncode == 2, result.stderr
    assert "WORKERS='2': expected 1, because VABUS_URL='http://127.0.0.1:1'" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_without_a_bus_url_exits_2_instead_of_aggregating_demo_data(tmp_path: Path) -> None:
    result = run_cli(["run"], {"STORAGE_TYPE": "kafka"}, tmp_path)
    assert result.returncode == 2, result.stderr
    assert "VABUS_URL" in result.stderr and "not set" in result.stderr


def test_every_problem_is_reported_at_once_and_secrets_are_hidden(tmp_path: Path) -> None:
    env = {
        "STORAGE_TYPE": "postgres",
        "HTTP_PORT": "x",
        "VABUS_URL": "http://bus:1",
        "VABUS_TOKEN": "s3cr3t-token",
        "AGGREGATION_INTERVAL": "0",
    }
    result = run_cli(["run"], env, tmp_path)
    assert result.returncode == 2
    for name in ("POSTGRES_DSN", "HTTP_PORT", "AGGREGATION_INTERVAL"):
        assert name in result.stderr
    assert "s3cr3t-token" not in result.stderr + result.stdout


def test_dotenv_in_the_working_directory_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("HTTP_PORT=not-a-port\n")
    result = run_cli(["run"], {}, tmp_path)
    assert result.returncode == 2
    assert "HTTP_PORT='not-a-port'" in result.stderr


@pytest.mark.integration
def test_check_prints_one_line_per_connection_and_fails_when_one_is_down(
    postgres_dsn: str, tmp_path: Path
) -> None:
    dead = f"127.0.0.1:{free_port()}"
    env = {
        "VABUS_URL": f"http://{dead}",
        "STORAGE_TYPE": "postgres",
        "POSTGRES_DSN": postgres_dsn,
    }
    result = run_cli(["check"], env, tmp_path)
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 1, result.stdout + result.stderr
    assert len(lines) == 2
    assert lines[0].startswith("FAIL") and "bus http" in lines[0]
    assert lines[1].startswith("ok") and "postgres" in lines[1]


@pytest.mark.integration
def test_check_names_every_source_and_the_one_that_is_down(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    env = {
        "VABUS_URL": f"kafka://{kafka_bootstrap}/check-in {dead}",
        "STORAGE_TYPE": "kafka",
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
    }
    result = run_cli(["check"], env, tmp_path)
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 1, result.stdout + result.stderr
    assert lines[0].startswith("FAIL") and f"kafka://{kafka_bootstrap}/check-in" in lines[0]
    assert dead in lines[0] and "source 2" in lines[0], lines[0]
    assert lines[1].startswith("ok") and "kafka" in lines[1]


@pytest.mark.integration
def test_migrate_creates_the_schema(postgres_dsn: str, unique_name: str, tmp_path: Path) -> None:
    env = {"STORAGE_TYPE": "postgres", "POSTGRES_DSN": postgres_dsn, "POSTGRES_TABLE": unique_name}
    result = run_cli(["migrate"], env, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert unique_name in result.stdout
