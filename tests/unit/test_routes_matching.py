"""Router: first match wins, tags match exactly, each output gets its routes' share."""

from __future__ import annotations

from service.core.events import Aggregate
from service.routes import DEFAULT_ROUTE, Route, Router, Routes


def agg(name: str, tags: dict[str, str] | None = None) -> Aggregate:
    return Aggregate(name, "sum", 1.0, 1, 0.0, 60.0, 60.0, tags=tags)


def router(*rules: Route) -> Router:
    return Router(
        Routes(rules=rules),
        outputs=("kafka", "postgres"),
        kafka_topic="aggregated-events",
        postgres_table="aggregated_events",
    )


HOSTS = Route("hosts", ("cpu.*", "mem.*"), ("postgres",), postgres_table="host_metrics")
BILLING = Route("billing", ("billing.*",), ("kafka", "postgres"), kafka_topic="billing-aggregates")


def test_first_matching_rule_wins() -> None:
    r = router(Route("one", ("cpu.user",), ("kafka",)), Route("two", ("cpu.*",), ("kafka",)))
    assert r.route_of(agg("cpu.user")) == "one"
    assert r.route_of(agg("cpu.system")) == "two"
    swapped = router(Route("two", ("cpu.*",), ("kafka",)), Route("one", ("cpu.user",), ("kafka",)))
    assert swapped.route_of(agg("cpu.user")) == "two"


def test_unmatched_aggregates_take_the_default_route() -> None:
    assert router(HOSTS).route_of(agg("disk.io")) == DEFAULT_ROUTE


def test_any_glob_of_a_rule_may_match_and_globs_match_the_whole_name() -> None:
    r = router(HOSTS)
    assert r.route_of(agg("mem.free")) == "hosts"
    assert r.route_of(agg("xcpu.user")) == DEFAULT_ROUTE
    assert r.route_of(agg("CPU.user")) == DEFAULT_ROUTE  # case matters, as in names


def test_tags_must_all_match_exactly() -> None:
    eu = Route("eu", ("*",), ("kafka",), tags=(("region", "eu"), ("tier", "1")))
    r = router(eu)
    assert r.route_of(agg("x", {"region": "eu", "tier": "1", "host": "a"})) == "eu"
    assert r.route_of(agg("x", {"region": "eu"})) == DEFAULT_ROUTE
    assert r.route_of(agg("x", {"region": "us", "tier": "1"})) == DEFAULT_ROUTE
    assert r.route_of(agg("x")) == DEFAULT_ROUTE


def test_a_cached_decision_does_not_leak_across_tag_sets() -> None:
    r = router(Route("eu", ("x",), ("kafka",), tags=(("region", "eu"),)))
    assert r.route_of(agg("x", {"region": "us"})) == DEFAULT_ROUTE
    assert r.route_of(agg("x", {"region": "eu"})) == "eu"
    assert r.route_of(agg("x", {"region": "us"})) == DEFAULT_ROUTE


def test_split_gives_each_output_its_routes_with_their_destinations() -> None:
    r = router(HOSTS, BILLING)
    batch = [agg("cpu.user"), agg("billing.eur"), agg("web.hits"), agg("mem.free")]
    assert [
        (route, dest, [a.name for a in aggs]) for route, dest, aggs in r.split(batch, "kafka")
    ] == [
        ("billing", "billing-aggregates", ["billing.eur"]),
        (DEFAULT_ROUTE, "aggregated-events", ["web.hits"]),
    ]
    assert [
        (route, dest, [a.name for a in aggs]) for route, dest, aggs in r.split(batch, "postgres")
    ] == [
        ("hosts", "host_metrics", ["cpu.user", "mem.free"]),
        ("billing", "aggregated_events", ["billing.eur"]),
        (DEFAULT_ROUTE, "aggregated_events", ["web.hits"]),
    ]


def test_destinations_list_every_topic_and_table_an_output_may_write() -> None:
    r = router(HOSTS, BILLING)
    assert r.destinations("kafka") == ("aggregated-events", "billing-aggregates")
    assert r.destinations("postgres") == ("aggregated_events", "host_metrics")


def test_describe_shows_where_each_route_writes() -> None:
    rows = router(HOSTS, BILLING).describe()
    assert [(row["name"], row["writes_to"]) for row in rows] == [
        ("hosts", {"postgres": "host_metrics"}),
        ("billing", {"kafka": "billing-aggregates", "postgres": "aggregated_events"}),
        (DEFAULT_ROUTE, {"kafka": "aggregated-events", "postgres": "aggregated_events"}),
    ]
