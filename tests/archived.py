"""Reading an archive back (tests): every Parquet file under a directory, as rows."""

from __future__ import annotations

import contextlib
import urllib.request
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["S3_ENV", "Row", "archive_files", "archive_rows", "moto_s3", "rows_of_blobs", "s3_rows"]

Row = tuple[str, str, float, int, str | None]
"""(name, agg_func, value, timestamp in microseconds, tags)"""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def archive_files(root: Path) -> list[Path]:
    """The data files a reader globbing ``**/*.parquet`` sees (no intents, no temporaries)."""
    return sorted(p for p in root.rglob("*.parquet") if not p.name.startswith("."))


def archive_rows(root: Path) -> Counter[Row]:
    """Every archived event under a directory, counted (a duplicate counts 2). A file
    that a running service supersedes between listing and reading is left out."""
    blobs = []
    for path in archive_files(root):
        with contextlib.suppress(FileNotFoundError):
            blobs.append((str(path.relative_to(root)), path.read_bytes()))
    return rows_of_blobs(blobs)


def s3_rows(client: Any, bucket: str, prefix: str) -> Counter[Row]:
    """Every archived event under an S3 prefix (boto3 ``client``), counted; as
    :func:`archive_rows`, a file deleted since the listing is left out."""
    blobs = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            key = obj["Key"]
            if key.endswith(".parquet") and not key.rsplit("/", 1)[-1].startswith("."):
                try:
                    body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
                except client.exceptions.NoSuchKey:  # superseded since the listing
                    continue
                blobs.append((key, body))
    return rows_of_blobs(blobs)


def rows_of_blobs(blobs: Any) -> Counter[Row]:
    """``(name, bytes)`` of Parquet files (names ending ``hour=…/<file>``) as rows; each
    row must sit in the directory of its own hour."""
    rows: Counter[Row] = Counter()
    for name, data in blobs:
        table = pq.read_table(pa.BufferReader(data))
        hour = name.rsplit("/", 2)[-2]
        for r in table.to_pylist():
            ts = r["timestamp"]
            micros = (ts - _EPOCH) // timedelta(microseconds=1)
            assert hour == f"hour={ts:%Y-%m-%dT%H}", (name, ts)
            rows[(r["name"], r["agg_func"], r["value"], micros, r["tags"])] += 1
    return rows


S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
"""Credentials and region for a moto server (it accepts any)."""


@contextlib.contextmanager
def moto_s3() -> Iterator[tuple[Any, str]]:
    """A moto S3 server in this process, on 127.0.0.1 and a free port: (a boto3 client,
    the endpoint URL)."""
    import boto3
    from moto.server import ThreadedMotoServer

    from tests.e2e.workload import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    # moto keeps its buckets in this process, not in the server: start from none, or a
    # bucket of an earlier test (another server, same process) is still there
    with urllib.request.urlopen(
        urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")
    ):
        pass
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
        region_name=S3_ENV["AWS_DEFAULT_REGION"],
    )
    try:
        yield client, endpoint
    finally:
        client.close()
        server.stop()
