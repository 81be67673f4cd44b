"""The archive's S3 store against a real S3 protocol server (moto, in-process on a free
port): atomic puts, reads, deletes, and the writer's exactly-once step on a bucket."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from service.archive.rows import ArchiveSlice, Rows
from service.archive.stores import S3Store
from service.archive.writer import ArchiveWriter
from service.config import load_config
from service.core.clock import ManualClock
from service.core.errors import TransientError
from service.metrics.collector import MetricsCollector
from tests.archived import S3_ENV, moto_s3, s3_rows

pytestmark = pytest.mark.integration

START = 1_699_999_200.0  # the start of an hour


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, str]]:
    for k, v in S3_ENV.items():  # what the service's client reads from its environment
        monkeypatch.setenv(k, v)
    with moto_s3() as server:
        server[0].create_bucket(Bucket="raw-events")
        yield server


def store_of(endpoint: str, prefix: str = "vabus") -> S3Store:
    env = {"ARCHIVE_URL": f"s3://raw-events/{prefix}", "AWS_ENDPOINT_URL": endpoint}
    cfg = load_config(env, dotenv=None).archive
    return S3Store(cfg.bucket, cfg.path, cfg.endpoint_url)


def rows_of(*events: tuple[str, float, float]) -> Rows:
    rows = Rows()
    for name, value, ts in events:
        rows.add(name, "max", value, ts, '{"host":"h1"}')
    return rows


async def test_the_s3_store_puts_reads_and_deletes_under_its_prefix(
    s3: tuple[Any, str],
) -> None:
    client, endpoint = s3
    store = store_of(endpoint)
    try:
        await store.check()
        assert await store.get("_intents/p.json") is None
        await store.put("_intents/p.json", b"{}")
        assert await store.get("_intents/p.json") == b"{}"
        keys = [o["Key"] for o in client.list_objects_v2(Bucket="raw-events")["Contents"]]
        assert keys == ["vabus/_intents/p.json"]
        await store.delete("_intents/p.json")
        await store.delete("_intents/p.json")  # one that is not there: no error
        assert await store.get("_intents/p.json") is None
    finally:
        await store.close()


async def test_an_unreachable_or_missing_bucket_is_a_transient_failure(
    s3: tuple[Any, str],
) -> None:
    _, endpoint = s3
    missing = S3Store("no-such-bucket", "", endpoint)
    with pytest.raises(TransientError, match="no-such-bucket"):
        await missing.check()
    with pytest.raises(TransientError):
        await missing.put("x", b"1")
    await missing.close()


async def test_a_replay_supersedes_the_crashed_attempt_in_the_bucket(s3: tuple[Any, str]) -> None:
    client, endpoint = s3
    metrics = MetricsCollector(ManualClock(START))
    crashed = [("a", 1.0, START + 5), ("b", 2.0, START + 3605)]
    first = ArchiveWriter(store_of(endpoint), metrics)
    await first.write([ArchiveSlice("t:0", "10", "20", rows_of(*crashed), True)])
    again = ArchiveWriter(store_of(endpoint), metrics)  # a new process: restores 10
    await again.write([ArchiveSlice("t:0", "10", "15", rows_of(crashed[0]), True)])
    await again.write([ArchiveSlice("t:0", "15", "20", rows_of(crashed[1]), False)])
    micros = {ts: round(ts * 1_000_000) for _, _, ts in crashed}
    assert s3_rows(client, "raw-events", "vabus/") == Counter(
        {(n, "max", v, micros[ts], '{"host":"h1"}'): 1 for n, v, ts in crashed}
    )
    assert metrics.snapshot()["archive_files_written"] == 4
