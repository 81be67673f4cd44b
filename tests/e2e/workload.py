"""A deterministic workload and an independent reference computation for e2e tests.

The reference deliberately shares no code with ``service/``: plain sorting and
``statistics`` stand in for the service's accumulators.
"""

from __future__ import annotations

import math
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FUNCS = ("sum", "avg", "min", "max", "count", "first", "last", "stddev", "p50", "p90", "p95", "p99")
INTERVAL = 10.0
BASE_TS = 1_700_000_000.0  # a multiple of INTERVAL

Key = tuple[str, str, float]  # (name, agg_func, window_start)


@dataclass
class Workload:
    valid: list[dict[str, Any]] = field(default_factory=list)
    # every message in send order: valid events, invalid ones and late ones
    messages: list[Any] = field(default_factory=list)
    expected_rejects: dict[str, int] = field(default_factory=lambda: defaultdict(int))


def build_workload(
    seed: int = 7, names_per_func: int = 3, windows: int = 4, per_window: int = 40
) -> Workload:
    """Events for every function over ``windows`` windows, in time order, with invalid,
    future and late events mixed in at known places."""
    rng = random.Random(seed)
    w = Workload()
    names = [(f"e2e.{f}.{k}", f) for f in FUNCS for k in range(names_per_func)]
    for win in range(windows):
        start = BASE_TS + win * INTERVAL
        for i in range(per_window):
            # ties in event time on purpose: first/last must follow arrival order
            ts = start + rng.randrange(0, int(INTERVAL * 10) - 1) / 10  # never the next window
            name, func = rng.choice(names)
            value: float | int = rng.choice(
                [rng.randint(-50, 50), round(rng.uniform(-1e3, 1e3), 3)]
            )
            ev = {
                "name": name,
                "value": value,
                "timestamp": ts,
                "agg_func": func.upper() if i % 7 == 0 else func,
            }
            if i % 11 == 0:  # ISO-8601 form
                ev["timestamp"] = _iso(ts)
            w.valid.append({"name": name, "value": float(value), "timestamp": ts, "agg_func": func})
            w.messages.append(ev)
        # per window, a handful of bad events
        bad = [
            ({"value": 1, "timestamp": start}, "missing_name"),
            ({"name": "x", "value": "nan?", "timestamp": start}, "invalid_value"),
            ({"name": "x", "value": True, "timestamp": start}, "invalid_value"),
            ({"name": "x", "value": 1, "timestamp": "2023-11-14T22:13:20"}, "invalid_timestamp"),
            (
                {"name": "x", "value": 1, "timestamp": start, "agg_func": "median"},
                "unknown_agg_func",
            ),
            ({"name": "x", "value": 1, "timestamp": time.time() + 10 * 86400}, "future_timestamp"),
        ]
        for obj, reason in bad:
            w.messages.append(obj)
            w.expected_rejects[reason] += 1
        if win >= 2:
            # window win-2 closed when the first event of window win-1 was seen (grace 0)
            w.messages.append(
                {"name": "e2e.late", "value": 1, "timestamp": start - 2 * INTERVAL + 1}
            )
            w.expected_rejects["late"] += 1
    return w


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{round(ts % 1 * 1000):03d}Z"


def _percentile(values: list[float], q: float) -> float:
    v = sorted(values)
    h = (len(v) - 1) * q
    lo = math.floor(h)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (h - lo) * (v[hi] - v[lo])


def expected_aggregates(
    valid: list[dict[str, Any]], interval: float = INTERVAL
) -> dict[Key, tuple[float, int]]:
    """Per (name, agg_func, window start) of ``interval`` seconds: (value, count)."""
    groups: dict[Key, list[tuple[float, float]]] = defaultdict(list)
    for e in valid:
        start = math.floor(e["timestamp"] / interval) * interval
        groups[(e["name"], e["agg_func"], start)].append((e["timestamp"], e["value"]))
    return {key: (reference_value(key[1], pairs), len(pairs)) for key, pairs in groups.items()}


def reference_value(func: str, pairs: list[tuple[float, float]]) -> float:
    """``func`` over (event time, value) pairs in arrival order (first/last: the earliest
    or latest event time, ties by arrival)."""
    values = [v for _, v in pairs]
    if func == "sum":
        return math.fsum(values)
    if func == "avg":
        return statistics.fmean(values)
    if func == "min":
        return min(values)
    if func == "max":
        return max(values)
    if func == "count":
        return float(len(values))
    if func == "first":
        return min(enumerate(pairs), key=lambda ip: (ip[1][0], ip[0]))[1][1]
    if func == "last":
        return max(enumerate(pairs), key=lambda ip: (ip[1][0], ip[0]))[1][1]
    if func == "stddev":
        return statistics.pstdev(values)
    return _percentile(values, int(func[1:]) / 100)


Results = Mapping[Key, tuple[float, int]]


def assert_matches(actual: Results, expected: Results, where: str) -> None:
    missing = expected.keys() - actual.keys()
    extra = actual.keys() - expected.keys()
    assert not missing and not extra, (
        f"{where}: missing {sorted(missing)[:5]}, extra {sorted(extra)[:5]}"
    )
    wrong = [
        (k, actual[k], expected[k])
        for k in expected
        if actual[k][1] != expected[k][1]
        or not math.isclose(actual[k][0], expected[k][0], rel_tol=1e-9, abs_tol=1e-9)
    ]
    assert not wrong, f"{where}: {len(wrong)} wrong aggregates, e.g. {wrong[:3]}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


REPO_ROOT = Path(__file__).resolve().parents[2]


def checkout_on_path(pythonpath: str | None) -> str:
    """PYTHONPATH that makes a child ``python -m service`` run this checkout's code, not
    whichever one the virtual environment's editable install points at."""
    return os.pathsep.join(p for p in (str(REPO_ROOT), pythonpath) if p)


class ServiceProcess:
    """``python -m service run`` as a child process, with its output in a log file."""

    def __init__(self, env: Mapping[str, str], workdir: Path) -> None:
        self.log_path = workdir / "service.log"
        self.http_port = int(env.get("HTTP_PORT", "0"))
        full_env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(
                ("VABUS_", "KAFKA_", "POSTGRES_", "STORAGE_", "AGGREGATION_", "WORKERS")
            )
        }
        full_env.update(env)
        full_env["PYTHONPATH"] = checkout_on_path(full_env.get("PYTHONPATH"))
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service", "run"],
            env=full_env,
            cwd=workdir,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 40.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()
