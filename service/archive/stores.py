"""Where archive files go: a directory, or an S3-compatible bucket.

Both give the writer the one property it builds on: a ``put`` is atomic, so a file
under its final name is always whole (a directory: a temporary file, fsync, rename,
fsync of the directory; S3: a PUT is atomic by itself). Blocking calls run in a thread.
Every failure is a :class:`~service.core.errors.TransientError`: the sender retries it
with backoff and nothing is checkpointed past the events it holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from service.config.archive import ArchiveConfig
from service.core.errors import TransientError, describe_error

__all__ = ["ArchiveStore", "DirectoryStore", "S3Store", "build_store"]

_T = TypeVar("_T")


class ArchiveStore(Protocol):
    """Named blobs under the archive's root (names use ``/``)."""

    async def put(self, name: str, data: bytes) -> None: ...

    async def get(self, name: str) -> bytes | None:
        """The blob, or None when there is none."""

    async def delete(self, name: str) -> None:
        """Remove the blob; one that is not there is no error."""

    async def check(self) -> None: ...

    async def close(self) -> None: ...


async def _in_thread(what: str, call: Callable[[], _T]) -> _T:
    try:
        return await asyncio.to_thread(call)
    except TransientError:
        raise
    except Exception as exc:
        raise TransientError(f"archive {what}: {describe_error(exc)}") from exc


class DirectoryStore:
    def __init__(self, root: str) -> None:
        self.root = Path(root)

    async def put(self, name: str, data: bytes) -> None:
        await _in_thread(f"write {name}", lambda: self._put(name, data))

    def _put(self, name: str, data: bytes) -> None:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            with tmp.open("wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        _fsync_dir(path.parent)

    async def get(self, name: str) -> bytes | None:
        return await _in_thread(f"read {name}", lambda: self._get(name))

    def _get(self, name: str) -> bytes | None:
        try:
            return (self.root / name).read_bytes()
        except FileNotFoundError:
            return None

    async def delete(self, name: str) -> None:
        await _in_thread(f"delete {name}", lambda: self._delete(name))

    def _delete(self, name: str) -> None:
        path = self.root / name
        try:
            path.unlink()
        except FileNotFoundError:
            return
        _fsync_dir(path.parent)

    async def check(self) -> None:
        await _in_thread("check", self._check)

    def _check(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if not os.access(self.root, os.W_OK):
            raise TransientError(f"archive directory {self.root} is not writable")

    async def close(self) -> None:
        return None


def _fsync_dir(path: Path) -> None:
    """A rename or unlink is durable once its directory is synced."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class S3Store:
    """An S3-compatible bucket through boto3 (in a thread). Endpoint from
    AWS_ENDPOINT_URL; region and credentials from the usual AWS_* variables."""

    def __init__(self, bucket: str, prefix: str, endpoint_url: str = "") -> None:
        self.bucket = bucket
        self.prefix = f"{prefix}/" if prefix else ""
        self.endpoint_url = endpoint_url or None
        self._client: Any = None

    def _s3(self) -> Any:
        if self._client is None:
            import boto3  # imported only when an s3:// archive is configured
            from botocore.config import Config

            config = Config(retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=5)
            self._client = boto3.session.Session().client(
                "s3", endpoint_url=self.endpoint_url, config=config
            )
        return self._client

    async def put(self, name: str, data: bytes) -> None:
        key = self.prefix + name
        await _in_thread(
            f"put {key}", lambda: self._s3().put_object(Bucket=self.bucket, Key=key, Body=data)
        )

    async def get(self, name: str) -> bytes | None:
        key = self.prefix + name
        return await _in_thread(f"get {key}", lambda: self._get(key))

    def _get(self, key: str) -> bytes | None:
        s3 = self._s3()
        try:
            answer = s3.get_object(Bucket=self.bucket, Key=key)
        except s3.exceptions.NoSuchKey:
            return None
        body: bytes = answer["Body"].read()
        return body

    async def delete(self, name: str) -> None:
        key = self.prefix + name
        await _in_thread(
            f"delete {key}", lambda: self._s3().delete_object(Bucket=self.bucket, Key=key)
        )

    async def check(self) -> None:
        await _in_thread(
            f"bucket {self.bucket}", lambda: self._s3().head_bucket(Bucket=self.bucket)
        )

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await asyncio.to_thread(client.close)


def build_store(cfg: ArchiveConfig) -> ArchiveStore:
    if cfg.kind == "s3":
        return S3Store(cfg.bucket, cfg.path, cfg.endpoint_url)
    return DirectoryStore(cfg.path)
