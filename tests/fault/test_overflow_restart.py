"""Values at the edge of the double range through the running service and a SIGTERM
restart, with both outputs: every aggregate in Kafka and PostgreSQL is a finite number
and exact, each `sum` event that would overflow is dead-lettered once (`overflow`), and
the restart restores the open windows (no crash loop, nothing counted twice)."""

from __future__ import annotations

import math
import re
import signal
from collections import Counter
from fractions import Fraction
from pathlib import Path
from typing import Any

import orjson
import pytest

from service.dev.emulator import Emulator
from service.dev.postgres_server import EmbeddedPostgres
from tests.e2e.test_e2e_http import stored_rows
from tests.e2e.workload import BASE_TS, INTERVAL, Key
from tests.fault.harness import Incarnation, read_output_topic, service_env, wait_for
from tests.fault.test_sigterm import dead_letter_reasons, wait_exit

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

NAMES = 20
WINDOWS = 3
BIG = 1.7e308
GRACE_S = 60  # longer than the windows: all of them are still open at the SIGTERM


def _ev(name: str, func: str, value: float, ts: float) -> bytes:
    return orjson.dumps({"name": name, "value": value, "timestamp": ts, "agg_func": func})


def phases() -> tuple[list[bytes], list[bytes], dict[Key, tuple[float, int]], int]:
    """(before the restart, after it, expected aggregates, overflow rejections)."""
    first: list[bytes] = []
    second: list[bytes] = []
    expected: dict[Key, tuple[float, int]] = {}
    overflows = 0
    for w in range(WINDOWS):
        start = BASE_TS + w * INTERVAL
        for i in range(NAMES):
            n = f"edge.{i}"
            first += [_ev(n, "sum", BIG, start + 1), _ev(n, "sum", BIG, start + 2)]
            second += [_ev(n, "sum", BIG, start + 3), _ev(n, "sum", -1e308, start + 4)]
            second += [_ev(n, "sum", 2e307, start + 5)]
            overflows += 2  # BIG after BIG, before and after the restart
            expected[(n, "sum", start)] = (
                float(Fraction(BIG) - Fraction(1e308) + Fraction(2e307)),
                3,
            )
            first += [_ev(n, "avg", BIG, start + 1), _ev(n, "avg", BIG, start + 2)]
            second += [_ev(n, "avg", BIG, start + 3)]
            expected[(n, "avg", start)] = (BIG, 3)
            first += [_ev(n, "stddev", 1e308, start + 1), _ev(n, "stddev", -1e308, start + 2)]
            second += [_ev(n, "stddev", 0.0, start + 3)]
            expected[(n, "stddev", start)] = (math.sqrt(2 / 3) * 1e308, 3)
            first += [_ev(n, "p99", -BIG, start + 1), _ev(n, "p99", BIG, start + 2)]
            second += [_ev(n, "p99", 0.0, start + 3)]
            p99 = Fraction(0) + Fraction(98, 100) * Fraction(BIG)  # h = 1.98 over -BIG, 0, BIG
            expected[(n, "p99", start)] = (float(p99), 3)
    # moves the watermark past every window above; its own window stays open
    second.append(_ev("edge.close", "sum", 1.0, BASE_TS + WINDOWS * INTERVAL + 2 * GRACE_S))
    return first, second, expected, overflows


def _close(got: tuple[float, int], want: tuple[float, int]) -> bool:
    return got[1] == want[1] and math.isclose(got[0], want[0], rel_tol=1e-12)


@pytest.mark.timeout(240)
async def test_overflow_values_through_a_sigterm_restart_stay_finite_in_both_outputs(
    pg_restartable: EmbeddedPostgres, kafka_bootstrap: str, unique_name: str, tmp_path: Path
) -> None:
    first, second, expected, overflows = phases()
    dsn, table, topic = pg_restartable.dsn, f"agg_{unique_name}", f"agg-{unique_name}"
    async with Emulator() as emulator:
        env = service_env(
            bus_url=emulator.url,
            storage="kafka,postgres",
            kafka_bootstrap=kafka_bootstrap,
            topic=topic,
            state_dir=tmp_path / "state",
            postgres_dsn=dsn,
            table=table,
            # the windows must still be open at the SIGTERM: no idle flush before it
            extra={
                "AGGREGATION_GRACE": str(GRACE_S),
                "AGGREGATION_IDLE_TIMEOUT": "60",
                "SHUTDOWN_TIMEOUT": "15",
            },
        )
        inc = Incarnation(env, tmp_path, 0)
        emulator.append(first)
        await inc.wait_events(len(first), timeout=60)
        inc.proc.proc.send_signal(signal.SIGTERM)
        code, _ = await wait_exit(inc, 20)
        log = inc.proc.log_text()
        assert code == 0, log[-3000:]
        checkpointed = re.search(r"checkpointing (\d+) open window", log)
        assert checkpointed and int(checkpointed.group(1)) == len(expected), log[-3000:]

        final = Incarnation(env, tmp_path, 1)
        try:
            emulator.append(second)

            async def all_rows() -> bool:
                return expected.keys() <= (await stored_rows(dsn, table)).keys()

            await wait_for(all_rows, 90, "every aggregate in PostgreSQL", final.proc)
            rows = await stored_rows(dsn, table)
            output = await read_output_topic(kafka_bootstrap, topic, expected)

            async def all_dead_letters() -> bool:
                return (await dead_letter_reasons(dsn))["overflow"] >= overflows

            await wait_for(all_dead_letters, 30, "the overflow dead letters", final.proc)
            reasons = await dead_letter_reasons(dsn)
            st: dict[str, Any] | None = await final.status()
        finally:
            code = final.terminate()
        log = final.proc.log_text()
        assert code == 0, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    for where, got in (("PostgreSQL", rows), ("Kafka", output.latest)):
        wrong = {k: (got.get(k), v) for k, v in expected.items() if not _close(got[k], v)}
        assert not wrong, f"{where}: {len(wrong)} wrong, e.g. {list(wrong.items())[:3]}"
        assert all(math.isfinite(v) for v, _ in got.values()), where
    assert reasons == Counter({"overflow": overflows}), reasons  # once each: graceful stop
    assert st is not None and st["ledger"]["imbalance"] == 0, st and st["ledger"]
    assert st["subscriber_crashes"] == {}, st["subscriber_crashes"]
