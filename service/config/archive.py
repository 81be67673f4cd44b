"""The archive's section: where accepted events are kept as Parquet files (ARCHIVE_URL,
contract §12.9, docs/archive.md). Parsed by :mod:`service.config.archive_url`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["ArchiveConfig"]


@dataclass(frozen=True, slots=True)
class ArchiveConfig:
    """Empty ``kind``: no archive. ``file``: ``path`` is the directory. ``s3``: ``bucket``
    and ``path`` (the key prefix, no leading or trailing slash). Credentials are not
    here: the S3 client reads the usual AWS_* variables itself."""

    kind: Literal["", "file", "s3"] = ""
    url: str = ""
    path: str = ""
    bucket: str = ""
    endpoint_url: str = ""  # AWS_ENDPOINT_URL; empty: the client's default (AWS)

    @property
    def enabled(self) -> bool:
        return self.kind != ""
