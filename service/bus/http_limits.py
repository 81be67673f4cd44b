"""What the HTTP bus takes from one answer, at most (contract §12.1).

* **Bytes.** A body is read as a stream and given up as soon as it passes the cap
  (``VABUS_MAX_RESPONSE_BYTES``), counted after decompression (aiohttp inflates a
  gzip/deflate body in bounded steps as it is read), so a gzip bomb, an endless chunked
  body or a 2 GB ``Content-Length`` (refused before a byte of the body is read) never
  cost more than the cap.
* **Events.** An answer with more events than the ``limit`` asked for is refused whole.
* **Cursors.** A cursor is stored with the checkpoint and sent back in a URL, so one
  that is not 1 to :data:`MAX_CURSOR_LENGTH` printable ASCII characters is refused
  before it is ever stored.

A refused answer is a :class:`ProtocolError`: its cursor (the only way past its events)
is inside it, so nothing of it is taken; :mod:`service.bus.http` says what happens next.
"""

from __future__ import annotations

import re
from typing import Any, Final

import aiohttp

from service.core.errors import ServiceError

__all__ = [
    "MAX_CURSOR_LENGTH",
    "BadCursor",
    "ProtocolError",
    "ResponseTooLarge",
    "TooManyEvents",
    "check_cursor",
    "read_capped",
]

MAX_CURSOR_LENGTH: Final = 1024
_CURSOR: Final = re.compile(rf"[\x20-\x7e]{{1,{MAX_CURSOR_LENGTH}}}")


class ProtocolError(ServiceError):
    """An answer protocol v1 does not allow. Retrying the same request cannot help until
    the server changes (``retriable`` is False: retries are logged as errors), but it
    is retried with backoff all the same, like a 4xx: nothing is lost while it lasts."""

    kind: str = "protocol"  # the metric label (bounded: one per subclass)


class ResponseTooLarge(ProtocolError):
    kind = "response_too_large"

    def __init__(self, message: str, limit: int) -> None:
        super().__init__(message)
        self.limit = limit  # the ``limit`` the refused request asked for


class TooManyEvents(ProtocolError):
    kind = "too_many_events"


class BadCursor(ProtocolError):
    kind = "invalid_cursor"


async def read_capped(response: aiohttp.ClientResponse, cap: int, limit: int) -> bytes:
    """The (decompressed) body of ``response``; raises :class:`ResponseTooLarge` as soon
    as it is known to exceed ``cap`` bytes, having buffered at most ``cap``."""
    declared = response.content_length
    if declared is not None and declared > cap:
        raise ResponseTooLarge(
            f"the answer declares Content-Length {declared}, above VABUS_MAX_RESPONSE_BYTES "
            f"({cap}); refused before reading it",
            limit,
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_any():
        size += len(chunk)
        if size > cap:
            raise ResponseTooLarge(
                f"the answer's body passed VABUS_MAX_RESPONSE_BYTES ({cap} bytes, counted "
                "after decompression); the rest was not read",
                limit,
            )
        chunks.append(chunk)
    return b"".join(chunks)


def check_cursor(cursor: Any) -> str | None:
    """``cursor`` as it may be stored: a valid string, or None for an answer without
    one (a server that ignores cursors; an empty string too). Raises :class:`BadCursor`
    otherwise."""
    if cursor is None or cursor == "":
        return None
    if type(cursor) is not str:
        raise BadCursor(f"the answer's cursor is a JSON {type(cursor).__name__}, not a string")
    if _CURSOR.fullmatch(cursor) is None:
        raise BadCursor(
            f"the answer's cursor {cursor[:80]!r} (length {len(cursor)}) is not 1 to "
            f"{MAX_CURSOR_LENGTH} printable ASCII characters; it is not stored"
        )
    return cursor
