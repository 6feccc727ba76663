"""Soak: many subscribers for a long time, with churn; memory over time, and any loss.

    python bench/soak.py --clients 1000 --duration 600 --rate 3   # the full soak
    python bench/soak.py --clients 200 --duration 120 --sample 10  # a short one

Not part of CI. It starts ``python -m kaldrix serve`` (or uses ``--url``), a producer and
`--clients` subscribers (kaldrix.client), each on `blocks` and one `address:` channel.
The producer publishes blocks and transactions at `--rate` events per second. After each
second of quiet a `--churn` fraction of the subscribers is disturbed: half of them drop their
connection and resume it (`reconnect()`: the client comes back with `since`), the other
half close for good and are replaced by a new subscriber.

Every subscriber's application view is checked as it arrives: per channel, each event's
offset must be the previous one + 1 (no loss, no duplicate, no disorder), and no Gap
may be reported. At the end the producer stops and every live subscriber must reach
the last offset of each of its channels. Every `--sample` seconds a line reports the
server's RSS, its router and broker counts, and the client process's RSS.
Exit status 0 when nothing was lost.
"""

from __future__ import annotations

import argparse
import logging
import random
import resource
import socket
import sys
import time
from pathlib import Path
from typing import Any

import attrs
import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kaldrix.client import ClientOptions, Gap, KaldrixClient  # noqa: E402
from kaldrix.protocol import Envelope  # noqa: E402

ADDRESSES = 100
STAMP = "2025-08-07T10:00:00Z"


@attrs.define(eq=False)
class Subscriber:
    """One logical subscriber: its client, and the check of what its application saw."""

    number: int
    channels: list[str]
    client: KaldrixClient
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    last: dict[str, int] = attrs.Factory(dict)
    events: int = 0
    problems: list[str] = attrs.Factory(list)

    def on_event(self, event: Envelope) -> None:
        self.events += 1
        channel, offset = event.channel, event.offset
        previous = self.last.get(channel)
        if previous is not None and offset != previous + 1:
            self.problems.append(f"{channel}: offset {offset} after {previous}")
        self.last[channel] = offset

    def position(self, channel: str) -> int:
        """The last offset the application saw, or where it joined if nothing came since."""
        if channel in self.last:
            return self.last[channel]
        return self.client.state.last_offsets.get(channel, (0, ""))[0]

    def on_gap(self, gap: Gap) -> None:
        self.problems.append(f"gap on {gap.channel}: {gap.last_offset}->{gap.new_offset} ({gap.reason})")


@attrs.define
class Run:
    url: str
    args: argparse.Namespace
    server_pid: int | None
    subscribers: list[Subscriber] = attrs.Factory(list)
    retired: list[Subscriber] = attrs.Factory(list)
    finals: dict[str, int] = attrs.Factory(dict)
    published: int = 0
    reconnects: int = 0
    replacements: int = 0
    samples: list[dict[str, Any]] = attrs.Factory(list)
    metrics: dict[str, Any] = attrs.Factory(dict)
    next_number: int = 0


def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def options(url: str) -> ClientOptions:
    return ClientOptions(url=url, reconnect_interval=0.5, max_reconnect_delay=5.0, buffer_size=4096)


