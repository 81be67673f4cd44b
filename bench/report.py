"""The markdown table of a benchmark session, from its JSON-lines results.

One row per tool, medians over that tool's correct runs. Rates are the *proc* rate,
N / (completion - first event seen by the tool), which is what the ratios use; the
wall column (process launch to completion) shows what start-up adds.

``python -m bench.report results.jsonl`` prints the table of an earlier session.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import orjson

from bench.tools import PEERS, TOOLS

Row = dict[str, Any]


def _median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _num(x: float | None, fmt: str = "{:,.0f}") -> str:
    return "-" if x is None else fmt.format(x)


def _ratio(a: float | None, b: float | None) -> str:
    if not a or not b:
        return "-"
    r = a / b
    return f"{r:.3f}" if r < 0.1 else f"{r:.2f}"


def _ms_pair(p50: float | None, p99: float | None) -> str:
    if p50 is None and p99 is None:
        return "-"
    return f"{_num(p50 and p50 * 1000, '{:,.0f}')} / {_num(p99 and p99 * 1000, '{:,.0f}')}"


def table(results: Sequence[Row]) -> str:
    by_tool: dict[str, list[Row]] = {}
    for r in results:
        by_tool.setdefault(r["tool"], []).append(r)
    ok = {t: [r for r in rs if r.get("status") == "ok"] for t, rs in by_tool.items()}
    rate = {t: _median(r.get("eps_proc") for r in rs) for t, rs in ok.items()}
    columns = [
        "tool",
        "version",
        "correct",
        "events/s (proc, median)",
        "range",
        "wall s",
        "start-up s",
        "CPU s",
        "events per CPU-s",
        "peak RSS MB",
        "close→durable p50 / p99 ms",
        "emit→visible p50 / p99 ms",
        "x limit",
        *[f"x {p}" for p in PEERS],
    ]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    order = [t for t in TOOLS if t in by_tool] + sorted(set(by_tool) - set(TOOLS))
    for tool in order:
        runs, good = by_tool[tool], ok[tool]
        if all(r.get("status") == "skipped" for r in runs):
            lines.append(
                f"| {tool} | skipped: {runs[0].get('note', '')} |" + " |" * (len(columns) - 2)
            )
            continue
        rates = [r["eps_proc"] for r in good if r.get("eps_proc")]
        cpu = _median(r.get("cpu_s") for r in good)
        n = runs[0]["n"]
        cells = [
            tool,
            str(runs[0].get("version", "")),
            f"{len(good)}/{len(runs)}",
            _num(rate[tool]),
            f"{min(rates):,.0f}-{max(rates):,.0f}" if rates else "-",
            _num(_median(r.get("wall_s") for r in good), "{:.1f}"),
            _num(_median(r.get("startup_s") for r in good), "{:.1f}"),
            _num(cpu, "{:.1f}"),
            _num(n / cpu if cpu else None),
            _num(_median(r.get("peak_rss_mb") for r in good), "{:.0f}"),
            _ms_pair(
                _median(r.get("durable_p50_s") for r in good),
                _median(r.get("durable_p99_s") for r in good),
            ),
            _ms_pair(
                _median(r.get("visible_p50_s") for r in good),
                _median(r.get("visible_p99_s") for r in good),
            ),
            _ratio(rate[tool], rate.get("limit")),
            *[_ratio(rate[tool], rate.get(p)) for p in PEERS],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    paced = [r for r in results if r.get("paced_rate")]
    if paced:
        lines.append("")
        lines += [
            f"{r['tool']} rep {r['rep']}: input paced at {r['paced_rate']:,.0f} ev/s "
            f"(fed {r.get('paced_rate_achieved') or 0:,.0f} ev/s)"
            for r in paced
        ]
    return "\n".join(lines)


def failures(results: Sequence[Row]) -> list[str]:
    """One line per run that did not end correct (skipped tools are not failures)."""
    return [
        f"{r['tool']} rep {r['rep']}: {r.get('why', 'FAILED')}"
        for r in results
        if r.get("status") == "FAILED"
    ]


def load(path: Path) -> list[Row]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


if __name__ == "__main__":
    print(table(load(Path(sys.argv[1]))))
