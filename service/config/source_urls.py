"""VABUS_URL with several sources (contract §12.8): bus URLs separated by whitespace.

One URL parses exactly as it always did. Several each become a source, numbered from 1
in the order given; a problem names the source's position and its URL. A source given
twice, or two Kafka sources in one consumer group on one cluster, would read (and
count) the same events twice or churn each other's rebalances, so both are refused.
"""

from __future__ import annotations

import re
from typing import Final

from service.config.masking import mask_password
from service.config.parsers import DEMO_FORM, HTTP_FORM, KAFKA_FORM, Invalid, parse_bus_url
from service.config.sections import BusConfig

__all__ = ["SOURCES_FORM", "parse_bus_urls"]

_URL_START: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")

SOURCES_FORM: Final = (
    f"{HTTP_FORM} or {KAFKA_FORM}, several separated by whitespace (each its own source; "
    f"{DEMO_FORM} only alone)"
)


def parse_bus_urls(value: str) -> tuple[BusConfig, ...]:
    """The sources of ``value``, in order (one or more). Text that is not a list of
    ``scheme://`` URLs, or that holds credentials (``@``; a password may hold a space),
    is one URL, parsed (and refused, its password masked) as it always was: no piece of
    a password is ever shown as a URL of its own."""
    urls = value.split()
    if len(urls) <= 1 or "@" in value or not all(_URL_START.match(url) for url in urls):
        return (parse_bus_url(value),)
    sources = tuple(_source(k, url) for k, url in enumerate(urls, start=1))
    for k, source in enumerate(sources, start=1):
        for j, earlier in enumerate(sources[: k - 1], start=1):
            _check_pair(k, source, j, earlier)
    return sources


def _source(k: int, url: str) -> BusConfig:
    where = f"source {k} {mask_password(url)!r}"
    try:
        source = parse_bus_url(url)
    except Invalid as error:
        raise Invalid(f"{where}: {error.detail or 'not a bus URL'}", SOURCES_FORM) from None
    except ValueError:
        raise Invalid(f"{where}: not a bus URL", SOURCES_FORM) from None
    if source.kind == "demo":
        raise Invalid(f"{where}: demo:// is a source only alone", SOURCES_FORM)
    return source


def _check_pair(k: int, source: BusConfig, j: int, earlier: BusConfig) -> None:
    if source.url == earlier.url:
        raise Invalid(f"source {k} repeats source {j}", SOURCES_FORM)
    shared = set(source.kafka_bootstrap_servers) & set(earlier.kafka_bootstrap_servers)
    if source.kind == earlier.kind == "kafka" and shared:
        if source.kafka_topic == earlier.kafka_topic:
            raise Invalid(
                f"source {k} reads topic {source.kafka_topic!r} as source {j} does", SOURCES_FORM
            )
        if source.kafka_group == earlier.kafka_group:
            raise Invalid(
                f"source {k} uses consumer group {source.kafka_group!r} on the cluster of "
                f"source {j}: give each kafka:// source its own ?group=",
                SOURCES_FORM,
            )
