"""The stage's bookkeeping after a failed batch: where a failure is in the replay."""

from __future__ import annotations

from service.aggregation.recovery import Recovery
from service.bus.base import SourceBatch
from service.checkpoints.base import PartitionCheckpoint


def batch(n: int, partition: str = "p") -> SourceBatch:
    return SourceBatch(partition, list(range(n)), "test", None, 0.0)


def cp(position: str | None, partition: str = "p") -> PartitionCheckpoint:
    return PartitionCheckpoint(partition, position, None)


def test_without_a_failure_every_batch_is_applied_whole() -> None:
    r = Recovery()
    r.assigned([cp(None)])
    assert r.plan(batch(10)) is None
    r.applied("p", 10)
    assert r.plan(batch(10)) is None


def test_a_failed_batch_is_applied_one_record_at_a_time_in_the_replay() -> None:
    r = Recovery()
    r.assigned([cp("0")])
    r.applied("p", 10)  # records 0..9
    r.checkpointed([cp("10")])
    r.applied("p", 5)  # 10..14
    r.failed("p", 2, 6, "RuntimeError: boom")  # a batch of 4 from 15: records 17..20 raised
    r.assigned([cp("10")])  # delivered again from the checkpoint at 10
    assert r.plan(batch(5)) is None  # 10..14 as before
    r.applied("p", 5)
    assert r.plan(batch(8)) == [
        ("apply", 0, 2),
        ("apply", 2, 3),
        ("apply", 3, 4),
        ("apply", 4, 5),
        ("apply", 5, 6),
        ("apply", 6, 8),
    ]
    r.applied("p", 8)  # nothing raised this time: a transient failure
    assert r.plan(batch(8)) is None


def test_a_record_that_raises_alone_is_rejected_in_the_next_replay() -> None:
    r = Recovery()
    r.assigned([cp("0")])
    r.failed("p", 0, 4, "RuntimeError: boom")
    r.assigned([cp("0")])
    assert r.plan(batch(4)) == [("apply", i, i + 1) for i in range(4)]
    r.failed("p", 2, 3, "RuntimeError: boom")  # record 2 raised alone
    r.assigned([cp("0")])
    assert r.plan(batch(6)) == [
        ("apply", 0, 1),
        ("apply", 1, 2),
        ("reject", 2, 3),
        ("apply", 3, 4),
        ("apply", 4, 6),
    ]
    assert r.why_bad("p", 2) == "RuntimeError: boom"
    r.applied("p", 6)
    assert r.plan(batch(4)) is None


def test_a_rejected_record_stays_rejected_when_another_failure_rewinds_again() -> None:
    r = Recovery()
    r.assigned([cp("0")])
    r.failed("p", 0, 4, "RuntimeError: boom")
    r.assigned([cp("0")])
    r.failed("p", 2, 3, "RuntimeError: boom")  # record 2 raised alone
    r.assigned([cp("0")])
    assert r.plan(batch(6)) is not None
    r.applied("p", 6)  # record 2 set aside, the others applied
    assert r.plan(batch(4)) is None  # later records: all at once
    r.assigned([cp("0")])  # another partition's failure rewinds this one too
    assert r.plan(batch(6)) == [("apply", 0, 2), ("reject", 2, 3), ("apply", 3, 6)]
    r.applied("p", 6)
    r.checkpointed([cp("6")])
    r.assigned([cp("6")])  # a replay that starts past it has no use for it
    assert r.plan(batch(6)) is None


def test_a_replay_from_a_checkpoint_that_no_mark_covers_forgets_the_failure() -> None:
    r = Recovery()
    r.assigned([cp("0")])
    r.applied("p", 3)
    r.failed("p", 0, 2, "RuntimeError: boom")
    r.assigned([cp("elsewhere")])
    assert r.plan(batch(10)) is None  # found again by one more replay, if it repeats


def test_rewinding_partitions_wait_for_their_assignment() -> None:
    r = Recovery()
    r.rewinding.update({"p", "q"})
    r.assigned([cp("0")])
    assert r.rewinding == {"q"}
