"""What the benchmark can run, and how to launch each tool.

``limit`` and ``baseline`` are this folder's own scripts, run with the repo's Python.
``service_*`` is the service itself (``python -m service run``) configured only by
environment, as an operator would. ``quix`` and ``bytewax`` are peer scripts from
``PEER_SCRIPTS`` (``BENCH_PEER_SCRIPTS``), run from their virtual environments in
``PEER_VENVS`` (``BENCH_VENVS``); they are skipped with a note when those do not exist.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

REPO = Path(__file__).resolve().parents[1]
PEER_SCRIPTS = Path(os.environ.get("BENCH_PEER_SCRIPTS", REPO.parent / "shared" / "bench"))
PEER_VENVS = Path(os.environ.get("BENCH_VENVS", "/tmp/bench-venvs"))


@dataclass(frozen=True)
class Tool:
    name: str
    label: str
    kind: Literal["limit", "stream"]
    runner: Literal["repo", "service", "peer"]
    output: Literal["none", "kafka", "postgres"] = "kafka"
    bus: Literal["kafka", "http"] = "kafka"
    paced: bool = False  # input fed at a fixed rate instead of preloaded
    workers: int = 1  # service only: WORKERS
    repartition: bool = False  # service only: kafka://…&repartition=true
    script: str = ""  # repo: module name; peer: script file name
    venv: str = ""  # peer only
    code: str = ""  # service only: another tree's service package (PYTHONPATH), or this one
    rev: str = ""  # service only: the commit of ``code``
    env: tuple[tuple[str, str], ...] = ()  # service only: more environment ("{run}": run dir)

    def python(self) -> str:
        return str(PEER_VENVS / self.venv / "bin" / "python") if self.venv else sys.executable

    def missing(self) -> str:
        """Why this tool cannot run here, or ''."""
        if self.runner != "peer":
            return ""
        if not Path(self.python()).exists():
            return f"no venv at {PEER_VENVS / self.venv} (run {PEER_SCRIPTS}/setup_venvs.sh)"
        if not (PEER_SCRIPTS / self.script).exists():
            return f"no script {PEER_SCRIPTS / self.script}"
        return ""


TOOLS: dict[str, Tool] = {
    t.name: t
    for t in (
        Tool(
            "limit",
            "LIMIT: aiokafka getmany + orjson decode, nothing else",
            "limit",
            "repo",
            output="none",
            script="bench.limit",
        ),
        Tool(
            "baseline",
            "BASELINE: hand-written aiokafka + dict windows + producer",
            "stream",
            "repo",
            script="bench.baseline",
        ),
        Tool("service_kafka_kafka", "service: Kafka -> Kafka", "stream", "service"),
        Tool(
            "service_kafka_kafka_w2",
            "service: Kafka -> Kafka, WORKERS=2",
            "stream",
            "service",
            workers=2,
        ),
        Tool(
            "service_kafka_kafka_repartition",
            "service: Kafka -> Kafka, repartition=true",
            "stream",
            "service",
            repartition=True,
        ),
        Tool(
            "service_kafka_pg",
            "service: Kafka -> PostgreSQL",
            "stream",
            "service",
            output="postgres",
        ),
        Tool(
            "service_http_pg",
            "service: HTTP (emulator) -> PostgreSQL",
            "stream",
            "service",
            output="postgres",
            bus="http",
        ),
        Tool(
            "service_http_pg_paced",
            "service: HTTP -> PostgreSQL, input paced (latency)",
            "stream",
            "service",
            output="postgres",
            bus="http",
            paced=True,
        ),
        Tool(
            "quix",
            "Quix Streams (RocksDB + changelog)",
            "stream",
            "peer",
            script="run_quix.py",
            venv="quix",
        ),
        Tool(
            "bytewax",
            "Bytewax, 1 worker",
            "stream",
            "peer",
            script="run_bytewax.py",
            venv="bytewax",
        ),
    )
}

DEFAULT_TOOLS = (
    "limit",
    "baseline",
    "service_kafka_kafka",
    "service_kafka_kafka_w2",
    "service_kafka_pg",
    "service_http_pg",
    "service_http_pg_paced",
    "quix",
    "bytewax",
)
PEERS = ("baseline", "quix", "bytewax")  # the ratio columns besides the limit


def version_of(tool: Tool) -> str:
    """The package version that the tool's row stands for."""
    if tool.runner == "service":
        return f"vabus-aggregator @{tool.rev or _git_head()}"
    dist = {"quix": "quixstreams", "bytewax": "bytewax"}.get(tool.name, "aiokafka")
    code = f"import importlib.metadata as m; print(m.version({dist!r}))"
    try:
        out = subprocess.run(
            [tool.python(), "-c", code], capture_output=True, text=True, timeout=60, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return f"{dist} ?"
    return f"{dist} {out.stdout.strip()}"


def _git_head() -> str:
    # read-only: `describe --dirty` would refresh (write) the index under other writers
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "?"
    return out.stdout.strip()


def variants(
    tools: list[Tool], before: dict[str, Path], named: dict[str, dict[str, str]]
) -> list[Tool]:
    """``tools`` and, after each service tool, the same tool on each earlier tree of
    ``before`` (``<tool>-at-<rev>``) and with each named environment (``<tool>-with-<name>``;
    the names become Kafka topic names, so letters, digits, ``.``, ``_`` and ``-`` only):
    one session runs them round-robin on one broker, so before and after share its load."""
    out: list[Tool] = []
    for t in tools:
        out.append(t)
        if t.runner != "service":
            continue
        out += [
            replace(t, name=f"{t.name}-at-{rev}", label=t.label, code=str(tree), rev=rev)
            for rev, tree in before.items()
        ]
        out += [
            replace(t, name=f"{t.name}-with-{n}", label=f"{t.label}, {n}", env=tuple(env.items()))
            for n, env in named.items()
        ]
    return out


def export_tree(rev: str, into: Path) -> Path:
    """The ``service`` package of commit ``rev`` of this repository, under ``into``."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", rev, "service"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into