async def start_subscriber(run: Run, nursery: trio.Nursery) -> Subscriber:
    number = run.next_number
    run.next_number += 1
    channels = ["blocks", f"address:0x{number % ADDRESSES:x}"]
    client = KaldrixClient(options(run.url), channels)
    subscriber = Subscriber(number, channels, client)
    client.subscribe("*", subscriber.on_event)
    client.on_gap(subscriber.on_gap)

    async def serve(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        with subscriber.scope:
            await client.run(task_status=task_status)

    await nursery.start(serve)
    run.subscribers.append(subscriber)
    return subscriber


async def produce(run: Run, producer: KaldrixClient, stop: trio.Event) -> None:
    """Blocks and transactions at --rate events per second, in batches every 50 ms."""
    rate = run.args.rate
    height = 0
    credit = 0.0
    next_at = trio.current_time()
    while not stop.is_set():
        next_at += 0.05
        credit += rate * 0.05
        due = int(credit)
        credit -= due
        if not due:
            await trio.sleep_until(next_at)
            continue
        events = []
        for _ in range(due):
            height += 1
            if height % 2:
                events.append({"type": "NEW_BLOCK", "payload": {"blockId": f"b{height}", "height": height, "timestamp": STAMP}})
            else:
                sender, receiver = random.randrange(ADDRESSES), random.randrange(ADDRESSES)
                events.append({"type": "TX_RECEIVED", "payload": {
                    "txId": f"t{height}", "from": f"0x{sender:x}", "to": f"0x{receiver:x}", "amount": "1",
                    "status": "pending", "timestamp": STAMP}})
        ack = await producer.publish(*events)
        for result in ack.results:
            for channel, offset in result.offsets.items():
                run.finals[channel] = max(run.finals.get(channel, 0), offset)
        run.published += len(events)
        await trio.sleep_until(max(next_at, trio.current_time()))


async def churn(run: Run, nursery: trio.Nursery, stop: trio.Event) -> None:
    """After each second, disturb --churn of the subscribers: resume half, replace the rest."""
    while not stop.is_set():
        await trio.sleep(1.0)
        count = int(len(run.subscribers) * run.args.churn)
        for subscriber in random.sample(run.subscribers, min(count, len(run.subscribers))):
            if random.random() < 0.5:
                run.reconnects += 1
                nursery.start_soon(subscriber.client.reconnect)
            else:
                run.replacements += 1
                run.subscribers.remove(subscriber)
                run.retired.append(subscriber)
                await subscriber.client.close()
                subscriber.scope.cancel()
                await start_subscriber(run, nursery)


class MetricsProbe:
    """REQUEST_METRICS over the producer's connection (allowed in open mode)."""

    def __init__(self, producer: KaldrixClient) -> None:
        self.producer = producer
        self.latest: dict[str, Any] = {}
        self._answered = trio.Event()
        producer.subscribe("METRICS_RESPONSE", self._take)

    def _take(self, message: Envelope) -> None:
        self.latest = message.payload.metrics
        self._answered.set()

    async def fetch(self) -> dict[str, Any]:
        self._answered = trio.Event()
        await self.producer.send("REQUEST_METRICS", {"type": "all"})
        with trio.move_on_after(5):
            await self._answered.wait()
        return self.latest


async def sample(run: Run, probe: MetricsProbe, started: float, stop: trio.Event) -> None:
    while not stop.is_set():
        with trio.move_on_after(run.args.sample):
            await stop.wait()
        metrics = await probe.fetch()
        router = metrics.get("router", {})
        counters = metrics.get("counters", {})
        line = {
            "t": round(time.monotonic() - started),
            "serverRssMb": rss_mb(run.server_pid),
            "connections": metrics.get("connections", {}).get("active"),
            "subscriptions": router.get("subscriptions"),
            "channels": router.get("channels"),
            "storedEvents": router.get("storedEvents"),
            "dedupIds": router.get("dedupIds"),
            "deliveries": counters.get("deliveries"),
            "slowConsumerCloses": counters.get("slowConsumerCloses"),
            "clientRssMb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "published": run.published,
        }
        run.samples.append(line)
        run.metrics = metrics
        print(" ".join(f"{key}={value:.1f}" if isinstance(value, float) else f"{key}={value}" for key, value in line.items()),
              flush=True)


async def settle(run: Run, patience: float) -> list[str]:
    """Wait until every live subscriber has the last offset of its channels; what is missing."""
    deadline = trio.current_time() + patience
    while True:
        missing = [
            f"subscriber {s.number} {channel}: at {s.position(channel)} of {run.finals[channel]}"
            for s in run.subscribers
            for channel in s.channels
            if channel in run.finals and s.position(channel) < run.finals[channel]
        ]
        if not missing or trio.current_time() > deadline:
            return missing
        await trio.sleep(0.2)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def start_server(args: argparse.Namespace) -> tuple[trio.Process, int]:
    """`kaldrix serve` on a free port, logging warnings to --server-log; ready once /readyz says so."""
    port = free_port()
    command = [
        sys.executable, "-m", "kaldrix", "serve", "--port", str(port), "--no-simulate", "--allow-anonymous-publish",
        "--log-level", "warning", "--log-file", args.server_log,
        "--handshake-rate-limit", "0", "--max-connections-per-ip", "0", "--message-rate", "0",
    ]
    process = await trio.lowlevel.open_process(command, cwd=ROOT)
    with trio.fail_after(30):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.1)
                continue
            async with stream:
                await stream.send_all(b"GET /readyz HTTP/1.1\r\nHost: soak\r\n\r\n")
                if (await stream.receive_some(64)).startswith(b"HTTP/1.1 200"):
                    return process, port
            await trio.sleep(0.1)


