"""BASELINE: the hand-written loop an engineer writes in an afternoon.

``python -m bench.baseline --bootstrap H:P --topic T --output-topic O --group G --marks F``

aiokafka ``getmany`` -> orjson -> per-partition dict ``{window_start: {name: [count,
sum, min, max, agg_func]}}``; a window closes once its partition's largest event time
reaches its end (grace 0); each closed window's results are sent with
``AIOKafkaProducer.send`` (key = name), awaited, and then the batch's offsets are
committed. No validation, no dead letters, no state beyond memory: a restart loses the
open windows. Runs until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from bench.marks import Marks
from bench.workload import WINDOW_S

Acc = list[Any]  # [count, sum, min, max, agg_func]


def final_value(acc: Acc) -> float:
    count, total, low, high, func = acc
    if func == "sum":
        return float(total)
    if func == "avg":
        return float(total / count)
    return float(low if func == "min" else high)


def add_events(values: list[bytes], windows: dict[int, dict[str, Acc]], max_ts: float) -> float:
    """Aggregate one partition's fetched values; returns its new largest event time."""
    loads = orjson.loads
    for raw in values:
        ev = loads(raw)
        ts = ev["timestamp"]
        ws = int(ts // WINDOW_S) * WINDOW_S
        win = windows.get(ws)
        if win is None:
            win = windows[ws] = {}
        name, v = ev["name"], ev["value"]
        acc = win.get(name)
        if acc is None:
            win[name] = [1, v, v, v, ev["agg_func"]]
        else:
            acc[0] += 1
            acc[1] += v
            if v < acc[2]:
                acc[2] = v
            if v > acc[3]:
                acc[3] = v
        if ts > max_ts:
            max_ts = ts
    return max_ts


async def run(args: argparse.Namespace) -> None:
    marks = Marks(args.marks)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    consumer = AIOKafkaConsumer(
        args.topic,
        bootstrap_servers=args.bootstrap,
        group_id=args.group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        session_timeout_ms=args.session_timeout_ms,
        max_partition_fetch_bytes=4 << 20,
        fetch_max_bytes=32 << 20,
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=args.bootstrap, linger_ms=5, max_batch_size=256 << 10, acks=1
    )
    await producer.start()
    await consumer.start()
    windows: dict[int, dict[int, dict[str, Acc]]] = {}
    max_ts: dict[int, float] = {}
    dumps = orjson.dumps
    try:
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=200)
            if not batch:
                continue
            marks.first()
            sends = []
            for tp, msgs in batch.items():
                wins = windows.setdefault(tp.partition, {})
                top = add_events(
                    [m.value for m in msgs], wins, max_ts.get(tp.partition, float("-inf"))
                )
                max_ts[tp.partition] = top
                for ws in sorted(w for w in wins if w + WINDOW_S <= top):
                    for name, acc in wins.pop(ws).items():
                        out = {
                            "name": name,
                            "agg_func": acc[4],
                            "value": final_value(acc),
                            "count": acc[0],
                            "window_start": ws,
                            "window_end": ws + WINDOW_S,
                        }
                        sends.append(
                            await producer.send(args.output_topic, dumps(out), key=name.encode())
                        )
            if sends:
                await asyncio.gather(*sends)
            await consumer.commit()
    finally:
        await consumer.stop()
        await producer.stop()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--output-topic", required=True)
    ap.add_argument("--group", required=True)
    ap.add_argument("--marks", required=True)
    ap.add_argument("--session-timeout-ms", type=int, default=10_000)
    asyncio.run(run(ap.parse_args()))


if __name__ == "__main__":
    main()
