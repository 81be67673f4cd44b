"""ROUTES_FILE: the routing rules, read and checked with the rest of the configuration
(service.routes.validation), so that a bad rule exits 2 before anything connects."""

from __future__ import annotations

from typing import Final

from service.config.parsers import parse_identifier, parse_topic
from service.config.reader import Reader
from service.config.sections import Config
from service.routes.rules import Routes
from service.routes.validation import RouteContext, RoutesProblem, read_routes_file

__all__ = ["ROUTES_FORM", "read_routes"]

ROUTES_FORM: Final = (
    'a YAML or JSON file {"routes": [{"name", "match": [globs], "outputs": [...], '
    '"source"?, "tags"?, "postgres_table"?, "kafka_topic"?}]} (docs/routes.md)'
)


def read_routes(r: Reader, config: Config) -> Routes:
    """The rules of ROUTES_FILE (none when unset); every problem with them is reported
    as one ROUTES_FILE problem, each rule's named in it."""
    path = r.custom("ROUTES_FILE", None, str, ROUTES_FORM)
    if path is None:
        return Routes()
    ctx = RouteContext(
        outputs=config.outputs,
        group_by=config.aggregation.group_by,
        sources=len(config.sources),
        default_table=config.postgres.table,
        default_topic=config.kafka.topic,
        table_ok=parse_identifier,
        topic_ok=parse_topic,
        reserved_tables=(config.postgres.dead_letter_table,),
        reserved_topics=tuple(
            dict.fromkeys(
                [
                    config.kafka.dlq_topic,
                    *(
                        topic
                        for bus in config.sources
                        if bus.kind == "kafka"
                        for topic in (bus.kafka_topic, bus.kafka_metrics_topic)
                    ),
                ]
            )
        ),
    )
    try:
        return read_routes_file(path, ctx)
    except RoutesProblem as exc:
        # one ROUTES_FILE problem (the reader keeps one per variable), a line per rule's
        r.fail("ROUTES_FILE", ROUTES_FORM, "".join(f"\n      {p}" for p in exc.problems))
        return Routes()
