"""``vabus-aggregator dlq replay --reason R [--since T]``: validation, run and summary
(exit 0 done, 1 failed on the way: a rerun finishes, 2 invalid usage)."""

from __future__ import annotations

import asyncio
import logging
import sys

from service.config import Config
from service.core.errors import ConfigError
from service.core.events import REJECT_REASONS
from service.dlq.command import dlq_replay, usable
from service.replay.span import parse_instant

__all__ = ["dlq_command"]

log = logging.getLogger(__name__)


def dlq_command(config: Config, reason: str, since: str | None) -> int:
    try:
        problems = []
        if reason not in REJECT_REASONS:
            problems.append(f"--reason {reason!r}: expected one of {', '.join(REJECT_REASONS)}")
        at = None
        if since is not None:
            try:
                at = parse_instant("--since", since)
            except ConfigError as exc:
                problems += exc.problems
        problems += usable(config)
        if problems:
            raise ConfigError(problems)
    except ConfigError as exc:
        print(f"dlq replay: {exc}", file=sys.stderr)
        return 2
    try:
        summary = asyncio.run(dlq_replay(config, reason, at))
    except Exception as exc:
        # what was marked is recorded with its events: the next run finishes it
        log.error("dlq replay failed: %s: %s", type(exc).__name__, exc)
        print(f"dlq replay failed: {type(exc).__name__}: {exc} (run it again)", file=sys.stderr)
        return 1
    for line in summary.lines():
        print(line)
    return 0
