"""One benchmark run of one tool: prepare its input and output, launch it, detect
completion, measure, stop it, check its output. Every run gets a fresh consumer group,
output topic or table, state directory and (for HTTP) emulator.
"""

from __future__ import annotations

import asyncio
import math
import re
import signal
import traceback
import uuid
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from bench.check import check, check_rollups
from bench.feed import (
    clean_env,
    feed_paced,
    free_port,
    preload,
    start_emulator,
    wait_healthy,
)
from bench.marks import read_first_event_file, read_marks
from bench.proc import Child, proc_cpu_s, proc_peak_rss_mb
from bench.tools import PEER_SCRIPTS, REPO, Tool, version_of
from bench.watch import (
    Watched,
    first_event_from_metrics,
    service_status,
    watch_kafka,
    watch_postgres,
)
from bench.workload import Workload, create_topic

DEFAULT_PACED_RATE = 75_000.0  # half the HTTP -> PostgreSQL target of issue 4


@dataclass
class Session:
    workload: Workload
    bootstrap: str
    dsn: str
    input_topic: str
    runs_dir: Path
    broker_pid: int | None
    timeout_s: float
    stall_s: float
    paced_rate: float = 0.0
    service_env: dict[str, str] = field(default_factory=dict)
    wrap: list[str] = field(default_factory=list)  # service runs: a command put in front
    http_rates: list[float] = field(default_factory=list)  # service_http_pg, this session
    _versions: dict[str, str] = field(default_factory=dict)

    def version(self, tool: Tool) -> str:
        if tool.name not in self._versions:
            self._versions[tool.name] = version_of(tool)
        return self._versions[tool.name]

    def pace(self) -> float:
        if self.paced_rate > 0:
            return self.paced_rate
        if self.http_rates:
            return sorted(self.http_rates)[len(self.http_rates) // 2] / 2
        return DEFAULT_PACED_RATE


@dataclass
class _Run:
    tool: Tool
    run_id: str
    dir: Path
    out_topic: str
    table: str
    http_port: int = 0
    emulator_url: str = ""


async def run_once(session: Session, tool: Tool, rep: int) -> dict[str, Any]:
    """One run; never raises for a broken tool: the result says FAILED and why."""
    res: dict[str, Any] = {
        "tool": tool.name,
        "label": tool.label,
        "rep": rep,
        "n": session.workload.n,
    }
    missing = tool.missing()
    if missing:
        return {**res, "status": "skipped", "note": missing}
    run_id = f"{tool.name}-r{rep}-{uuid.uuid4().hex[:8]}"
    run = _Run(
        tool,
        run_id,
        session.runs_dir / run_id,
        out_topic=f"bench-out-{run_id}",
        table=("bench_" + run_id.replace("-", "_"))[:63],
    )
    run.dir.mkdir(parents=True)
    res.update(run_id=run_id, version=session.version(tool), run_dir=str(run.dir))
    try:
        await _execute(session, run, res)
    except Exception as exc:
        (run.dir / "driver-error.txt").write_text(traceback.format_exc())
        res.update(status="FAILED", why=f"driver error: {exc!r}")
    return res


async def _execute(session: Session, run: _Run, res: dict[str, Any]) -> None:
    tool, w = run.tool, session.workload
    if tool.output == "kafka":
        await create_topic(session.bootstrap, run.out_topic, w.partitions)
    async with AsyncExitStack() as stack:
        emulator: Child | None = None
        if tool.bus == "http":
            emulator, run.emulator_url = await start_emulator(run.dir, w.n + 1000, clean_env())
            stack.push_async_callback(emulator.stop, signal.SIGTERM, 10.0)
            if not tool.paced:
                await preload(run.emulator_url, w.all_values())
        argv, cwd, env = _launch_spec(session, run)
        (run.dir / "argv.json").write_bytes(orjson.dumps({"argv": argv, "cwd": str(cwd)}))
        broker_cpu0 = proc_cpu_s(session.broker_pid)
        emulator_cpu0 = proc_cpu_s(emulator.pid) if emulator else None
        child = Child(argv, run.dir / "tool.log", cwd=cwd, env=env)
        stack.push_async_callback(child.stop, signal.SIGKILL, 10.0)  # only if still alive
        deadline = child.launched_at + session.timeout_s
        async with asyncio.TaskGroup() as tasks:
            first_task = None
            if tool.runner == "service":
                first_task = tasks.create_task(
                    first_event_from_metrics(run.http_port, child, deadline)
                )
            feeder = None
            if tool.paced:
                if not await wait_healthy(run.http_port, child, 60.0):
                    raise RuntimeError(f"service not healthy; see {child.log_path}")
                res["paced_rate"] = session.pace()
                feeder = tasks.create_task(
                    feed_paced(run.emulator_url, w.all_values(), res["paced_rate"])
                )
            watched = await _wait_for_completion(session, run, child, deadline)
            status = await service_status(run.http_port) if tool.runner == "service" else None
            res["cpu_s_to_done"] = proc_cpu_s(child.pid)
            res["peak_rss_mb_to_done"] = proc_peak_rss_mb(child.pid)
            broker_cpu1 = proc_cpu_s(session.broker_pid)
            emulator_cpu1 = proc_cpu_s(emulator.pid) if emulator else None
            if feeder is not None and not feeder.done():
                feeder.cancel()
            stop_signal = signal.SIGTERM if tool.runner == "service" else signal.SIGINT
            res["stopped"], usage = await child.stop(stop_signal, 30.0)
            t_first = await first_task if first_task is not None else None
        if feeder is not None and not feeder.cancelled():
            res["paced_rate_achieved"] = feeder.result()
    if t_first is None:
        t_first = _first_from_files(run)
    res.update(_timings(w.n, child.launched_at, t_first, watched.done_at))
    if usage is not None:
        res.update(cpu_s=usage.cpu_s, peak_rss_mb=usage.peak_rss_mb, exit_code=usage.exit_code)
    res["broker_cpu_s"] = _delta(broker_cpu0, broker_cpu1)
    res["emulator_cpu_s"] = _delta(emulator_cpu0, emulator_cpu1)
    if status is not None:
        res.update(_service_figures(status))
    res["visible_p50_s"], res["visible_p99_s"] = quantiles(watched.visible_lag_s, (0.5, 0.99))
    if session.wrap and tool.runner == "service":
        res["instructions"] = _instructions(run.dir / "tool.log")
    _judge(session, run, watched, res)


def _instructions(log: Path) -> int | None:
    """The instructions a ``valgrind --tool=cachegrind`` wrapper counted (its summary on
    the service's stderr), or None."""
    found = re.findall(r"I\s+refs:\s+([\d,]+)", log.read_text(errors="replace"))
    return int(found[-1].replace(",", "")) if found else None


async def _wait_for_completion(
    session: Session, run: _Run, child: Child, deadline: float
) -> Watched:
    tool = run.tool
    if tool.kind == "limit":
        await child.wait(deadline - child.launched_at)
        marks = read_marks(run.dir / "marks.jsonl")
        watched = Watched(done_at=marks.get("done"))
        watched.records = [{"records": marks.get("records", 0)}]
        if watched.done_at is None:
            watched.gave_up = "tool did not finish"
        return watched
    if tool.output == "kafka":
        return await watch_kafka(
            session.bootstrap,
            run.out_topic,
            session.workload.expected,
            child,
            deadline,
            session.stall_s,
        )
    return await watch_postgres(
        session.dsn, run.table, session.workload.expected, child, deadline, session.stall_s
    )


def _launch_spec(session: Session, run: _Run) -> tuple[list[str], Path, dict[str, str]]:
    tool, env = run.tool, clean_env()
    group = f"bench-{run.run_id}"
    if tool.runner == "repo":
        argv = [
            tool.python(),
            "-m",
            tool.script,
            "--bootstrap",
            session.bootstrap,
            "--topic",
            session.input_topic,
            "--group",
            group,
            "--marks",
            str(run.dir / "marks.jsonl"),
        ]
        if tool.kind == "stream":
            argv += ["--output-topic", run.out_topic]
        return argv, REPO, {**env, "PYTHONPATH": str(REPO)}
    if tool.runner == "peer":
        argv = [
            tool.python(),
            str(PEER_SCRIPTS / tool.script),
            "--bootstrap",
            session.bootstrap,
            "--group",
            group,
            "--input-topic",
            session.input_topic,
            "--output-topic",
            run.out_topic,
            "--first-event-file",
            str(run.dir / "first-event"),
            "--done-file",
            str(run.dir / "done"),
            "--state-dir",
            str(run.dir / "state"),
        ]
        return argv, PEER_SCRIPTS, env
    run.http_port = free_port()
    if tool.bus == "http":
        bus_url = run.emulator_url
    else:
        bus_url = (
            f"kafka://{session.bootstrap}/{session.input_topic}?group={group}"
            f"&metrics_topic=bench-metrics-{run.run_id}"
            + ("&repartition=true" if tool.repartition else "")
        )
    env.update(
        {
            "VABUS_URL": bus_url,
            "VABUS_KAFKA_SESSION_TIMEOUT_MS": "10000",  # as every peer (tansu holds joins ~5 s)
            "STORAGE_TYPE": tool.output,
            "KAFKA_BOOTSTRAP_SERVERS": session.bootstrap,
            "KAFKA_TOPIC": run.out_topic,
            "AGGREGATION_INTERVAL": "60",
            "STATE_DIR": str(run.dir / "state"),
            "HTTP_HOST": "127.0.0.1",
            "HTTP_PORT": str(run.http_port),
            "LOG_LEVEL": "WARNING",
            "WORKERS": str(tool.workers),
        }
    )
    if tool.output == "postgres":
        env.update({"POSTGRES_DSN": session.dsn, "POSTGRES_TABLE": run.table})
    env.update(session.service_env)
    env.update({k: v.replace("{run}", str(run.dir)) for k, v in tool.env})
    if tool.code:  # an earlier tree's service package, first on the path
        env["PYTHONPATH"] = tool.code
    # cwd is the run directory: a stray .env elsewhere must not configure the service
    wrap = [w.replace("{run}", str(run.dir)) for w in session.wrap]
    return [*wrap, tool.python(), "-m", "service", "run"], run.dir, env


def _first_from_files(run: _Run) -> float | None:
    if run.tool.runner == "repo":
        first = read_marks(run.dir / "marks.jsonl").get("first")
        return float(first) if first is not None else None
    if run.tool.runner == "peer":
        return read_first_event_file(run.dir / "first-event")
    return None


def _timings(n: int, launched: float, first: float | None, done: float | None) -> dict[str, Any]:
    out: dict[str, Any] = {"t_launch": launched, "t_first": first, "t_done": done}
    if done is not None:
        out["wall_s"] = done - launched
        out["eps_wall"] = n / out["wall_s"]
        if first is not None and done > first:
            out["proc_s"] = done - first
            out["eps_proc"] = n / out["proc_s"]
            out["startup_s"] = first - launched
    return out


def _service_figures(status: dict[str, Any]) -> dict[str, Any]:
    metrics = status.get("metrics", status)  # /status may nest the snapshot
    latency = metrics.get("emit_to_durable_seconds") or {}
    return {
        "durable_p50_s": latency.get("p50"),
        "durable_p99_s": latency.get("p99"),
        "durable_count": latency.get("count"),
        "service_events_received": metrics.get("events_received"),
        "service_events_rejected": metrics.get("events_rejected"),
        "service_events_late": metrics.get("events_late"),
        "service_aggregates_emitted": metrics.get("aggregates_emitted"),
    }


def _judge(session: Session, run: _Run, watched: Watched, res: dict[str, Any]) -> None:
    w = session.workload
    if run.tool.kind == "limit":
        consumed = watched.records[0]["records"] if watched.records else 0
        res["consumed"] = consumed
        res["correct"] = consumed == w.n + w.partitions
        why = "" if res["correct"] else f"read {consumed} records, expected {w.n + w.partitions}"
    else:
        with (run.dir / "output.jsonl").open("wb") as f:
            for record in watched.records:
                f.write(orjson.dumps(record) + b"\n")
        summary = check(watched.records, w.expected)
        res["check"] = summary
        res["correct"] = summary["ok"]
        why = (
            ""
            if summary["ok"]
            else (
                f"wrong output: missing {summary['missing']}, extra {summary['extra']}, "
                f"mismatches {summary['mismatches']}, bad records {summary['bad_format']}"
            )
        )
        if session.service_env.get("AGGREGATION_ROLLUPS") and run.tool.runner == "service":
            rollups = check_rollups(watched.records, w.expected)
            res["check_rollups"] = rollups
            if not rollups["ok"]:
                res["correct"] = False
                why = (
                    f"{why}; rollups: {rollups['rollup_windows']} windows, "
                    f"{rollups['rollup_mismatches']} wrong"
                ).lstrip("; ")
    res["completed"] = watched.done_at is not None
    if not res["completed"]:
        why = f"incomplete ({watched.gave_up}); {why}".rstrip("; ")
    res["status"] = "ok" if res["completed"] and res["correct"] else "FAILED"
    if why:
        res["why"] = why


def _delta(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else b - a


def quantiles(samples: Sequence[float], qs: Sequence[float]) -> list[float | None]:
    """Nearest-rank quantiles; None for each when there are no samples."""
    if not samples:
        return [None] * len(qs)
    ordered = sorted(samples)
    last = len(ordered) - 1
    return [ordered[min(last, max(0, math.ceil(q * len(ordered)) - 1))] for q in qs]
