"""The Prometheus exposition of the whole service: every worker's, merged, plus the
supervisor's own families.

A worker's text is parsed with prometheus_client's parser, never edited as text: each
sample gets the label ``worker="<index>"`` and each family appears once, holding the
samples of every worker (the text format allows one ``# TYPE`` line per name).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Final

from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from service.workers.slot import WorkerSlot

__all__ = ["WORKER_LABEL", "exposition", "merge_expositions", "supervisor_families"]

log = logging.getLogger(__name__)

WORKER_LABEL: Final = "worker"
_PREFIX: Final = "vabus_aggregator"


def merge_expositions(texts: Mapping[str, str]) -> tuple[list[Metric], list[str]]:
    """The families of every worker's text (keyed by worker index), each sample labelled
    with its worker; and the workers whose text did not parse (left out whole)."""
    merged: dict[str, Metric] = {}
    unparsable: list[str] = []
    for worker, text in texts.items():
        try:
            families = list(text_string_to_metric_families(text))
        except ValueError as exc:
            log.warning("worker %s: its /metrics did not parse (%s); left out", worker, exc)
            unparsable.append(worker)
            continue
        for family in families:
            target = merged.get(family.name)
            if target is None:
                target = Metric(family.name, family.documentation, family.type, family.unit)
                merged[family.name] = target
            target.samples.extend(
                s._replace(labels={**s.labels, WORKER_LABEL: worker}) for s in family.samples
            )
    return list(merged.values()), unparsable


def supervisor_families(
    slots: Sequence[WorkerSlot], scraped: Iterable[str], now_mono: float
) -> list[Metric]:
    """The supervisor's view: configured workers, which run, restarts, uptime, and which
    workers' metrics this scrape has (``scraped``: their indices)."""
    got = set(scraped)
    configured = GaugeMetricFamily(f"{_PREFIX}_workers", "Worker processes configured (WORKERS).")
    configured.add_metric([], len(slots))
    up = GaugeMetricFamily(
        f"{_PREFIX}_worker_up", "1 while the worker's process runs.", labels=[WORKER_LABEL]
    )
    restarts = CounterMetricFamily(
        f"{_PREFIX}_worker_restarts",
        "Times a worker was started again after it exited.",
        labels=[WORKER_LABEL],
    )
    uptime = GaugeMetricFamily(
        f"{_PREFIX}_worker_uptime_seconds",
        "Seconds since the worker's current process started (0 while none runs).",
        labels=[WORKER_LABEL],
    )
    scrape = GaugeMetricFamily(
        f"{_PREFIX}_worker_scrape_success",
        "1 if this exposition holds the worker's own metrics.",
        labels=[WORKER_LABEL],
    )
    for slot in slots:
        index = [str(slot.index)]
        up.add_metric(index, 1 if slot.alive else 0)
        restarts.add_metric(index, slot.restarts)
        uptime.add_metric(index, slot.uptime_s(now_mono) or 0.0)
        scrape.add_metric(index, 1 if str(slot.index) in got else 0)
    return [configured, up, restarts, uptime, scrape]


class _Families(Collector):
    def __init__(self, families: Sequence[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


def exposition(families: Sequence[Metric]) -> bytes:
    """Prometheus text format 0.0.4 of ``families``."""
    return generate_latest(_Families(families))
