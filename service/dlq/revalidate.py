"""One dead letter through validation again, by the service's own reference decoder
(:meth:`service.aggregation.batch_run.BatchRun.decode`) with the current limits.

What a dead letter's ``raw`` holds decides what may be redriven:

* an element (every reason but the two below): that element, as a message of one;
* a whole message refused for its size (``too_large``, detail "message of N bytes
  exceeds M"): the message, as the bus delivered it;
* a message's elements past the first C (``too_large``, VABUS_MAX_EVENTS_PER_MESSAGE):
  the whole message, of which the first C were accepted then. Only the elements past
  C are decoded, with the current cap less C, which refuses exactly those the whole
  message would refuse now. The detail the service writes says C and the message's
  length; a detail that does not say both exactly, or a length that does not match
  ``raw``, is refused ("unrecognised") rather than guessed.

Refused without decoding: a raw cut at :data:`~service.aggregation.decode.RAW_LIMIT`
or by the Kafka output ("truncated": the events are not all there), and a roll-up of
many elements under one raw ("rolled_up": only the first is there). Never
half-counted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Final

from service.aggregation.batch_run import BatchRun, Limits
from service.aggregation.dead_letters import DeadLetters
from service.aggregation.decode import RAW_LIMIT, Rejected, loads_message
from service.aggregation.partition import PartitionState
from service.aggregation.series import SEP, TagRule
from service.bus.base import SourceBatch
from service.core.clock import Clock
from service.metrics.collector import MetricsCollector
from service.pipeline.flow import Outputs

__all__ = ["Event", "Outcome", "revalidate"]

Event = tuple[str, str, float, float, str | None]  # name, agg_func, value, ts, tags JSON

_PAST_FIRST: Final = re.compile(
    r"(?P<n>\d+) elements past the first (?P<cap>\d+) of a (?P<held>\d+)-element message "
    r"\(VABUS_MAX_EVENTS_PER_MESSAGE\); raw is the message"
)
_MESSAGE_BYTES: Final = re.compile(r"message of (?P<size>\d+) bytes exceeds \d+")
KAFKA_CUT: Final = "...[truncated]"  # service.sinks.kafka.encode_dead_letter
_ROLLED_UP: Final = re.compile(r"(?P<n>\d+) more elements of this message rejected as ")


@dataclass(slots=True)
class Outcome:
    """The events accepted now, and per reason how many elements failed again."""

    accepted: list[Event] = field(default_factory=list)
    failed: dict[str, int] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """``replay_outcome``: ``accepted`` when every element was, else the first
        reason it failed for (the counts are in the ledger)."""
        return next(iter(self.failed), "accepted")


def revalidate(
    raw: str,
    reason: str,
    detail: str,
    limits: Limits,
    tags: TagRule | None,
    clock: Clock,
) -> Outcome:
    """The outcome of one dead letter (see the module)."""
    if _ROLLED_UP.match(detail):
        return Outcome(failed={"rolled_up": 1})
    if reason == "too_large" and (m := _MESSAGE_BYTES.fullmatch(detail)):
        if int(m["size"]) > RAW_LIMIT:
            return Outcome(failed={"truncated": 1})
        return _decoded(raw.encode(), limits, tags, clock)
    if _truncated(raw):
        return Outcome(failed={"truncated": 1})
    if reason == "too_large":
        m = _PAST_FIRST.fullmatch(detail)
        if m is None:
            return Outcome(failed={"unrecognised": 1})
        return _past_first(raw, int(m["cap"]), int(m["held"]), limits, tags, clock)
    try:
        element = loads_message(raw.encode())
    except Rejected:  # an element's raw is its JSON text: this one was not ours
        return Outcome(failed={"unrecognised": 1})
    return _decoded([element], limits, tags, clock)


def _truncated(raw: str) -> bool:
    # raw_text cuts at RAW_LIMIT characters (or bytes, decoded): one that long may have
    # been cut, and is taken as cut; the Kafka output cuts a record over its request
    # size further, and says so at the end
    if raw.endswith(KAFKA_CUT):
        return True
    return len(raw) >= RAW_LIMIT or len(raw.encode("utf-8", "surrogatepass")) >= RAW_LIMIT


def _past_first(
    raw: str, cap: int, held: int, limits: Limits, tags: TagRule | None, clock: Clock
) -> Outcome:
    data = raw.encode()
    try:
        items = loads_message(data)
    except Rejected:
        return Outcome(failed={"unrecognised": 1})
    if type(items) is not list or len(items) != held or cap >= held:
        return Outcome(failed={"unrecognised": 1})
    if len(data) > limits.max_bytes:  # the whole message is refused now
        return _decoded(data, limits, tags, clock)
    # the elements past the first ``cap``, under what remains of today's cap for them
    rest = limits._replace(max_elements=max(limits.max_elements - cap, 0))
    return _decoded(items[cap:], rest, tags, clock)


def _decoded(record: Any, limits: Limits, tags: TagRule | None, clock: Clock) -> Outcome:
    """``record`` (bytes, or a list of elements) through ``BatchRun.decode``."""
    out = Outputs()
    batch = SourceBatch("dlq", [record], "dlq replay", None, clock.now())
    run = BatchRun(
        PartitionState(),
        batch,
        out,
        DeadLetters(MetricsCollector(clock), clock),
        limits,
        now=clock.now(),
        open_now=0,
        others=(float("inf"), False),
        idle_s=0.0,
        tags=tags,
    )
    evs, _ = run.decode(0, record)
    accepted: list[Event] = []
    for ev in evs:
        name, text = ev.name, None
        if tags is not None:  # the series key: name, separator, the tags' JSON text
            name, sep, text = ev.name.partition(SEP)
            text = text if sep else "{}"
        accepted.append((name, str(ev.agg_func), ev.value, float(ev.timestamp), text))
    return Outcome(accepted, dict(run.rejects))
