"""ARCHIVE_URL and AWS_ENDPOINT_URL: where accepted events are kept as Parquet files
(contract §12.9, docs/archive.md). Parsed here, before anything connects."""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import urlsplit

from service.config.archive import ArchiveConfig
from service.config.parsers import Invalid
from service.config.reader import Reader

__all__ = ["ARCHIVE_FORM", "parse_archive_url", "read_archive"]

ARCHIVE_FORM: Final = "file:///<absolute directory> or s3://<bucket>[/<prefix>]"
ENDPOINT_FORM: Final = "an http(s)://host[:port] URL of an S3-compatible endpoint"

# S3's own bucket rule (3-63 of lowercase letters, digits, dots and hyphens)
_BUCKET: Final = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def parse_archive_url(text: str) -> ArchiveConfig:
    parts = urlsplit(text)
    if parts.query or parts.fragment:
        raise Invalid("no query or fragment")
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise Invalid("a file URL names an absolute local directory, e.g. file:///var/archive")
        path = parts.path.rstrip("/") or "/"
        return ArchiveConfig(kind="file", url=text, path=path)
    if parts.scheme == "s3":
        if not _BUCKET.fullmatch(parts.netloc):
            raise Invalid(f"{parts.netloc!r} is not an S3 bucket name")
        prefix = parts.path.strip("/")
        if "//" in prefix:
            raise Invalid("an empty segment in the prefix")
        return ArchiveConfig(kind="s3", url=text, path=prefix, bucket=parts.netloc)
    raise Invalid(f"unknown scheme {parts.scheme!r}")


def _parse_endpoint(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Invalid()
    if parts.username or parts.password or parts.query or parts.fragment:
        raise Invalid("no credentials, query or fragment")
    return text.rstrip("/")


def read_archive(r: Reader) -> ArchiveConfig:
    cfg = r.custom("ARCHIVE_URL", ArchiveConfig(), parse_archive_url, ARCHIVE_FORM)
    endpoint = r.custom("AWS_ENDPOINT_URL", "", _parse_endpoint, ENDPOINT_FORM)
    if cfg.kind == "s3" and endpoint:
        return ArchiveConfig(
            kind="s3", url=cfg.url, path=cfg.path, bucket=cfg.bucket, endpoint_url=endpoint
        )
    return cfg
