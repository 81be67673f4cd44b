"""Dead letters of the aggregator: one per rejected element, rolled up per message past
:data:`DEAD_LETTERS_PER_MESSAGE` (one per reason with its count; the ledger and the
metrics still count each element)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

from service.aggregation.decode import WireEvent, element_of, raw_text
from service.bus.base import SourceBatch
from service.core.clock import Clock
from service.core.events import DeadLetter
from service.metrics.collector import MetricsCollector

if TYPE_CHECKING:
    from service.pipeline.flow import Outputs

__all__ = ["DEAD_LETTERS_PER_MESSAGE", "DeadLetters", "RawOf", "raw_of"]

DEAD_LETTERS_PER_MESSAGE: Final = 100


def raw_of(ev: WireEvent, evs: Sequence[WireEvent], raws: list[Any] | None, record: Any) -> Any:
    """The raw element behind ``ev`` (one of ``evs``, decoded from ``record``), for a
    dead letter. Found by identity: rejections are rare, the hot loop keeps no index."""
    j = next(i for i, e in enumerate(evs) if e is ev)
    return raws[j] if raws is not None else element_of(record, j)


class RawOf:
    """:func:`raw_of`, found only for a dead letter that is written: it costs a scan
    of the message, which thousands of rejects of one message must not each pay."""

    __slots__ = ("args",)

    def __init__(self, *args: Any) -> None:
        self.args = args

    def __call__(self) -> Any:
        return raw_of(*self.args)


class DeadLetters:
    """Writes the dead letters of one message after another into an ``Outputs``."""

    def __init__(self, metrics: MetricsCollector, clock: Clock) -> None:
        self._metrics = metrics
        self._clock = clock
        # the message whose dead letters are being counted, how many it wrote, and its
        # roll-ups by reason: [count, first raw, its detail, source]
        self._message: tuple[int, int] | None = None
        self._written = 0
        self._rollups: dict[str, list[Any]] = {}

    def forget(self) -> None:
        """Drop the roll-ups of a batch that failed half-way: never flushed into another."""
        if self._message is not None:
            self._rollups.clear()
            self._message, self._written = None, 0

    def reject(
        self,
        out: Outputs,
        counts: dict[str, int],
        batch: SourceBatch,
        idx: int,
        raw: Any,
        reason: str,
        detail: str,
        now: float,
        n: int = 1,
    ) -> None:
        """Count ``n`` rejected elements of message ``idx`` and write their dead letter;
        past :data:`DEAD_LETTERS_PER_MESSAGE` of one message, roll them up instead.
        ``raw`` may be a :class:`RawOf`, called only when the raw text is written."""
        counts[reason] = counts.get(reason, 0) + n
        message = (id(batch), idx)
        if message != self._message:
            if self._message is not None:
                self.flush(out)
            self._message = message
        if self._written >= DEAD_LETTERS_PER_MESSAGE:
            rollup = self._rollups.get(reason)
            if rollup is None:
                raw = raw() if type(raw) is RawOf else raw
                self._rollups[reason] = [n, raw, detail, _source(batch, idx)]
            else:
                rollup[0] += n
            return
        self._written += 1
        raw = raw() if type(raw) is RawOf else raw
        source = _source(batch, idx)
        out.dead_letters.append(DeadLetter(raw_text(raw), reason, detail, source, now))

    def finish(self, out: Outputs) -> None:
        """End of a batch: write the roll-ups of its last message."""
        if self._message is not None:
            self.flush(out)

    def flush(self, out: Outputs) -> None:
        """One dead letter per reason for the rejects of the last message past its
        :data:`DEAD_LETTERS_PER_MESSAGE`."""
        now = self._clock.now()
        for reason, (n, raw, detail, source) in self._rollups.items():
            summary = (
                f"{n} more elements of this message rejected as {reason!r} (past the first "
                f"{DEAD_LETTERS_PER_MESSAGE} dead letters of one message); raw is the first "
                f"of them: {detail}"
            )
            out.dead_letters.append(DeadLetter(raw_text(raw), reason, summary, source, now))
            self._metrics.on_dead_letters_rolled_up(n)
        self._rollups.clear()
        self._message = None
        self._written = 0


def _source(batch: SourceBatch, idx: int) -> str:
    if batch.offsets is None:
        return batch.source
    return f"{batch.source} offset={batch.offsets[idx]}"
