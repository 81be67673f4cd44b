"""Correctness of one run's output against the workload's expected results.

Rules: records whose name starts with ``__`` are ignored (end-of-stream watermarks and
their windows). For every (name, window_start) the *last* record is the tool's answer,
so a tool that re-emits is judged by its final value; re-emissions are counted. The run
is correct only if the key set equals the expected one exactly and, per key,
``agg_func`` and ``count`` are equal, ``window_end`` is right, and ``value`` is within
1e-9 relative (1e-9 absolute near zero). Times may be Unix seconds or ISO-8601 strings
(the service writes ``...Z`` strings).

Rollup rows (``AGGREGATION_ROLLUPS``: a window longer than the workload's) are judged
apart (:func:`check_rollups`): each must equal the merge of the expected windows it
covers, and at least one must be there when the run asked for rollups.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from bench.workload import WINDOW_S, Key

REL_TOL = 1e-9
ABS_TOL = 1e-9


def to_epoch(value: Any) -> float:
    """Unix seconds from a number or an ISO-8601 string with an offset (``Z`` allowed)."""
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, datetime):
        return value.timestamp()
    return _iso_epoch(str(value))


@functools.lru_cache(maxsize=65_536)
def _iso_epoch(text: str) -> float:
    """Cached: a run's records share a few thousand window bounds, and the check's own
    cost is inside bench.hotpath's instruction counts (compare them with one bench)."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def key_of(record: Mapping[str, Any]) -> Key | None:
    """The (name, window_start) of an output record; None for ``__`` names and rollup
    rows (judged by :func:`check_rollups`).

    Raises KeyError/ValueError/TypeError for a malformed record.
    """
    name = record["name"]
    if name.startswith("__"):
        return None
    start = round(to_epoch(record["window_start"]))
    end = record.get("window_end")
    if end is not None and round(to_epoch(end)) - start != WINDOW_S:
        return None
    return name, start


def check(
    records: Iterable[Mapping[str, Any]],
    expected: Mapping[Key, Mapping[str, Any]],
    max_examples: int = 5,
) -> dict[str, Any]:
    """A summary dict; ``ok`` is the verdict."""
    total = ignored = bad_format = 0
    last: dict[Key, Mapping[str, Any]] = {}
    seen: dict[Key, int] = {}
    for record in records:
        total += 1
        try:
            key = key_of(record)
        except (KeyError, ValueError, TypeError, AttributeError):
            bad_format += 1
            continue
        if key is None:
            ignored += 1
            continue
        last[key] = record
        seen[key] = seen.get(key, 0) + 1
    missing = [k for k in expected if k not in last]
    extra = [k for k in last if k not in expected]
    mismatches = []
    for key, want in expected.items():
        got = last.get(key)
        if got is not None:
            problems = _compare(got, want)
            if problems:
                mismatches.append((key, problems))
    ok = not (missing or extra or mismatches or bad_format)
    return {
        "ok": ok,
        "records": total,
        "ignored_records": ignored,
        "bad_format": bad_format,
        "pairs": len(last),
        "expected_pairs": len(expected),
        "missing": len(missing),
        "extra": len(extra),
        "mismatches": len(mismatches),
        "pairs_with_multiple_records": sum(1 for c in seen.values() if c > 1),
        "examples_missing": [list(k) for k in missing[:max_examples]],
        "examples_extra": [list(k) for k in extra[:max_examples]],
        "examples_mismatch": [[list(k), p] for k, p in mismatches[:max_examples]],
    }


def _compare(got: Mapping[str, Any], want: Mapping[str, Any]) -> list[str]:
    problems = []
    if got.get("agg_func") != want["agg_func"]:
        problems.append(f"agg_func {got.get('agg_func')!r} != {want['agg_func']!r}")
    try:
        count_ok = int(got["count"]) == want["count"]
    except (KeyError, ValueError, TypeError):
        count_ok = False
    if not count_ok:
        problems.append(f"count {got.get('count')!r} != {want['count']}")
    try:
        end_ok = round(to_epoch(got["window_end"])) == want["window_end"]
    except (KeyError, ValueError, TypeError, AttributeError):
        end_ok = False
    if not end_ok:
        problems.append(f"window_end {got.get('window_end')!r} != {want['window_end']}")
    try:
        value = float(got["value"])
    except (KeyError, ValueError, TypeError):
        value = math.nan
    if not math.isclose(value, want["value"], rel_tol=REL_TOL, abs_tol=ABS_TOL):
        problems.append(f"value {got.get('value')!r} != {want['value']!r}")
    return problems


RollupKey = tuple[str, int, int]  # (name, window_start, window_end)


def check_rollups(
    records: Iterable[Mapping[str, Any]],
    expected: Mapping[Key, Mapping[str, Any]],
    max_examples: int = 5,
) -> dict[str, Any]:
    """Rollup rows against the merge of the expected windows each covers (the last
    record per window, as for base windows). ``ok`` is False when there are none."""
    last: dict[RollupKey, Mapping[str, Any]] = {}
    for record in records:
        try:
            name = record["name"]
            start = round(to_epoch(record["window_start"]))
            end = round(to_epoch(record["window_end"]))
        except (KeyError, ValueError, TypeError, AttributeError):
            continue
        if not name.startswith("__") and end - start != WINDOW_S:
            last[(name, start, end)] = record
    mismatches = []
    for (name, start, end), got in last.items():
        want = _merged(expected, name, start, end)
        problems = ["covers no expected window"] if want is None else _compare(got, want)
        if problems:
            mismatches.append(((name, start, end), problems))
    return {
        "ok": bool(last) and not mismatches,
        "rollup_windows": len(last),
        "rollup_mismatches": len(mismatches),
        "examples_rollup_mismatch": [[list(k), p] for k, p in mismatches[:max_examples]],
    }


def _merged(
    expected: Mapping[Key, Mapping[str, Any]], name: str, start: int, end: int
) -> dict[str, Any] | None:
    """The expected result of ``name`` over ``[start, end)`` from its base windows
    (the workload's functions: sum, avg, min and max)."""
    parts = [expected[(name, ws)] for ws in range(start, end, WINDOW_S) if (name, ws) in expected]
    if not parts:
        return None
    func = parts[0]["agg_func"]
    count = sum(p["count"] for p in parts)
    values = [p["value"] for p in parts]
    if func == "sum":
        value = math.fsum(values)
    elif func == "avg":
        value = math.fsum(p["value"] * p["count"] for p in parts) / count
    else:
        value = min(values) if func == "min" else max(values)
    return {"agg_func": func, "count": count, "window_end": end, "value": value}
