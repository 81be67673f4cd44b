"""What the aggregator stage knows after applying a delivery raised.

A batch that raises half-way has changed some windows and not others, and nothing
tells which: that state is never trusted. The stage drops it and asks the bus to
deliver the partitions again from their last durable checkpoints, the path a partition
hand-off takes (:class:`~service.bus.base.PartitionsAssigned`, then a read-back of the
outputs, then the records after the checkpointed position). So whatever raised, no
event is applied twice and none is lost.

A failure that comes back on every replay must not loop. Records are numbered per
partition from its last assignment (their *ordinal*), and each checkpoint taken notes
the ordinal it covers, so a failure can be placed again in the replay that starts from
whichever checkpoint was durable:

1. a batch raises: its records become *suspect*; the replay applies them one at a time;
2. a suspect record raises on its own: the next replay dead-letters it
   (``internal_error``, with what it raised) instead of applying it, and goes on.

A transient failure costs one replay; one that repeats costs two and one dead letter.
Everything here is bookkeeping on a few integers per partition: the hot path is
untouched, and only a suspect batch is split.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final, Literal

from service.bus.base import SourceBatch
from service.checkpoints.base import PartitionCheckpoint

__all__ = ["Recovery", "Step"]

_MARKS_KEPT: Final = 64
"""Checkpoint marks kept per partition. One older than these (a store down for a long
time) cannot place a failure; the failure is then found again by one more replay."""

Step = tuple[Literal["apply", "reject"], int, int]
"""Apply ``records[i:j]`` of a batch, or dead-letter record ``i`` (then ``j == i + 1``)."""


@dataclass(slots=True)
class _Suspect:
    lo: int  # records with ordinals in [lo, hi) are applied one at a time
    hi: int
    bad: dict[int, str] = field(default_factory=dict)  # ordinal -> what it raised alone


class Recovery:
    """Per partition: ordinals, checkpoint marks, suspects, and which partitions wait
    for their re-assignment (their batches until then are stale and dropped)."""

    def __init__(self) -> None:
        self.rewinding: set[str] = set()
        self._seq: dict[str, int] = {}
        self._marks: dict[str, dict[str | None, int]] = {}
        self._suspects: dict[str, _Suspect] = {}

    def assigned(self, checkpoints: Iterable[PartitionCheckpoint]) -> None:
        """Partitions (re)assigned from these checkpoints: their ordinals restart at the
        checkpointed position; a suspect is moved to the new numbering when the
        position is one a checkpoint of ours covered, else forgotten."""
        for cp in checkpoints:
            p = cp.partition
            self.rewinding.discard(p)
            suspect = self._suspects.pop(p, None)
            base = self._marks.get(p, {}).get(cp.position)
            if suspect is not None and base is not None and suspect.hi > base:
                self._suspects[p] = _Suspect(
                    suspect.lo - base,
                    suspect.hi - base,
                    {q - base: why for q, why in suspect.bad.items() if q >= base},
                )
            self._seq[p] = 0
            self._marks[p] = {cp.position: 0}

    def checkpointed(self, checkpoints: Iterable[PartitionCheckpoint]) -> None:
        """A snapshot of these partitions was taken: note the ordinal each covers."""
        for cp in checkpoints:
            marks = self._marks.setdefault(cp.partition, {})
            marks.pop(cp.position, None)  # re-inserted as the newest
            marks[cp.position] = self._seq.get(cp.partition, 0)
            if len(marks) > _MARKS_KEPT:
                del marks[next(iter(marks))]

    def plan(self, batch: SourceBatch) -> list[Step] | None:
        """How to apply ``batch``: None for all at once (the usual case), else steps
        that take its suspect records one at a time and set aside the bad ones."""
        suspect = self._suspects.get(batch.partition)
        n = len(batch.records)
        first = self._seq.get(batch.partition, 0)
        if suspect is None or first >= suspect.hi or first + n <= suspect.lo:
            return None
        steps: list[Step] = []
        run = 0  # start of the records applied together
        for i in range(n):
            q = first + i
            if q in suspect.bad or suspect.lo <= q < suspect.hi:
                if run < i:
                    steps.append(("apply", run, i))
                steps.append(("reject" if q in suspect.bad else "apply", i, i + 1))
                run = i + 1
        if run < n:
            steps.append(("apply", run, n))
        return steps

    def why_bad(self, partition: str, i: int) -> str:
        """What record ``i`` of the partition's next batch raised when applied alone."""
        return self._suspects[partition].bad[self._seq.get(partition, 0) + i]

    def applied(self, partition: str, n: int) -> None:
        """The partition's next ``n`` records are applied (or set aside)."""
        seq = self._seq[partition] = self._seq.get(partition, 0) + n
        suspect = self._suspects.get(partition)
        if suspect is not None and seq >= suspect.hi:
            if suspect.bad:
                # Known-bad records stay known until a replay starts past them: another
                # partition's failure can rewind this one to the same checkpoint, and
                # the record must not be found again by two more raises.
                suspect.lo, suspect.hi = min(suspect.bad), max(suspect.bad) + 1
            else:
                del self._suspects[partition]

    def failed(self, partition: str, i: int, j: int, error: str) -> None:
        """Records ``[i, j)`` of the partition's next batch raised when applied
        together: they become suspect, or, one alone, bad."""
        first = self._seq.get(partition, 0)
        suspect = self._suspects.get(partition)
        if j - i == 1 and suspect is not None and suspect.lo <= first + i < suspect.hi:
            suspect.bad[first + i] = error
        elif suspect is None:
            self._suspects[partition] = _Suspect(first + i, first + j)
        else:  # a batch raised again elsewhere: widen the suspect range
            suspect.lo, suspect.hi = min(suspect.lo, first + i), max(suspect.hi, first + j)
