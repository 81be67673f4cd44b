"""Rules with ``source`` over several sources (docs/routes.md, "Sources"): the marked
series key, the route decided per (name, tags, source) at intake, the outputs' routing
of marked and unmarked aggregates, and the configuration's checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from service.aggregation.series import (
    SeriesBudget,
    is_overflow,
    is_plain,
    mark,
    name_of,
    overflow_of,
    overflow_series,
    route_of,
    series_key,
    split,
    split_route,
    unmarked,
    valid_series,
)
from service.aggregation.source_marks import SourceMarks
from service.config import load_config
from service.core.errors import ConfigError
from service.core.events import Aggregate, RoutedAggregate
from service.routes import Route, Router, Routes

K1 = "kafka://broker.example:9092/one"
K2 = "kafka://broker.example:9092/two?group=agg-two"
H3 = "http://bus.example:8080"
THREE = f"{K1} {K2} {H3}"
BOTH = {
    "STORAGE_TYPE": "kafka,postgres",
    "POSTGRES_DSN": "postgresql://agg@db.example:5432/metrics",
}

HOSTS = Route("hosts", ("cpu.*",), ("postgres",), source=2, postgres_table="host_metrics")
EU = Route(
    "eu", ("cpu.*",), ("postgres",), source=3, tags=(("region", "eu"),), postgres_table="eu_cpu"
)
ALL_CPU = Route("cpu", ("cpu.*",), ("kafka",), kafka_topic="cpu-aggregates")


def routes(*rules: Route, sources: int = 3) -> Routes:
    return Routes("r.yaml", rules, sources)


def router(r: Routes) -> Router:
    return Router(
        r, outputs=("kafka", "postgres"), kafka_topic="agg", postgres_table="aggregated_events"
    )


def agg(name: str, route: str | None = None, tags: dict[str, str] | None = None) -> Aggregate:
    if route is None:
        return Aggregate(name, "sum", 1.0, 1, 0.0, 60.0, 61.0, tags)
    return RoutedAggregate(name, "sum", 1.0, 1, 0.0, 60.0, 61.0, tags, route=route)


# -- the series key ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "series",
    ["cpu.user", series_key("cpu.user", {"host": "a", "region": "eu"}, ("host", "region"))],
)
def test_a_marked_series_splits_back_into_its_name_tags_and_route(series: str) -> None:
    marked = mark(series, "hosts")
    assert marked != series and not is_plain(marked)
    assert route_of(marked) == "hosts" and route_of(series) is None
    assert unmarked(marked) == series and unmarked(series) is series
    assert name_of(marked) == "cpu.user"
    assert split(marked) == split(series)
    name, tags, route = split_route(marked)
    assert (name, tags or {}, route) == ("cpu.user", split(series)[1], "hosts")
    assert valid_series(marked) and valid_series(series)


def test_a_mark_cannot_be_mistaken_for_part_of_a_name_or_of_tags() -> None:
    # the tags' JSON escapes the separator, a name cannot hold it (decode.name_fault)
    series = series_key("n", {"k": "x"}, ("k",))
    assert "\x1e" not in series
    assert not valid_series("cpu\x1e")  # a mark without a rule name
    assert not valid_series("cp\x00u\x1ehosts")  # not a name
    assert not valid_series('cpu\x1f{"k":1}\x1ehosts')  # tags that are not strings


def test_the_overflow_series_of_a_marked_series_keeps_the_mark() -> None:
    group_by = ("host",)
    series = mark(series_key("cpu", {"host": "a"}, group_by), "hosts")
    over = overflow_of(series, group_by)
    assert over == mark(overflow_series("cpu", group_by), "hosts")
    assert is_overflow(over) and not is_overflow(series)
    assert overflow_of(unmarked(series), group_by) == overflow_series("cpu", group_by)


def test_the_series_budget_counts_a_name_over_its_marked_and_unmarked_series() -> None:
    group_by = ("host",)
    budget = SeriesBudget()
    a = series_key("cpu", {"host": "a"}, group_by)
    b = mark(series_key("cpu", {"host": "b"}, group_by), "hosts")
    budget.record(0.0, a)
    assert budget.admit(0.0, b, 1, group_by) == mark(overflow_series("cpu", group_by), "hosts")
    assert budget.admit(0.0, a, 1, group_by) is a


# -- the route of an event, at intake ----------------------------------------------------
def test_only_the_sources_some_rule_names_get_a_marker() -> None:
    marks = SourceMarks(routes(HOSTS))
    assert marks.for_partition("one:0") is None
    assert marks.for_partition("s3/http") is None
    marker = marks.for_partition("s2/two:0")
    assert marker is not None
    assert marker("cpu.user") == mark("cpu.user", "hosts")
    assert marker("mem.free") == "mem.free"


def test_a_rule_without_source_before_a_source_rule_keeps_the_series_unmarked() -> None:
    marker = SourceMarks(routes(ALL_CPU, HOSTS)).for_partition("s2/two:0")
    assert marker is not None
    assert marker("cpu.user") == "cpu.user"  # first match wins: 'cpu', decided at the outputs


def test_a_source_rule_with_tags_marks_only_the_series_with_those_tags() -> None:
    group_by = ("region",)
    marker = SourceMarks(routes(HOSTS, EU)).for_partition("s3/http")
    assert marker is not None
    eu = series_key("cpu.user", {"region": "eu"}, group_by)
    us = series_key("cpu.user", {"region": "us"}, group_by)
    assert marker(eu) == mark(eu, "eu")
    assert marker(us) == us and marker("cpu.user") == "cpu.user"


def test_with_one_source_nothing_is_marked() -> None:
    one = routes(Route("hosts", ("cpu.*",), ("postgres",), source=1), sources=1)
    assert not one.by_source
    assert not SourceMarks(one)
    assert SourceMarks(one).for_partition("one:0") is None


# -- the route of an aggregate, at the outputs -------------------------------------------
def test_a_marked_aggregate_takes_its_rule_and_an_unmarked_one_skips_source_rules() -> None:
    r = router(routes(HOSTS))
    split_ = r.split([agg("cpu.user"), agg("cpu.user", "hosts")], "postgres")
    assert [(route, dest, [a.route for a in aggs]) for route, dest, aggs in split_] == [
        ("hosts", "host_metrics", ["hosts"]),
        ("default", "aggregated_events", [None]),
    ]
    assert r.route_of(agg("cpu.user")) == "default"
    assert r.route_of(agg("cpu.user", "hosts")) == "hosts"


def test_an_aggregate_marked_with_a_rule_gone_is_routed_like_an_unmarked_one() -> None:
    r = router(routes(ALL_CPU))
    assert r.route_of(agg("cpu.user", "hosts")) == "cpu"
    [(route, dest, _)] = r.split([agg("cpu.user", "hosts")], "kafka")
    assert (route, dest) == ("cpu", "cpu-aggregates")


def test_with_one_source_a_source_rule_routes_every_aggregate_as_before() -> None:
    one = Route("hosts", ("cpu.*",), ("postgres",), source=1, postgres_table="host_metrics")
    r = router(routes(one, sources=1))
    assert r.route_of(agg("cpu.user")) == "hosts"


# -- the configuration -------------------------------------------------------------------
def load(tmp_path: Path, rules: list[dict[str, Any]], url: str = THREE) -> Routes:
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"routes": rules}))
    return load_config({"ROUTES_FILE": str(path), "VABUS_URL": url, **BOTH}, dotenv=None).routes


def problem(tmp_path: Path, rules: list[dict[str, Any]], url: str = THREE) -> str:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, rules, url)
    [line] = [p for p in caught.value.problems if p.startswith("ROUTES_FILE=")]
    return line


def rule(**fields: Any) -> dict[str, Any]:
    return {"name": "hosts", "match": ["cpu.*"], "outputs": ["postgres"], **fields}


def test_a_source_rule_with_its_own_destinations_is_accepted_with_several_sources(
    tmp_path: Path,
) -> None:
    got = load(tmp_path, [rule(source=2, postgres_table="host_metrics")])
    assert got.by_source and got.sources == 3
    assert got.rules[0].source == 2


def test_a_source_rule_needs_a_table_of_its_own(tmp_path: Path) -> None:
    line = problem(tmp_path, [rule(source=2)])
    assert "rule 1 'hosts': postgres_table=None: expected a table of its own" in line
    assert "'aggregated_events'" in line


def test_a_source_rule_cannot_name_the_default_topic(tmp_path: Path) -> None:
    line = problem(
        tmp_path,
        [rule(source=2, outputs=["kafka"], kafka_topic="aggregated-events")],
    )
    assert "rule 1 'hosts': kafka_topic='aggregated-events': expected a topic of its own" in line


def test_a_source_rule_cannot_share_its_table_with_another_rule(tmp_path: Path) -> None:
    line = problem(
        tmp_path,
        [
            {"name": "mem", "match": ["mem.*"], "outputs": ["postgres"], "postgres_table": "t"},
            rule(source=3, postgres_table="t"),
        ],
    )
    assert "rule 2 'hosts': postgres_table='t': expected a table of its own" in line
    assert "rule 1 'mem'" in line


def test_a_source_rule_needs_its_own_destination_for_each_of_its_outputs(
    tmp_path: Path,
) -> None:
    line = problem(
        tmp_path, [rule(source=2, outputs=["postgres", "kafka"], postgres_table="host_metrics")]
    )
    assert "kafka_topic=None: expected a topic of its own" in line
    assert "postgres_table=" not in line.split("(docs/routes.md) (", 1)[1]


def test_a_source_beyond_vabus_url_is_still_an_error(tmp_path: Path) -> None:
    line = problem(tmp_path, [rule(source=4, postgres_table="t")])
    assert "source=4: expected the position of a source in VABUS_URL (1 to 3)" in line


def test_with_one_source_a_source_rule_needs_no_destination_of_its_own(tmp_path: Path) -> None:
    got = load(tmp_path, [rule(source=1)], url=K1)
    assert not got.by_source
