"""HttpBus: the VaBus HTTP protocol v1 client (long-poll with cursors).

The cursor is the position of the single partition ``"http"``: it travels in
``SourceBatch.next_position`` and is stored with the checkpoint, so a restart continues
after the last durable batch (the server replays from an older cursor). Against a server
that ignores cursors, events fetched but not yet durable when the process dies are lost.

A response body that is not JSON, or has no ``events`` list, must not cost the valid
events beside it nor make the client loop. So the same cursor is asked again with
``limit=1`` until the bad element stands alone; only that body is handed on, as a single
``bytes`` record (the aggregator dead-letters it as ``invalid_json``), and the cursor is
read from the envelope's text to move past it. A server whose bodies carry no readable
cursor at all cannot be moved past: the request is retried with backoff, and the same
bad body is never handed on twice for one cursor (one dead letter, not one per retry).

What one answer may cost is bounded (:mod:`service.bus.http_limits`): a body above
``VABUS_MAX_RESPONSE_BYTES`` is asked again at once with half the limit (down to one
event, then it is an error retried with backoff, and readiness names the bus until an
answer passes); an answer with more events than asked, or with a cursor that may not be
stored, is refused whole and retried with backoff on the same cursor. Bodies above
:data:`_THREAD_PARSE_BYTES` are parsed in a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Final

import aiohttp
import orjson

from service.bus.base import (
    REPORT_INTERVAL_S,
    Emit,
    PartitionsAssigned,
    Restore,
    RewindByRerun,
    SourceBatch,
)
from service.bus.http_envelope import cursor_from_text, parse_envelope
from service.bus.http_limits import (
    ProtocolError,
    ResponseTooLarge,
    TooManyEvents,
    check_cursor,
    read_capped,
)
from service.checkpoints.base import PartitionCheckpoint
from service.config import BusConfig
from service.core.clock import Clock
from service.core.errors import ServiceError, TransientError, describe_error
from service.core.events import Metric
from service.core.lifecycle import AsyncResource
from service.core.retry import Backoff, retry
from service.metrics.collector import MetricsCollector

__all__ = ["PARTITION", "HttpBus"]

log = logging.getLogger(__name__)

PARTITION: Final = "http"
RAW_LIMIT: Final = 64 * 1024  # an unparseable body is handed on truncated to this
_MIN_EMPTY_POLL_S: Final = 0.05  # a server that ignores `wait` must not make us spin
_CHECK_TIMEOUT_S: Final = 5.0
_ERROR_TEXT: Final = 1024  # bytes of an error answer kept for the log
_THREAD_PARSE_BYTES: Final = 256 * 1024  # larger bodies are parsed off the event loop


class _Narrow(Exception):
    """Ask the same cursor again, one event at a time, to isolate a bad element."""


class _ResponseError(ServiceError):
    """An answer with an error status; 5xx, 408 and 429 say that retrying can help."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:200].decode('utf-8', 'replace')}")
        self.retriable = status >= 500 or status in (408, 429)


class _RepeatedBody(ServiceError):
    """The same unparseable body again for one cursor; it was handed on once already."""


# Every failure of a request is retried; transport failures count as retriable.
_FAILURES: Final = (
    _ResponseError,
    _RepeatedBody,
    ProtocolError,
    aiohttp.ClientError,
    TimeoutError,
)


@dataclass(slots=True)
class _Fetched:
    request_cursor: str | None
    records: list[Any]
    next_cursor: str | None
    caught_up: bool
    events: int  # events in the answer; 0 for an unparseable body
    seconds: float  # how long the request took
    answered_at: float = 0.0  # monotonic clock when the answer arrived