async def main(args: argparse.Namespace) -> int:
    processes: list[trio.Process] = []
    try:
        return await soak(args, processes)
    finally:
        for process in processes:
            if process.returncode is None:
                process.kill()


async def soak(args: argparse.Namespace, processes: list[trio.Process]) -> int:
    if args.url:
        url, pid = args.url, None
    else:
        process, port = await start_server(args)
        processes.append(process)
        url, pid = f"ws://127.0.0.1:{port}/ws", process.pid
    run = Run(url=url, args=args, server_pid=pid)
    started = time.monotonic()
    stop = trio.Event()
    async with trio.open_nursery() as clients:
        producer = KaldrixClient(options(url))
        await clients.start(producer.run)
        await producer.wait_connected()
        probe = MetricsProbe(producer)
        print(f"connecting {args.clients} subscribers to {url} ...", flush=True)
        for index in range(args.clients):
            await start_subscriber(run, clients)
            if index % 50 == 49:
                await trio.sleep(0.1)  # no thundering herd at the start
        for subscriber in run.subscribers:
            await subscriber.client.wait_connected()
        print(f"connected in {time.monotonic() - started:.1f}s; running {args.duration:.0f}s", flush=True)
        async with trio.open_nursery() as load:
            load.start_soon(produce, run, producer, stop)
            load.start_soon(churn, run, clients, stop)
            load.start_soon(sample, run, probe, started, stop)
            await trio.sleep(args.duration)
            stop.set()
        missing = await settle(run, patience=60)
        run.metrics = await probe.fetch()
        router = run.metrics.get("router", {})
        print(f"settled: serverRssMb={rss_mb(run.server_pid)} subscriptions={router.get('subscriptions')} "
              f"storedEvents={router.get('storedEvents')} dedupIds={router.get('dedupIds')}", flush=True)
        for subscriber in run.subscribers:
            await subscriber.client.close()
        await trio.sleep(2)  # let the server see every subscriber go
        after = await probe.fetch()
        router = after.get("router", {})
        print(f"after the subscribers left: serverRssMb={rss_mb(run.server_pid)} "
              f"connections={after.get('connections', {}).get('active')} subscriptions={router.get('subscriptions')} "
              f"subscribedChannels={router.get('subscribedChannels')}", flush=True)
        await producer.close()
        clients.cancel_scope.cancel()
    if not args.url:
        process.terminate()  # SIGTERM: the server drains and exits 0
        print(f"server exit status after SIGTERM: {await process.wait()}", flush=True)
    return report(run, missing)




def report(run: Run, missing: list[str]) -> int:
    everyone = run.subscribers + run.retired
    problems = [f"subscriber {s.number}: {problem}" for s in everyone for problem in s.problems]
    delivered = sum(s.events for s in everyone)
    print()
    print(f"published events: {run.published}; delivered to applications: {delivered}")
    print(f"churn: {run.reconnects} reconnects (resumed with since), {run.replacements} subscribers replaced")
    rss = [s["serverRssMb"] for s in run.samples if s["serverRssMb"] is not None]
    if rss:
        print(f"server RSS: first sample {rss[0]:.1f} MB, max {max(rss):.1f} MB, last {rss[-1]:.1f} MB")
    print(f"loss or disorder seen by applications: {len(problems)}")
    for line in problems[:20]:
        print("  " + line)
    print(f"subscribers short of the last offset at the end: {len(missing)}")
    for line in missing[:20]:
        print("  " + line)
    return 0 if not problems and not missing else 1


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 600)")
    parser.add_argument("--rate", type=float, default=20.0, help="events published per second (default 20)")
    parser.add_argument("--churn", type=float, default=0.01, help="fraction of subscribers disturbed per second")
    parser.add_argument("--sample", type=float, default=30.0, help="seconds between memory samples")
    parser.add_argument("--url", help="soak a running server instead of starting one")
    parser.add_argument("--server-log", default="soak-server.log", help="where the started server's log goes")
    parser.add_argument("--seed", type=int, default=1)
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse()
    random.seed(arguments.seed)
    # Reconnects are the point of the run: only the clients' errors are worth a line.
    logging.basicConfig(level=logging.ERROR, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(trio.run(main, arguments))
