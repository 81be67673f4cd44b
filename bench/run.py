"""Benchmark driver: ``python bench/run.py`` (also ``make bench``). See bench/README.md.

Starts the embedded stack (tansu + PostgreSQL on free loopback ports), loads the
workload once, runs every selected tool ``-r`` times round-robin (rep 1 of every tool,
then rep 2, ...), checks every run's output, prints a markdown table and writes one
JSON line per run. Exits 1 if any run was incomplete or wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import orjson

from bench import report
from bench.session import Session, run_once
from bench.tools import DEFAULT_TOOLS, TOOLS, export_tree, variants
from bench.workload import generate, produce


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("-n", "--events", type=int, default=1_000_000, help="events (1,000,000)")
    ap.add_argument("-r", "--reps", type=int, default=3, help="runs per tool (3)")
    ap.add_argument(
        "--tools",
        default=",".join(DEFAULT_TOOLS),
        help=f"comma-separated, any of: {', '.join(TOOLS)}",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results JSONL (default: <runs dir>/results.jsonl); the table goes next to it as .md",
    )
    ap.add_argument(
        "--runs-dir",
        type=Path,
        default=None,
        help="per-run logs, outputs and state (default: a new dir under /tmp)",
    )
    ap.add_argument("--quick", action="store_true", help="n=100,000 and 1 rep")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--timeout", type=float, default=600.0, help="per run, seconds (600)")
    ap.add_argument(
        "--stall",
        type=float,
        default=90.0,
        help="give a run up after this long without new output (90 s)",
    )
    ap.add_argument(
        "--paced-rate",
        type=float,
        default=0.0,
        help="events/s for service_http_pg_paced (default: half the median "
        "rate service_http_pg reached earlier in this session, else 75,000)",
    )
    ap.add_argument(
        "--tags",
        action="store_true",
        help="every event carries tags (bench.hotpath.with_tags, one series per name) and "
        "the service runs with AGGREGATION_GROUP_BY=host,region: the cost of two group-by tags",
    )
    ap.add_argument(
        "--service-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the service runs (repeatable)",
    )
    ap.add_argument(
        "--before",
        action="append",
        default=[],
        metavar="REV",
        help="also run each service tool on the service package of commit REV "
        "(tool name <tool>-at-REV), round-robin with the others in this session (repeatable)",
    )
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:VAR=VALUE[,VAR=VALUE]",
        help="also run each service tool with this environment (tool name <tool>-with-NAME); "
        "'{run}' in a value is the run's directory (repeatable)",
    )
    ap.add_argument(
        "--wrap",
        default="",
        metavar="CMD",
        help="put CMD in front of every service run, e.g. 'valgrind --tool=cachegrind "
        "--cache-sim=no --cachegrind-out-file={run}/cachegrind.out': the instructions it "
        "counts are reported per run (instructions=...); '{run}' is the run's directory",
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.events, args.reps = 100_000, 1
    args.tool_list = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = [t for t in args.tool_list if t not in TOOLS]
    if unknown:
        ap.error(f"unknown tool(s) {', '.join(unknown)}; known: {', '.join(TOOLS)}")
    bad_rev = [r for r in args.before if not re.fullmatch(r"[A-Za-z0-9._-]+", r)]
    if bad_rev:
        ap.error(f"--before wants a commit (letters, digits, . _ -), got {bad_rev}")
    args.variants = {}
    for v in args.variant:
        name, _, pairs = v.partition(":")
        env = dict(p.split("=", 1) for p in pairs.split(",") if "=" in p)
        if not re.fullmatch(r"[A-Za-z0-9._-]+", name) or len(env) != len(pairs.split(",")):
            ap.error(f"--variant wants NAME:VAR=VALUE[,VAR=VALUE], got {v!r}")
        args.variants[name] = env
    bad_env = [e for e in args.service_env if "=" not in e]
    if bad_env:
        ap.error(f"--service-env wants NAME=VALUE, got {bad_env}")
    return args


async def main_async(args: argparse.Namespace) -> int:
    from service.dev.devstack import DevStack

    runs_dir = args.runs_dir or Path(tempfile.mkdtemp(prefix="vabus-bench-"))
    runs_dir.mkdir(parents=True, exist_ok=True)
    out = args.out or runs_dir / "results.jsonl"
    before = {rev: export_tree(rev, runs_dir / f"code-{rev}") for rev in args.before}
    tools = variants([TOOLS[t] for t in args.tool_list], before, args.variants)
    needs_pg = any(t.output == "postgres" for t in tools)
    t0 = time.perf_counter()
    workload = generate(args.events, args.seed)
    if args.tags:
        from bench.hotpath import GROUP_BY, with_tags

        with_tags(workload, 1)
        args.service_env.append(f"AGGREGATION_GROUP_BY={','.join(GROUP_BY)}")
    print(
        f"workload: {workload.n:,} events, seed {workload.seed}, {len(workload.expected):,} "
        f"expected (name, window) results ({time.perf_counter() - t0:.1f} s)",
        flush=True,
    )
    (runs_dir / "expected.json").write_bytes(
        orjson.dumps(
            {"n": workload.n, "seed": workload.seed, "results": list(workload.expected.values())}
        )
    )
    results = []
    async with DevStack(runs_dir / "stack", postgres=needs_pg) as stack:
        assert stack.kafka is not None
        session = Session(
            workload=workload,
            bootstrap=stack.kafka.bootstrap_servers,
            dsn=stack.postgres.dsn if stack.postgres else "",
            input_topic="bench-events",
            runs_dir=runs_dir,
            broker_pid=stack.kafka.pid,
            timeout_s=args.timeout,
            stall_s=args.stall,
            paced_rate=args.paced_rate,
            service_env=dict(e.split("=", 1) for e in args.service_env),
            wrap=shlex.split(args.wrap),
        )
        t0 = time.perf_counter()
        await produce(workload, session.bootstrap, session.input_topic)
        took = time.perf_counter() - t0
        print(
            f"produced to {session.input_topic} on {session.bootstrap} in {took:.1f} s "
            f"({workload.n / took:,.0f} ev/s); runs in {runs_dir}",
            flush=True,
        )
        for rep in range(1, args.reps + 1):
            for tool in tools:
                res = await run_once(session, tool, rep)
                results.append(res)
                with out.open("ab") as f:
                    f.write(orjson.dumps(res) + b"\n")
                print(_one_line(res), flush=True)
                if tool.name == "service_http_pg" and res.get("status") == "ok":
                    session.http_rates.append(res["eps_proc"])
        broker_rss = _vm_rss_mb(stack.kafka.pid)
    # the outputs are kept per run (output.jsonl); the database files are only bulk
    shutil.rmtree(runs_dir / "stack" / "pgdata", ignore_errors=True)
    text = report.table(results)
    out.with_suffix(".md").write_text(text + "\n")
    print(
        f"\n{text}\n\n(N = {workload.n:,}, {args.reps} rep(s); broker RSS at end "
        f"{broker_rss} MB; results {out}, table {out.with_suffix('.md')})"
    )
    failed = report.failures(results)
    for line in failed:
        print(f"FAILED: {line}", file=sys.stderr)
    return 1 if failed else 0


def _one_line(res: dict[str, object]) -> str:
    keys = (
        "tool",
        "rep",
        "status",
        "eps_proc",
        "wall_s",
        "cpu_s",
        "peak_rss_mb",
        "durable_p99_s",
        "instructions",
        "why",
        "note",
    )
    parts = []
    for k in keys:
        v = res.get(k)
        if v is not None and v != "":
            parts.append(f"{k}={v:,.3f}" if isinstance(v, float) else f"{k}={v}")
    return "  ".join(parts)


def _vm_rss_mb(pid: int | None) -> str:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return f"{int(line.split()[1]) / 1024:.0f}"
    except OSError:
        pass
    return "?"


def main() -> None:
    sys.exit(asyncio.run(main_async(parse_args())))


if __name__ == "__main__":
    main()