class HttpBus(AsyncResource):
    """Pulls ``GET {base}/events`` in a loop with one request always in flight.

    While batch *n* is being emitted, the request for batch *n+1* (with batch *n*'s
    cursor) is already on the wire; batches are still emitted strictly in order.
    """

    name = "http"

    def __init__(
        self,
        config: BusConfig,
        metrics: MetricsCollector,
        clock: Clock,
        *,
        backoff: Backoff | None = None,
        metrics_attempts: int = 3,
    ) -> None:
        self._config = config
        self._metrics = metrics
        self._clock = clock
        self._backoff = backoff or Backoff(initial_s=0.1, maximum_s=10.0)
        self._metrics_attempts = metrics_attempts
        self._base = config.http_base_url.rstrip("/")
        self._session: aiohttp.ClientSession | None = None
        self._intake_stopped = False
        self._rewinds = RewindByRerun()
        self._inflight: asyncio.Task[_Fetched] | None = None
        self._bad_cursor: str | None = None
        self._bad_bodies: set[int] = set()  # hashes of bad bodies handed on for _bad_cursor
        self._narrow_left = 0  # requests still made with limit=1 after an unparseable body
        # events asked for per request: halved while answers pass VABUS_MAX_RESPONSE_BYTES
        self._limit = config.http_batch_limit
        self._failing: ProtocolError | None = None  # the last request's refusal, until one passes

    # -- lifecycle ------------------------------------------------------------------
    async def start(self) -> None:
        """Create the HTTP session; the server is contacted only by :meth:`run`."""
        if self._session is None:
            self._intake_stopped = False
            self._session = aiohttp.ClientSession(headers=self._headers())

    async def stop(self) -> None:
        self.stop_intake()
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def stop_intake(self) -> None:
        """Abandon the request in flight: its events were not emitted, so with cursors
        they are fetched again after a restart."""
        self._intake_stopped = True
        if self._inflight is not None:
            self._inflight.cancel()

    # -- data path ------------------------------------------------------------------
    def rewind(self, partitions: Sequence[str]) -> None:
        self._rewinds.rewind(partitions)

    async def run(self, emit: Emit, restore: Restore) -> None:
        await self._rewinds.run(partial(self._read, emit, restore))

    async def _read(self, emit: Emit, restore: Restore) -> None:
        await self.start()
        stored = await restore([PARTITION])
        checkpoint = stored.get(PARTITION) or PartitionCheckpoint(PARTITION, None, None)
        await emit(PartitionsAssigned([checkpoint]))
        cursor = checkpoint.position
        announced_caught_up = False
        reported_at = float("-inf")
        # Without a stored cursor, a plain read would be queue-like: the server hands the
        # events out for good, and a crash before the first checkpoint would lose them.
        # So learn where the stream stands first (limit=0 hands nothing out).
        probing = cursor is None
        pending = self._spawn(cursor, delay_s=0.0, limit=0 if probing else None)
        try:
            while not self._intake_stopped:
                try:
                    fetched = await pending
                except asyncio.CancelledError:
                    if self._intake_stopped and pending.cancelled():
                        return
                    raise
                cursor = fetched.next_cursor
                idle = not probing and fetched.events == 0 and fetched.seconds < _MIN_EMPTY_POLL_S
                pending = self._spawn(cursor, _MIN_EMPTY_POLL_S - fetched.seconds if idle else 0)
                # Empty answers are reported about once a second: the aggregator takes
                # the stream for silent only on that evidence, stamped with when the
                # server answered (not when a backpressured emit got to it). The probe's
                # answer only brings the cursor, unless a server ignored limit.
                now = fetched.answered_at
                report_due = now - reported_at >= REPORT_INTERVAL_S
                if fetched.records or not (probing or (announced_caught_up and not report_due)):
                    if fetched.records:
                        self._metrics.on_messages_received(
                            self.name, len(fetched.records), fetched.events
                        )
                    await emit(self._batch(fetched, now))
                    announced_caught_up = fetched.caught_up
                    reported_at = now
                probing = False
        finally:
            pending.cancel()
            await asyncio.wait({pending})
            self._inflight = None

    def _spawn(
        self, cursor: str | None, delay_s: float, limit: int | None = None
    ) -> asyncio.Task[_Fetched]:
        self._inflight = asyncio.create_task(self._fetch(cursor, delay_s, limit))
        return self._inflight

    def _batch(self, fetched: _Fetched, polled_at: float) -> SourceBatch:
        return SourceBatch(
            partition=PARTITION,
            records=fetched.records,
            source=f"http cursor={fetched.request_cursor or 'none'}",
            next_position=fetched.next_cursor,
            received_at=self._clock.now(),
            caught_up=fetched.caught_up,
            polled_at=polled_at,
        )

    async def _fetch(self, cursor: str | None, delay_s: float, limit: int | None) -> _Fetched:
        """One answer for ``cursor``. Every failure is retried for ever with backoff, a
        refused token too (an operator can fix it while we wait); a failure that says
        retrying cannot help is logged as an error."""
        if delay_s > 0:
            await self._clock.sleep(delay_s)
        fetched = await retry(
            lambda: self._answer(cursor, limit),
            name=f"VaBus GET {self._base}/events (cursor={cursor})",
            backoff=self._backoff,
            clock=self._clock,
            retriable=_FAILURES,
            on_failure=self._count_error,
        )
        fetched.answered_at = self._clock.monotonic()
        self._failing = None
        return fetched

    async def _answer(self, cursor: str | None, limit: int | None) -> _Fetched:
        """:meth:`_get_events`, asked again at once while it narrows down a bad element,
        and with half the limit while the answer is too large (a single event that is
        still too large is an error, retried with backoff like any other)."""
        while True:
            try:
                return await self._get_events(cursor, limit)
            except _Narrow:
                continue
            except ResponseTooLarge as exc:
                if exc.limit <= 1 or limit is not None:
                    raise
                self._metrics.on_bus_protocol_error(self.name, exc.kind)
                self._limit = exc.limit // 2
                log.warning(
                    "VaBus GET %s/events (cursor=%s, limit=%d): %s; asking again with limit=%d",
                    self._base,
                    cursor,
                    exc.limit,
                    exc,
                    self._limit,
                )

    def _count_error(self, exc: BaseException, attempt: int) -> None:
        self._metrics.on_bus_error(self.name, not isinstance(exc, ServiceError) or exc.retriable)
        if isinstance(exc, ProtocolError):
            self._metrics.on_bus_protocol_error(self.name, exc.kind)
            self._failing = exc

    async def _get_events(self, cursor: str | None, limit: int | None) -> _Fetched:
        """One request; raises :class:`_RepeatedBody` for a bad body already handed on
        for this cursor, and :class:`_Narrow` when it starts isolating a bad element."""
        config = self._config
        if limit is None:
            limit = 1 if self._narrow_left else self._limit
        params = {"limit": str(limit), "wait": f"{config.http_wait_s:g}"}
        if cursor is not None:
            params["cursor"] = cursor
        timeout = aiohttp.ClientTimeout(total=config.http_wait_s + config.http_timeout_s)
        started = self._clock.monotonic()
        async with self._require_session().get(
            f"{self._base}/events", params=params, timeout=timeout
        ) as response:
            if response.status != 200:
                raise _ResponseError(response.status, await response.content.read(_ERROR_TEXT))
            body = await read_capped(response, config.max_response_bytes, limit)
        seconds = self._clock.monotonic() - started
        if len(body) > _THREAD_PARSE_BYTES:
            events, cursor_value = await asyncio.to_thread(parse_envelope, body)
        else:
            events, cursor_value = parse_envelope(body)
        if events is not None:
            if len(events) > limit:
                raise TooManyEvents(
                    f"the answer holds {len(events)} events for limit={limit}; refused whole "
                    "(its cursor is past events that were not asked for)"
                )
            next_cursor = check_cursor(cursor_value)
            if self._narrow_left:
                self._narrow_left = 0 if not events else self._narrow_left - 1
            elif (
                limit == self._limit < config.http_batch_limit
                and len(body) <= config.max_response_bytes // 4  # room to double it
            ):
                self._limit = min(config.http_batch_limit, limit * 2)
            caught_up = len(events) < limit
            return _Fetched(cursor, events, next_cursor or cursor, caught_up, len(events), seconds)
        return self._not_an_envelope(cursor, limit, body, cursor_value, seconds)

    def _not_an_envelope(
        self, cursor: str | None, limit: int, body: bytes, cursor_value: Any, seconds: float
    ) -> _Fetched:
        """A body that is not an events envelope: :class:`_Narrow` to isolate it, else
        handed on once per cursor as one invalid record (:class:`_RepeatedBody` after)."""
        if limit > 1 and cursor is not None:
            # The bad element is among the next `limit`: find it alone, keep the others.
            # (Without a cursor the server is queue-like: what it sent cannot be re-asked.)
            self._narrow_left = limit
            log.warning(
                "VaBus answered GET %s/events (cursor=%s) with an unparseable body; "
                "asking again one event at a time to isolate the bad element",
                self._base,
                cursor,
            )
            raise _Narrow
        self._narrow_left = 0
        next_cursor = check_cursor(cursor_value) or check_cursor(cursor_from_text(body))
        if cursor != self._bad_cursor:
            self._bad_cursor, self._bad_bodies = cursor, set()
        if hash(body) in self._bad_bodies:
            raise _RepeatedBody("repeated the same unparseable body")
        self._bad_bodies.add(hash(body))
        log.error(
            "VaBus answered GET %s/events (cursor=%s) with a body that is not an events "
            "envelope (%d bytes); handing it on as one invalid record",
            self._base,
            cursor,
            len(body),
        )
        return _Fetched(cursor, [body[:RAW_LIMIT]], next_cursor or cursor, False, 0, seconds)

    # -- side channels ----------------------------------------------------------------
    async def commit(self, positions: Mapping[str, str]) -> None:
        """Nothing to do: the cursor is stored with the checkpoint."""

    async def send_metrics(self, metrics: Sequence[Metric]) -> None:
        """POST to ``{base}/metrics``; after a few failed attempts the metrics are dropped
        with a warning and counted in ``bus_errors_total`` (they must never hold up the
        data path)."""
        if not metrics:
            return
        if self._session is None:
            log.warning("dropping %d metrics: the HTTP bus is not started", len(metrics))
            return
        body = orjson.dumps([m.to_json_obj() for m in metrics])
        session = self._session
        try:
            await retry(
                lambda: self._post_metrics(session, body),
                name=f"VaBus POST {self._base}/metrics",
                backoff=self._backoff,
                clock=self._clock,
                retriable=(_ResponseError, aiohttp.ClientError, TimeoutError),
                attempts=self._metrics_attempts,
            )
        except (_ResponseError, aiohttp.ClientError, TimeoutError) as exc:
            self._metrics.on_bus_error(
                self.name, not isinstance(exc, ServiceError) or exc.retriable
            )
            log.warning(
                "dropping %d metrics: POST %s/metrics failed %d times, last: %s",
                len(metrics),
                self._base,
                self._metrics_attempts,
                describe_error(exc),
            )

    async def _post_metrics(self, session: aiohttp.ClientSession, body: bytes) -> None:
        async with session.post(
            f"{self._base}/metrics",
            data=body,
            headers={"Content-Type": "application/json"},
            timeout=aiohttp.ClientTimeout(total=self._config.http_timeout_s),
        ) as response:
            answer = await response.read()
            if response.status >= 300:
                raise _ResponseError(response.status, answer)

    async def check(self) -> None:
        """Readiness: the server answers, and the last request's answer was not refused
        (too large even for one event, more events than asked, a bad cursor)."""
        url = f"{self._base}/events"
        if self._failing is not None:
            raise TransientError(
                f"VaBus at {url} answers what cannot be taken ({self._failing.kind}): "
                f"{self._failing}"
            )
        timeout = aiohttp.ClientTimeout(total=_CHECK_TIMEOUT_S)
        params = {"limit": "0", "wait": "0"}
        session = self._session or aiohttp.ClientSession(headers=self._headers())
        try:
            async with session.get(url, params=params, timeout=timeout) as response:
                if response.status != 200:
                    raise TransientError(f"VaBus at {url} answered HTTP {response.status}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            reason = str(exc) or type(exc).__name__
            raise TransientError(f"VaBus at {url} is unreachable: {reason}") from exc
        finally:
            if session is not self._session:
                await session.close()

    def _headers(self) -> dict[str, str]:
        token = self._config.token.value
        return {"Authorization": f"Bearer {token}"} if token else {}

    def _require_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("HttpBus.start() was not called")
        return self._session
