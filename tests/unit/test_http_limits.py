"""Which cursors the HTTP bus stores: 1 to 1024 printable ASCII characters, else none."""

from __future__ import annotations

from typing import Any

import pytest

from service.bus.http_limits import MAX_CURSOR_LENGTH, BadCursor, check_cursor


@pytest.mark.parametrize(
    "cursor", ["0", "a1b2c3d4-17", "~!@#$%^&*()_+ {}|:<>?", "c" * MAX_CURSOR_LENGTH]
)
def test_a_printable_ascii_cursor_is_stored_as_it_is(cursor: str) -> None:
    assert check_cursor(cursor) == cursor


@pytest.mark.parametrize("cursor", [None, ""])
def test_an_absent_or_empty_cursor_is_a_server_that_ignores_cursors(cursor: Any) -> None:
    assert check_cursor(cursor) is None


@pytest.mark.parametrize(
    "cursor",
    [
        "c" * (MAX_CURSOR_LENGTH + 1),
        "nul\x00inside",
        "tab\there",
        "newline\n",
        "del\x7f",
        "caf\u00e9",
        "\ud800",
        12345,
        1.5,
        True,
        ["a"],
        {"a": 1},
    ],
)
def test_any_other_cursor_is_a_protocol_error(cursor: Any) -> None:
    with pytest.raises(BadCursor):
        check_cursor(cursor)
