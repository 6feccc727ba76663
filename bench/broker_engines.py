"""Broker engines side by side: publish throughput, and cross-node delivery latency.

    redis-server --port 6390 --save "" --appendonly no --daemonize yes
    python bench/broker_engines.py --redis redis://127.0.0.1:6390/0

Throughput: `--events` events published by `--publishers` concurrent tasks (each
awaiting its publish, as connections would), one channel per event out of
`--channels`, to the memory engine and to the Redis engine in the same run; then the
same with one task awaiting each publish in turn (latency-bound). Every publication is
delivered to one subscribed node, so the figures include live delivery.

Latency: two Redis engines in this process (node A publishes, node B is subscribed),
`--rate` events per second for `--seconds`; the delay from A's publish call to B's
handler, as percentiles. Both nodes share one clock, so nothing is skewed.
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Sequence
from typing import Any

import orjson
import trio

from kaldrix.broker._base import BrokerEvent, Publication
from kaldrix.broker._memory_engine import MemoryEngine
from kaldrix.broker._redis import RedisEngine

_ids = itertools.count()
PAYLOAD = orjson.dumps({"blockId": "b" * 16, "height": 15420, "hash": "0x" + "ab" * 32, "transactions": []})


def make_event() -> BrokerEvent:
    return BrokerEvent("NEW_BLOCK", f"bench-{next(_ids)}", "2025-08-07T10:00:00.000000Z", PAYLOAD, time.time())


class Counter:
    def __init__(self) -> None:
        self.count = 0
        self.delays: list[float] = []
        self.measure = False
        self.target = 0
        self.reached = trio.Event()

    def expect(self, count: int) -> trio.Event:
        self.count, self.target, self.reached = 0, count, trio.Event()
        return self.reached

    def on_publications(self, publications: Sequence[Publication]) -> None:
        for publication in publications:
            self.count += 1
            if self.count == self.target:
                self.reached.set()
            if self.measure:
                self.delays.append(time.time() - publication.event.accepted_at)

    def on_resync(self) -> None:
        pass


async def throughput(engine: Any, handler: Counter, events: int, publishers: int, channels: list[str]) -> float:
    per_task = events // publishers
    reached = handler.expect(per_task * publishers)
    started = time.perf_counter()

    async def publisher(task: int) -> None:
        for n in range(per_task):
            await engine.publish(make_event(), [channels[(task + n) % len(channels)]])

    async with trio.open_nursery() as nursery:
        for task in range(publishers):
            nursery.start_soon(publisher, task)
    with trio.fail_after(60):
        await reached.wait()
    return per_task * publishers / (time.perf_counter() - started)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def main(args: argparse.Namespace) -> None:
    channels = [f"node:n{i}" for i in range(args.channels)]
    results: dict[str, dict[str, float]] = {}
    async with trio.open_nursery() as nursery:
        memory, memory_seen = MemoryEngine(), Counter()
        await nursery.start(memory.run, memory_seen)
        redis_a, seen_a = RedisEngine(args.redis, prefix=f"bench-{time.time_ns()}"), Counter()
        redis_b, seen_b = RedisEngine(args.redis, prefix=redis_a.keys.prefix), Counter()
        await nursery.start(redis_a.run, seen_a)
        await nursery.start(redis_b.run, seen_b)

        for name, engine, seen in (("memory", memory, memory_seen), ("redis", redis_a, seen_b)):
            # Redis: node A publishes, node B is subscribed and counts the deliveries.
            subscriber = redis_b if engine is redis_a else engine
            results[name] = {
                "concurrent": await throughput_via(engine, subscriber, seen, args.events, args.publishers, channels),
                "sequential": await throughput_via(engine, subscriber, seen, args.events // 10, 1, channels),
            }

        await redis_b.subscribe("blocks")
        seen_b.delays.clear()
        seen_b.measure = True
        interval = 1.0 / args.rate
        deadline = trio.current_time()
        for _ in range(int(args.rate * args.seconds)):
            deadline += interval
            nursery.start_soon(redis_a.publish, make_event(), ["blocks"])
            await trio.sleep_until(deadline)
        await trio.sleep(0.5)
        seen_b.measure = False
        delays = seen_b.delays
        nursery.cancel_scope.cancel()

    for mode in ("concurrent", "sequential"):
        m, r = results["memory"][mode], results["redis"][mode]
        print(f"publish {mode:>10}: memory {m:9.0f} ev/s   redis {r:8.0f} ev/s   redis/memory {r / m:.3f}")
    print(f"redis round trips (pipelines) for all publishes: {redis_a.counters.round_trips}")
    print(
        f"cross-node delivery at {args.rate}/s for {args.seconds}s ({len(delays)} events): "
        + "  ".join(f"p{int(q * 1000) / 10:g} {percentile(delays, q) * 1000:.2f} ms" for q in (0.5, 0.9, 0.99, 0.999))
        + f"  max {max(delays) * 1000:.2f} ms"
    )


async def throughput_via(
    engine: Any, subscriber: Any, seen: Counter, events: int, publishers: int, channels: list[str]
) -> float:
    for name in channels:
        await subscriber.subscribe(name)
    return await throughput(engine, seen, events, publishers, channels)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis", default="redis://127.0.0.1:6390/0")
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--publishers", type=int, default=64)
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=3.0)
    trio.run(main, parser.parse_args())
