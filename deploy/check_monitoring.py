"""Checks the monitoring files against the metrics the service really exports.

Run by ``make lint`` (``python deploy/check_monitoring.py``), from the repository root:

* the metric families come from the service itself: a fresh ``MetricsCollector``
  (service/metrics/collector.py) is scraped through its Prometheus registry, so names and
  types are the exported ones, and label names come from the same declarations
  (service/metrics/definitions.py), never a copy that could drift;
* the Grafana dashboard (deploy/grafana/dashboards/*.json) must be valid JSON with
  unique panel ids, every panel querying through the ``datasource`` variable, every
  expression naming only exported metrics, labels those metrics carry, and PromQL
  that promtool parses (the expressions are checked as recording rules);
* the alert rules (deploy/prometheus/alerts.yml) may name only exported metrics, and
  each ``runbook`` must be a heading of docs/operations.md; promtool checks the
  Prometheus configuration with its rules and runs the rules' unit tests
  (alerts.test.yml);
* docs/operations.md's metric reference lists every family with its type and labels,
  and nothing else;
* every ``./`` bind mount of docker-compose.yml exists.

Exit status 1 with one line per problem. ``--reference`` prints the reference table's
first three columns instead, to start a row for a new metric.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.metrics.collector import MetricsCollector  # noqa: E402
from service.metrics.definitions import DECLARED  # noqa: E402

DASHBOARDS = ROOT / "deploy/grafana/dashboards"
PROMETHEUS = ROOT / "deploy/prometheus"
DOCS = ROOT / "docs/operations.md"
COMPOSE = ROOT / "docker-compose.yml"

# Labels Prometheus adds to every scraped series.
TARGET_LABELS = frozenset({"instance", "job"})
# Grafana's variables, replaced by values of the same kind before promtool parses.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$instance": ".*"}

_METRIC = re.compile(r"\bvabus_aggregator_[a-z0-9_]+")
_SELECTOR = re.compile(r"\b(vabus_aggregator_[a-z0-9_]+)\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")
_LEGEND = re.compile(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}")
_REFERENCE_ROW = re.compile(r"^\| `(vabus_aggregator_[a-z0-9_]+)` \| (\w+) \| ([^|]*) \|")
_BIND_MOUNT = re.compile(r"^\s*-\s*\"?\./([^:\"]+):", re.MULTILINE)
_RUNBOOK = re.compile(r"runbook:\s*docs/operations\.md#([a-z0-9-]+)")
_HEADING = re.compile(r"^#+\s+(.+?)\s*$", re.MULTILINE)


@dataclass(frozen=True)
class Family:
    name: str  # as queried: counters with _total, histograms by their base name
    type: str
    labels: tuple[str, ...]
    samples: tuple[str, ...]  # every sample name it exposes


_LABELS = {d.full_name: d.labels for d in DECLARED}


def exported_families() -> list[Family]:
    """The families a collector exposes, including those that appear only later (the
    watermark gauges once there is a watermark; labelled families once labelled)."""
    collector = MetricsCollector()
    collector.set_watermark(0.0)
    collector.set_lease_leader(True)  # exported only on a bus with a lease
    collector.set_ledger_view(lambda: {"received": 0, "imbalance": 0})  # once partitions
    collector.set_source_view(lambda: {"1": {"lag": 0, "queue_depth": 0}})  # once sources
    collector.for_source(1).on_messages_received("kafka", 1, 1)  # once a source delivered
    collector.for_source(1).on_bus_error("kafka", True)  # and once it failed
    families = []
    for fam in collector.registry.collect():
        labels = _LABELS[fam.name]  # a family without samples yet carries none to read
        samples: tuple[str, ...]
        if fam.type == "counter":
            name, samples = f"{fam.name}_total", (f"{fam.name}_total",)
        elif fam.type == "histogram":
            name = fam.name
            samples = tuple(f"{fam.name}{s}" for s in ("_bucket", "_count", "_sum"))
        else:
            name, samples = fam.name, (fam.name,)
        families.append(Family(name, fam.type, labels, samples))
    return families


def reference_labels(family: Family) -> str:
    return ", ".join(f"`{label}`" for label in family.labels) or "—"


class Checker:
    def __init__(self, families: list[Family]) -> None:
        self.families = families
        self.labels_of: dict[str, set[str]] = {}
        for fam in families:
            for sample in fam.samples:
                extra = {"le"} if sample.endswith("_bucket") else set()
                self.labels_of[sample] = set(fam.labels) | TARGET_LABELS | extra
        self.problems: list[str] = []

    def fail(self, where: str, message: str) -> None:
        self.problems.append(f"{where}: {message}")

    # -- expressions ------------------------------------------------------------------
    def check_names(self, where: str, text: str) -> None:
        for name in sorted(set(_METRIC.findall(text))):
            if name not in self.labels_of:
                self.fail(where, f"{name} is not a metric the service exports")

    def check_expression(self, where: str, expr: str, legend: str = "") -> None:
        """Names, selector labels, grouping labels and legend labels of one query."""
        self.check_names(where, expr)
        known: set[str] = set(TARGET_LABELS)
        for name in _METRIC.findall(expr):
            known |= self.labels_of.get(name, set())
        for name, matchers in _SELECTOR.findall(expr):
            for label in _MATCHER.findall(matchers):
                if name in self.labels_of and label not in self.labels_of[name]:
                    self.fail(where, f"{name} has no label {label!r}")
        for group in _GROUPING.findall(expr):
            for label in filter(None, (g.strip() for g in group.split(","))):
                if label not in known:
                    self.fail(where, f"groups by {label!r}, a label none of its metrics has")
        for label in _LEGEND.findall(legend):
            if label not in known:
                self.fail(where, f"legend shows {{{{{label}}}}}, a label none of its metrics has")

    # -- dashboard --------------------------------------------------------------------
    def check_dashboard(self, path: Path) -> list[tuple[str, str]]:
        """Structure and queries of one dashboard; returns (where, expr) for promtool."""
        rel = path.relative_to(ROOT)
        try:
            dash = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            self.fail(str(rel), f"not valid JSON: {exc}")
            return []
        for key, kind in (("uid", str), ("title", str), ("schemaVersion", int), ("panels", list)):
            if not isinstance(dash.get(key), kind):
                self.fail(str(rel), f"top-level {key!r} missing or not a {kind.__name__}")
        variables = {v.get("name") for v in dash.get("templating", {}).get("list", [])}
        for needed in ("datasource", "instance"):
            if needed not in variables:
                self.fail(str(rel), f"no template variable {needed!r}")
        queries: list[tuple[str, str]] = []
        seen_ids: set[object] = set()
        for panel in _all_panels(dash.get("panels", [])):
            where = f"{rel} panel {panel.get('title')!r}"
            if panel.get("id") in seen_ids:
                self.fail(where, f"duplicate panel id {panel.get('id')}")
            seen_ids.add(panel.get("id"))
            if not {"x", "y", "w", "h"} <= set(panel.get("gridPos", {})):
                self.fail(where, "gridPos needs x, y, w and h")
            if panel.get("type") == "row":
                continue
            targets = panel.get("targets") or []
            if not targets:
                self.fail(where, "no queries")
            for target in [panel, *targets]:
                uid = (target.get("datasource") or {}).get("uid")
                if uid != "${datasource}":
                    self.fail(where, f"data source {uid!r}, expected the variable ${{datasource}}")
            for target in targets:
                expr = target.get("expr", "")
                if not expr.strip():
                    self.fail(where, f"query {target.get('refId')} has no expr")
                    continue
                self.check_expression(where, expr, target.get("legendFormat", ""))
                queries.append((f"{where} query {target.get('refId')}", expr))
        return queries

    # -- reference --------------------------------------------------------------------
    def check_runbooks(self, where: str, text: str, docs: Path) -> None:
        """Every ``runbook: docs/operations.md#anchor`` names a heading of the docs."""
        body = docs.read_text(encoding="utf-8") if docs.exists() else ""
        anchors = {_anchor(h) for h in _HEADING.findall(body)}
        for anchor in _RUNBOOK.findall(text):
            if anchor not in anchors:
                self.fail(where, f"runbook anchor #{anchor} is no heading of {docs.name}")

    def check_reference(self, path: Path) -> None:
        rel = path.relative_to(ROOT)
        if not path.exists():
            self.fail(str(rel), "missing")
            return
        rows: dict[str, tuple[str, str]] = {}
        for line in path.read_text(encoding="utf-8").splitlines():
            if m := _REFERENCE_ROW.match(line):
                rows[m[1]] = (m[2], m[3].strip())
        for fam in self.families:
            got = rows.pop(fam.name, None)
            want = (fam.type, reference_labels(fam))
            if got is None:
                self.fail(str(rel), f"metric reference has no row for {fam.name}")
            elif got != want:
                self.fail(str(rel), f"{fam.name}: reference says {got}, the service exports {want}")
        for name in rows:
            self.fail(str(rel), f"metric reference lists {name}, which the service does not export")


