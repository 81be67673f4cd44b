"""The merged exposition of WORKERS=N: each worker's families, parsed, every sample
labelled with its worker, each family once; plus the supervisor's own families."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from service.core.clock import ManualClock
from service.metrics.collector import MetricsCollector
from service.workers.exposition import exposition, merge_expositions, supervisor_families
from service.workers.slot import WorkerSlot


def worker_text(received: int, *, latency: float | None = None) -> str:
    metrics = MetricsCollector(ManualClock())
    metrics.on_messages_received("kafka", received, received)
    metrics.on_events_rejected("invalid_json", 2)
    if latency is not None:
        metrics.emit_to_durable.observe(latency)
    return metrics.exposition().decode()


def families_of(text: str) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    return {
        f.name: [(s.name, s.labels, s.value) for s in f.samples]
        for f in text_string_to_metric_families(text)
    }


def test_every_sample_gets_its_worker_label_and_each_family_appears_once() -> None:
    families, unparsable = merge_expositions({"0": worker_text(5), "1": worker_text(7)})
    text = exposition(families).decode()
    assert unparsable == []
    assert text.count("# TYPE vabus_aggregator_events_received_total counter") == 1
    parsed = families_of(text)
    assert parsed["vabus_aggregator_events_received"] == [
        ("vabus_aggregator_events_received_total", {"worker": "0"}, 5.0),
        ("vabus_aggregator_events_received_total", {"worker": "1"}, 7.0),
    ]
    rejected = parsed["vabus_aggregator_events_rejected"]
    assert (
        "vabus_aggregator_events_rejected_total",
        {"reason": "invalid_json", "worker": "1"},
        2.0,
    ) in rejected


def test_histograms_keep_their_buckets_per_worker() -> None:
    families, _ = merge_expositions({"0": worker_text(1, latency=0.02), "1": worker_text(1)})
    parsed = families_of(exposition(families).decode())
    samples = parsed["vabus_aggregator_emit_to_durable_seconds"]
    counts = {s[1]["worker"]: s[2] for s in samples if s[0].endswith("_count")}
    assert counts == {"0": 1.0, "1": 0.0}
    buckets = [s for s in samples if s[0].endswith("_bucket") and s[1]["worker"] == "0"]
    assert {"le", "worker"} == set(buckets[0][1])


def test_a_worker_whose_text_does_not_parse_is_left_out_and_named() -> None:
    families, unparsable = merge_expositions({"0": worker_text(3), "1": "not { prometheus"})
    assert unparsable == ["1"]
    parsed = families_of(exposition(families).decode())
    assert [s[1]["worker"] for s in parsed["vabus_aggregator_events_received"]] == ["0"]


def test_supervisor_families_show_which_workers_run_restarted_and_were_scraped() -> None:
    slots = [WorkerSlot(0), WorkerSlot(1)]
    slots[1].restarts = 3
    parsed = families_of(exposition(supervisor_families(slots, ["1"], 10.0)).decode())
    assert parsed["vabus_aggregator_workers"] == [("vabus_aggregator_workers", {}, 2.0)]
    restarts = parsed["vabus_aggregator_worker_restarts"]
    assert [(s[1]["worker"], s[2]) for s in restarts] == [("0", 0.0), ("1", 3.0)]
    assert [s[2] for s in parsed["vabus_aggregator_worker_up"]] == [0.0, 0.0]
    assert [s[2] for s in parsed["vabus_aggregator_worker_scrape_success"]] == [0.0, 1.0]
