"""The Prometheus exposition of the whole service: every worker's, merged, plus the
supervisor's own families.

A worker's text is parsed with prometheus_client's parser, never edited as text: each
sample gets the label ``worker="<index>"`` and each family appears once, holding the
samples of every worker (the text format allows one ``# TYPE`` line per name).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence

from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from service.metrics.definitions import SUPERVISOR, WORKER_LABEL, Values
from service.metrics.views import computed_family
from service.workers.slot import WorkerSlot

__all__ = ["WORKER_LABEL", "exposition", "merge_expositions", "supervisor_families"]

log = logging.getLogger(__name__)


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
    per_slot: dict[str, Callable[[WorkerSlot], float]] = {
        "worker_up": lambda slot: 1 if slot.alive else 0,
        "worker_restarts": lambda slot: slot.restarts,
        "worker_uptime_seconds": lambda slot: slot.uptime_s(now_mono) or 0.0,
        "worker_scrape_success": lambda slot: 1 if str(slot.index) in got else 0,
    }
    values: dict[str, Values] = {"workers": {(): len(slots)}}
    for name, read in per_slot.items():
        values[name] = {(str(slot.index),): read(slot) for slot in slots}
    return [computed_family(d, values[d.name]) for d in SUPERVISOR]


class _Families(Collector):
    def __init__(self, families: Sequence[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


def exposition(families: Sequence[Metric]) -> bytes:
    """Prometheus text format 0.0.4 of ``families``."""
    return generate_latest(_Families(families))
