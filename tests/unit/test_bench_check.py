"""The benchmark's judge of rollup rows (bench.check): base windows and rollup rows
are told apart by their length, and a rollup must equal the merge of its windows."""

from __future__ import annotations

from typing import Any

from bench.check import check, check_rollups, key_of

EXPECTED: dict[tuple[str, int], dict[str, Any]] = {
    ("s", 0): {"name": "s", "agg_func": "avg", "count": 2, "value": 1.0, "window_end": 60},
    ("s", 60): {"name": "s", "agg_func": "avg", "count": 1, "value": 4.0, "window_end": 120},
}


def row(start: int, end: int, value: float, count: int) -> dict[str, Any]:
    return {
        "name": "s",
        "agg_func": "avg",
        "window_start": start,
        "window_end": end,
        "value": value,
        "count": count,
    }


def test_a_rollup_row_is_not_a_base_window() -> None:
    assert key_of(row(0, 60, 1.0, 2)) == ("s", 0)
    assert key_of(row(0, 120, 2.0, 3)) is None


def test_base_check_ignores_rollups_and_rollups_merge_exactly() -> None:
    records = [row(0, 60, 1.0, 2), row(60, 120, 4.0, 1), row(0, 120, 2.0, 3)]
    assert check(records, EXPECTED)["ok"]
    judged = check_rollups(records, EXPECTED)
    assert judged["ok"] and judged["rollup_windows"] == 1


def test_a_wrong_rollup_fails_and_so_does_none() -> None:
    wrong = check_rollups([row(0, 120, 2.5, 3)], EXPECTED)  # the unweighted mean
    assert not wrong["ok"] and wrong["rollup_mismatches"] == 1
    assert not check_rollups([row(0, 60, 1.0, 2)], EXPECTED)["ok"]
