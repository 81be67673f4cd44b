"""FileCheckpointStore keeps every partition's checkpoint in one atomically replaced file."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from service.checkpoints.base import PartitionCheckpoint
from service.checkpoints.file import CheckpointFileError, FileCheckpointStore, file_stem
from service.core.errors import PermanentError, TransientError


def cp(partition: str, position: str | None, state: bytes | None) -> PartitionCheckpoint:
    return PartitionCheckpoint(partition=partition, position=position, state=state)


async def test_saved_checkpoints_load_back_after_a_restart(tmp_path: Path) -> None:
    state_dir = tmp_path / "does" / "not" / "exist"
    async with FileCheckpointStore(str(state_dir), "kafka:events:group") as store:
        assert await store.load(["0", "1"]) == {}
        await store.save([cp("0", "42", b"\x00\xffstate"), cp("1", None, None)])

    async with FileCheckpointStore(str(state_dir), "kafka:events:group") as reopened:
        loaded = await reopened.load(["0", "1", "2"])
    assert loaded == {"0": cp("0", "42", b"\x00\xffstate"), "1": cp("1", None, None)}


async def test_save_merges_partitions_and_keeps_the_ones_not_given(tmp_path: Path) -> None:
    async with FileCheckpointStore(str(tmp_path), "ns") as store:
        await store.save([cp("a", "1", b"a1"), cp("b", "1", b"b1")])
        await store.save([cp("a", "2", b"a2")])
    async with FileCheckpointStore(str(tmp_path), "ns") as store:
        assert await store.load(["a", "b"]) == {"a": cp("a", "2", b"a2"), "b": cp("b", "1", b"b1")}


async def test_save_replaces_the_file_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    async with FileCheckpointStore(str(tmp_path), "ns") as store:
        await store.save([cp("a", "1", b"x" * 10_000)])
        inode_before = store.path.stat().st_ino
        await store.save([cp("a", "2", b"y")])
        # A rename installs a new inode; an in-place rewrite would keep the old one.
        assert store.path.stat().st_ino != inode_before
    assert [p.name for p in tmp_path.iterdir()] == [store.path.name]


async def test_a_failed_save_leaves_the_old_file_and_the_view_unchanged(tmp_path: Path) -> None:
    async with FileCheckpointStore(str(tmp_path), "ns") as store:
        await store.save([cp("a", "1", b"old")])
        before = store.path.read_bytes()
        # A directory where the temporary file goes makes the write fail, even as root.
        (tmp_path / f".{file_stem('ns')}.checkpoint.tmp").mkdir()
        with pytest.raises(
            PermanentError, match=r"STATE_DIR .* must be a directory the service"
        ) as info:
            await store.save([cp("a", "2", b"new")])
        assert isinstance(info.value.__cause__, IsADirectoryError)
        assert store.path.read_bytes() == before
        assert await store.load(["a"]) == {"a": cp("a", "1", b"old")}
        (tmp_path / f".{file_stem('ns')}.checkpoint.tmp").rmdir()  # the cause removed
        await store.save([cp("a", "2", b"new")])
        assert await store.load(["a"]) == {"a": cp("a", "2", b"new")}


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (errno.ENOSPC, TransientError),
        (errno.EIO, TransientError),
        (errno.EACCES, PermanentError),
        (errno.EROFS, PermanentError),
    ],
)
async def test_a_failing_write_is_a_service_error_that_says_whether_to_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, kind: type[Exception]
) -> None:
    def refuse(self: FileCheckpointStore, view: object) -> None:
        raise OSError(code, os.strerror(code), str(self._tmp_path))

    async with FileCheckpointStore(str(tmp_path), "ns") as store:
        monkeypatch.setattr(FileCheckpointStore, "_write", refuse)
        with pytest.raises(
            kind, match=f"saving checkpoints in STATE_DIR {tmp_path} failed"
        ) as info:
            await store.save([cp("a", "1", b"x")])
    assert os.strerror(code) in str(info.value)


async def test_namespaces_are_kept_in_separate_files(tmp_path: Path) -> None:
    async with FileCheckpointStore(str(tmp_path), "http:http://a/x") as one:
        await one.save([cp("p", "1", None)])
    async with FileCheckpointStore(str(tmp_path), "http:http://a_x") as other:
        assert await other.load(["p"]) == {}
    assert len(list(tmp_path.iterdir())) == 1


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda data: data[: len(data) - 5], "corrupt"),
        (lambda data: data.replace(b'"42"', b'"43"'), "corrupt"),
        (lambda data: b"garbage\n" + data, "not a VaBus checkpoint"),
        (lambda data: data.replace(b"VABUS-CHECKPOINT 1 ", b"VABUS-CHECKPOINT 9 "), "version 9"),
        (lambda data: b"", "not a VaBus checkpoint"),
    ],
    ids=["truncated", "bit-flipped", "foreign", "unknown-version", "empty"],
)
async def test_a_damaged_file_is_refused_instead_of_starting_from_zero(
    tmp_path: Path, damage: Callable[[bytes], bytes], message: str
) -> None:
    async with FileCheckpointStore(str(tmp_path), "ns") as store:
        await store.save([cp("0", "42", b"state")])
    store.path.write_bytes(damage(store.path.read_bytes()))

    with pytest.raises(CheckpointFileError, match=message):
        await FileCheckpointStore(str(tmp_path), "ns").start()


async def test_a_store_that_was_not_started_refuses_to_answer(tmp_path: Path) -> None:
    store = FileCheckpointStore(str(tmp_path), "ns")
    with pytest.raises(RuntimeError, match="not started"):
        await store.load(["0"])