def _anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _all_panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for panel in panels:
        out.append(panel)
        nested = panel.get("panels")
        if isinstance(nested, list):
            out.extend(_all_panels(nested))
    return out


def run_promtool(promtool: str, checker: Checker, queries: list[tuple[str, str]]) -> None:
    def call(where: str, *args: str) -> None:
        done = subprocess.run([promtool, *args], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            output = done.stdout + done.stderr
            # name the panels behind the recording rules promtool complains about
            for i in sorted({int(n) for n in re.findall(r"dashboard:query_(\d+)", output)}):
                output += f"\ndashboard:query_{i} is {queries[i][0]}"
            output = output.strip().replace("\n", "\n    ")
            checker.fail(where, f"promtool {' '.join(args[:2])} failed:\n    {output}")

    call("deploy/prometheus/prometheus.yml", "check", "config", str(PROMETHEUS / "prometheus.yml"))
    call("deploy/prometheus/alerts.test.yml", "test", "rules", str(PROMETHEUS / "alerts.test.yml"))
    # Dashboard queries as recording rules: promtool parses each one. JSON is YAML.
    rules = []
    for i, (_, expr) in enumerate(queries):
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dashboard-queries.yml"
        path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
        call("deploy/grafana/dashboards (queries)", "check", "rules", str(path))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--promtool", default="promtool", help="promtool (Debian: prometheus)")
    parser.add_argument("--reference", action="store_true", help="print the reference table rows")
    args = parser.parse_args()
    families = exported_families()
    if args.reference:
        for fam in families:
            print(f"| `{fam.name}` | {fam.type} | {reference_labels(fam)} | |")
        return 0
    promtool = shutil.which(args.promtool)
    if promtool is None:
        print(
            f"check_monitoring: {args.promtool!r} not found. It comes with Debian's prometheus "
            "package: apt-get install -y --no-install-recommends prometheus",
            file=sys.stderr,
        )
        return 1
    checker = Checker(families)
    queries: list[tuple[str, str]] = []
    dashboards = sorted(DASHBOARDS.glob("*.json"))
    if not dashboards:
        checker.fail(str(DASHBOARDS.relative_to(ROOT)), "no dashboard JSON")
    for path in dashboards:
        queries.extend(checker.check_dashboard(path))
    for path in sorted(PROMETHEUS.glob("*.yml")):
        text = path.read_text(encoding="utf-8")
        checker.check_names(str(path.relative_to(ROOT)), text)
        checker.check_runbooks(str(path.relative_to(ROOT)), text, DOCS)
    checker.check_reference(DOCS)
    for source in _BIND_MOUNT.findall(COMPOSE.read_text(encoding="utf-8")):
        if not (ROOT / source).exists():
            checker.fail("docker-compose.yml", f"bind mount ./{source} does not exist")
    run_promtool(promtool, checker, queries)
    for problem in checker.problems:
        print(problem, file=sys.stderr)
    if checker.problems:
        return 1
    print(
        f"monitoring files ok: {len(families)} metric families; {len(queries)} dashboard "
        f"queries in {len(dashboards)} dashboard(s); rules, their tests and the Prometheus "
        "configuration pass promtool; the metric reference matches"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
