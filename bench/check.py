"""Correctness of one run's output against the workload's expected results.

Rules: records whose name starts with ``__`` are ignored (end-of-stream watermarks and
their windows). For every (name, window_start) the *last* record is the tool's answer,
so a tool that re-emits is judged by its final value; re-emissions are counted. The run
is correct only if the key set equals the expected one exactly and, per key,
``agg_func`` and ``count`` are equal, ``window_end`` is right, and ``value`` is within
1e-9 relative (1e-9 absolute near zero). Times may be Unix seconds or ISO-8601 strings
(the service writes ``...Z`` strings).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from bench.workload import Key

REL_TOL = 1e-9
ABS_TOL = 1e-9


def to_epoch(value: Any) -> float:
    """Unix seconds from a number or an ISO-8601 string with an offset (``Z`` allowed)."""
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, datetime):
        return value.timestamp()
    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()


def key_of(record: Mapping[str, Any]) -> Key | None:
    """The (name, window_start) of an output record; None for ``__`` names.

    Raises KeyError/ValueError/TypeError for a malformed record.
    """
    name = record["name"]
    if name.startswith("__"):
        return None
    return name, round(to_epoch(record["window_start"]))


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
