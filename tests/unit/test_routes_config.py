"""ROUTES_FILE: read with the configuration, every problem named by rule, key and value."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from service.config import Config, load_config
from service.core.errors import ConfigError
from service.routes import Route

DSN = "postgresql://agg@db.example:5432/metrics"
BOTH = {"STORAGE_TYPE": "kafka,postgres", "POSTGRES_DSN": DSN}

ACCEPTANCE = """\
routes:
  - name: hosts
    match: ["cpu.*"]
    outputs: [postgres]
    postgres_table: host_metrics
  - name: billing
    match: ["billing.*"]
    outputs: [kafka, postgres]
    kafka_topic: billing-aggregates
"""


def load(path: Path, **env: str) -> Config:
    return load_config({"ROUTES_FILE": str(path), **BOTH, **env}, dotenv=None)


def routes_problem(tmp_path: Path, routes: Any, name: str = "r.json", **env: str) -> str:
    path = tmp_path / name
    path.write_text(routes if isinstance(routes, str) else json.dumps(routes))
    with pytest.raises(ConfigError) as caught:
        load(path, **env)
    [line] = [p for p in caught.value.problems if p.startswith("ROUTES_FILE=")]
    return line


def rule(**fields: Any) -> dict[str, Any]:
    return {"name": "r", "match": ["a.*"], "outputs": ["kafka"], **fields}


def test_without_routes_file_there_are_no_rules() -> None:
    config = load_config(BOTH, dotenv=None)
    assert not config.routes
    assert config.routes.rules == ()


def test_yaml_file_gives_the_rules_in_order(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(ACCEPTANCE)
    routes = load(path).routes
    assert routes.rules == (
        Route("hosts", ("cpu.*",), ("postgres",), postgres_table="host_metrics"),
        Route("billing", ("billing.*",), ("kafka", "postgres"), kafka_topic="billing-aggregates"),
    )
    assert routes.tables() == ("host_metrics",)
    assert routes.topics() == ("billing-aggregates",)


def test_json_file_reads_the_same_as_yaml(tmp_path: Path) -> None:
    yaml_path = tmp_path / "routes.yaml"
    yaml_path.write_text(ACCEPTANCE)
    json_path = tmp_path / "routes.json"
    json_path.write_text(
        json.dumps(
            {
                "routes": [
                    {
                        "name": "hosts",
                        "match": ["cpu.*"],
                        "outputs": ["postgres"],
                        "postgres_table": "host_metrics",
                    },
                    {
                        "name": "billing",
                        "match": ["billing.*"],
                        "outputs": ["kafka", "postgres"],
                        "kafka_topic": "billing-aggregates",
                    },
                ]
            }
        )
    )
    assert load(json_path).routes.rules == load(yaml_path).routes.rules


def test_tag_values_are_kept_as_the_aggregator_stores_them(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"routes": [rule(tags={"on": True, "n": 2, "x": 1.5, "r": "eu"})]}))
    config = load(path, AGGREGATION_GROUP_BY="on,n,x,r")
    assert config.routes.rules[0].tags == (("n", "2"), ("on", "true"), ("r", "eu"), ("x", "1.5"))


@pytest.mark.parametrize(
    ("routes", "expected"),
    [
        ({"routes": [rule(colour="red")]}, "rule 1 'r': colour='red': expected only the keys"),
        ({"routes": [rule(match=["a["])]}, "rule 1 'r': match='a[': expected a non-empty list"),
        ({"routes": [rule(match=[])]}, "rule 1 'r': match=[]: expected a non-empty list"),
        ({"routes": [rule(match=[""])]}, "rule 1 'r': match='': expected"),
        ({"routes": [rule(outputs=["s3"])]}, "rule 1 'r': outputs=['s3']: expected a non-empty"),
        ({"routes": [rule(outputs=[])]}, "rule 1 'r': outputs=[]: expected a non-empty list"),
        ({"routes": [rule(tags={"region": "eu"})]}, "rule 1 'r': tags.region='eu': expected"),
        ({"routes": [rule(source=2)]}, "rule 1 'r': source=2: expected the position of a source"),
        ({"routes": [rule(source="1")]}, "rule 1 'r': source='1': expected the position"),
        (
            {"routes": [rule(outputs=["postgres"], postgres_table="bad-name")]},
            "rule 1 'r': postgres_table='bad-name': expected an SQL table name",
        ),
        (
            {"routes": [rule(outputs=["postgres"], postgres_table="dead_letters")]},
            "rule 1 'r': postgres_table='dead_letters': expected an SQL table name other than",
        ),
        (
            {"routes": [rule(outputs=["postgres"], postgres_table="vabus_checkpoints")]},
            "rule 1 'r': postgres_table='vabus_checkpoints': expected",
        ),
        (
            {"routes": [rule(outputs=["kafka"], postgres_table="t")]},
            "rule 1 'r': postgres_table='t': expected an SQL table name other than "
            "dead_letters, vabus_*, with postgres in outputs",
        ),
        (
            {"routes": [rule(kafka_topic="bad topic")]},
            "rule 1 'r': kafka_topic='bad topic': expected a Kafka topic name",
        ),
        (
            {"routes": [rule(kafka_topic="aggregated-events.dlq")]},
            "rule 1 'r': kafka_topic='aggregated-events.dlq': expected a Kafka topic name other",
        ),
        (
            {"routes": [rule(kafka_topic="vabus-checkpoints.g")]},
            "rule 1 'r': kafka_topic='vabus-checkpoints.g': expected a Kafka topic name other "
            "than aggregated-events.dlq, vabus-*, with kafka in outputs",
        ),
        ({"routes": [rule(name="default")]}, "rule 1 'default': name='default': expected"),
        ({"routes": [rule(name="")]}, "rule 1 '': name='': expected a unique rule name"),
        ({"routes": [rule(), rule()]}, "rule 2 'r': name='r': expected a name no other rule"),
        ({"routes": ["x"]}, "rule 1: rule='x': expected an object"),
        ({"routes": []}, "routes=[]: expected a non-empty list of rules"),
        ({"rules": []}, "top level ['rules']: expected an object with one key, 'routes'"),
    ],
)
def test_each_bad_rule_is_named_with_its_key_value_and_form(
    tmp_path: Path, routes: Any, expected: str
) -> None:
    assert expected in routes_problem(tmp_path, routes)


def test_every_problem_of_every_rule_is_reported_at_once(tmp_path: Path) -> None:
    line = routes_problem(
        tmp_path,
        {"routes": [rule(name="a", outputs=["s3"]), rule(name="b", colour=1), rule(name="a")]},
    )
    assert "rule 1 'a': outputs=['s3']" in line
    assert "rule 2 'b': colour=1" in line
    assert "rule 3 'a': name='a': expected a name no other rule has (rule 1 has it)" in line


def test_tag_keys_must_be_among_group_by(tmp_path: Path) -> None:
    line = routes_problem(
        tmp_path, {"routes": [rule(tags={"host": "a", "zone": [1]})]}, AGGREGATION_GROUP_BY="zone"
    )
    assert "tags.host='a': expected an object of AGGREGATION_GROUP_BY keys" in line
    assert "tags.zone=[1]" in line


def test_source_one_is_accepted_while_vabus_url_holds_one_source(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"routes": [rule(source=1)]}))
    assert load(path, VABUS_URL="http://bus.example:8080").routes.rules[0].source == 1


def test_the_bus_topic_cannot_be_a_routes_topic(tmp_path: Path) -> None:
    line = routes_problem(
        tmp_path,
        {"routes": [rule(kafka_topic="events")]},
        VABUS_URL="kafka://broker.example:9092/events",
    )
    assert "kafka_topic='events'" in line


def test_broken_yaml_and_a_missing_file_are_problems(tmp_path: Path) -> None:
    assert "not valid YAML" in routes_problem(tmp_path, "routes: [", name="r.yaml")
    with pytest.raises(ConfigError) as caught:
        load(tmp_path / "absent.yaml")
    assert any("cannot read the file" in p for p in caught.value.problems)


def test_problems_are_reported_by_check_before_connecting(tmp_path: Path) -> None:
    """The CLI's exit 2 comes from ConfigError: the line names ROUTES_FILE and its value."""
    line = routes_problem(tmp_path, {"routes": [rule(outputs=["s3"])]})
    assert line.startswith(f"ROUTES_FILE='{tmp_path / 'r.json'}': expected a YAML or JSON file")
