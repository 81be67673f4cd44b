"""``vabus-aggregator replay --from T1 --to T2 [--names PATTERN]``: the sub-command's
validation, run and summary (exit 0 done, 1 failed on the way, 2 invalid usage)."""

from __future__ import annotations

import asyncio
import logging
import sys

from service.config import Config
from service.core.errors import ConfigError
from service.replay.command import replay, usable
from service.replay.span import parse_span

__all__ = ["replay_command"]

log = logging.getLogger(__name__)


def replay_command(config: Config, since: str, until: str, names: str | None) -> int:
    try:
        span = parse_span(since, until, names)
        problems = usable(config)
        if problems:
            raise ConfigError(problems)
    except ConfigError as exc:
        print(f"replay: {exc}", file=sys.stderr)
        return 2
    try:
        summary = asyncio.run(replay(config, span))
    except Exception as exc:
        # what was written stays written, and is found equal by the next run
        log.error("replay failed: %s: %s", type(exc).__name__, exc)
        print(f"replay failed: {type(exc).__name__}: {exc} (run it again)", file=sys.stderr)
        return 1
    for line in summary.lines():
        print(line)
    return 0
