"""One benchmark run, start to finish.

    start the server (unless --url) ── pinned to CPU 0
    start the workers ──────────────── pinned to the other CPUs; each opens and
                                       subscribes its share of the clients
    publish at --message-rate for --duration (after an optional warm-up), or sweep
    the rate upwards (--stress-test), with a progress line every second; through
    --publish-url when given (another node on the same broker: cross-node latency)
    checkpoint: every client has seen the last offset (or the grace ran out), workers
    send their HdrHistograms and counts; they are merged into one result
"""

from __future__ import annotations

import math
import multiprocessing
import os
import sys
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import attrs
import trio
from hdrh.histogram import HdrHistogram

from ..metrics import verdict
from ._dialect import DIALECTS
from ._options import BenchOptions
from ._publisher import Publisher
from ._result import merge, summary, write_hgrm, write_plot
from ._server import ServerProcess, process_cpu_seconds, process_rss_bytes, scraped_rss_bytes
from ._worker import WorkerSpec, cpu_seconds, raise_open_files_limit, worker_main

__all__ = ["run_bench"]

CLIENTS_PER_WORKER = 2500
SATURATED = 0.9
KEPT_UP = 0.95
"""A stress step kept up when it delivered at least this share of rate x subscribers."""
"""Generator CPU share (of the cores it has) above which its figures are suspect."""


class _WorkerHandle:
    """The parent's end of one worker: its latest progress and the replies it waits for."""

    def __init__(self, process: Any, pipe: Any) -> None:
        self.process = process
        self.pipe = pipe
        self.progress: dict[str, Any] = {"deliveries": 0, "cpuSeconds": 0.0, "disconnected": 0}
        self.ready: dict[str, Any] | None = None
        self._replies: list[dict[str, Any]] = []
        self._arrived = trio.Event()

    async def pump(self) -> None:
        """Read the worker's messages until it exits."""
        while True:
            await trio.lowlevel.wait_readable(self.pipe.fileno())
            try:
                kind, body = self.pipe.recv()
            except (EOFError, OSError):
                self._arrived.set()
                return
            if kind == "progress":
                self.progress = body
                continue
            if kind == "ready":
                self.ready = body
                self.progress = {**self.progress, "cpuSeconds": body["cpuSeconds"]}
            else:
                self._replies.append(body)
            self._arrived.set()
            self._arrived = trio.Event()

    async def wait_ready(self) -> dict[str, Any]:
        while self.ready is None:
            if not self.process.is_alive():
                raise RuntimeError(f"load-generator worker exited with {self.process.exitcode}")
            with trio.move_on_after(0.5):
                await self._arrived.wait()
        return self.ready

    async def reply(self) -> dict[str, Any]:
        while not self._replies:
            if not self.process.is_alive():
                raise RuntimeError(f"load-generator worker exited with {self.process.exitcode}")
            with trio.move_on_after(0.5):
                await self._arrived.wait()
        return self._replies.pop(0)


@attrs.define
class _Phase:
    """Counters at the start of a measured phase."""

    started: float
    generator_cpu: float
    server_cpu: float | None
    watched_cpu: dict[str, float] = attrs.Factory(dict)


class _Run:
    def __init__(self, options: BenchOptions, say: Callable[[str], None]) -> None:
        self.options = options
        self.say = say
        self.server: ServerProcess | None = None
        self.host = "127.0.0.1"
        self.port = 0
        self.headers: tuple[tuple[str, str], ...] = ()
        self.workers: list[_WorkerHandle] = []
        self.publisher: Publisher | None = None
        self.server_label = ""
        self._affinity: set[int] | None = None
        self.rss_final = 0
        self.watched = _watched_pids(options.watch_pids)

    # -- set-up ------------------------------------------------------------------------

    def _cpus(self) -> tuple[int | None, tuple[int, ...]]:
        """(server CPU, generator CPUs) when pinning applies, else (None, ())."""
        if not self.options.pin or not hasattr(os, "sched_getaffinity"):
            return None, ()
        available = sorted(os.sched_getaffinity(0))
        if len(available) < 2:
            return None, ()
        return available[0], tuple(available[1:])

    async def start(self, nursery: trio.Nursery) -> None:
        options = self.options
        raise_open_files_limit()
        server_cpu, generator_cpus = self._cpus()
        if options.url:
            self.host, self.port = _host_port(options.url)
            self.server_label = options.url
            # Whoever started the server placed it; the generator still keeps off CPU 0
            # (bench/compare.py pins peers there, as the harness pins its own server).
        else:
            self.server = ServerProcess(cpu=server_cpu, extra_args=options.server_args)
            await self.server.start()
            self.host, self.port = self.server.host, self.server.port
            self.server_label = f"kaldrix serve pid {self.server.pid}" + (
                f", pinned to CPU {server_cpu}" if self.server.pinned else ""
            )
        if options.token:
            self.headers = (("Authorization", f"Bearer {options.token}"),)
        if generator_cpus:
            self._affinity = os.sched_getaffinity(0)
            os.sched_setaffinity(0, generator_cpus)
        self.rss_idle = await self._server_rss()
        count = options.workers or max(2, math.ceil(options.clients / CLIENTS_PER_WORKER))
        count = max(1, min(count, options.clients))
        context = multiprocessing.get_context("spawn")
        for index in range(count):
            share = options.clients // count + (1 if index < options.clients % count else 0)
            spec = WorkerSpec(
                index=index,
                host=self.host,
                port=self.port,
                channel=options.channel,
                clients=share,
                dialect=options.dialect,
                connect_concurrency=max(1, options.connect_concurrency // count),
                cpus=generator_cpus,
                churn_rate=options.churn_rate / count,
                headers=self.headers,
            )
            parent, child = context.Pipe()
            process = context.Process(target=worker_main, args=(child, spec), daemon=True)
            process.start()
            child.close()
            handle = _WorkerHandle(process, parent)
            nursery.start_soon(handle.pump)
            self.workers.append(handle)
        self.say(f"opening {options.clients} connections over {count} worker processes on {self.server_label}")
        started = time.monotonic()
        self.ready = [await worker.wait_ready() for worker in self.workers]
        self.connect_seconds = time.monotonic() - started
        connected = sum(r["connected"] for r in self.ready)
        failed = sum(r["failed"] for r in self.ready)
        self.say(f"{connected} connected, {failed} failed in {self.connect_seconds:.1f}s")
        for ready in self.ready:
            for reason, n in ready["failures"].items():
                self.say(f"  {n} x {reason}")
        await trio.sleep(0.5)  # let the server settle before reading its memory
        self.rss_connected = await self._server_rss()
        publish_host, publish_port = self.host, self.port
        if options.publish_url:
            publish_host, publish_port = _host_port(options.publish_url)
            self.say(f"publishing through {options.publish_url}")
        self.publisher = Publisher(publish_host, publish_port, DIALECTS[options.dialect](), options.channel, self.headers)
        await self.publisher.connect()
        nursery.start_soon(self.publisher.read_acks)

    def _server_pid(self) -> int | None:
        if self.server is not None:
            return self.server.pid
        return self.options.server_pid

    async def _server_rss(self) -> int:
        """From /proc when the server's pid is known, else from its /metrics (kaldrix only)."""
        pid = self._server_pid()
        if pid:
            return process_rss_bytes(pid)
        if self.options.dialect != "kaldrix":
            return 0
        return await scraped_rss_bytes(self.host, self.port, self.options.token)

    def _server_cpu(self) -> float | None:
        pid = self._server_pid()
        return process_cpu_seconds(pid) if pid else None

    # -- measuring ---------------------------------------------------------------------

    def _generator_cpu(self) -> float:
        return sum(w.progress["cpuSeconds"] for w in self.workers) + cpu_seconds()

    def _watched_cpu(self) -> dict[str, float]:
        return {name: process_cpu_seconds(pid) for name, pid in self.watched.items()}

    def _phase(self) -> _Phase:
        return _Phase(time.monotonic(), self._generator_cpu(), self._server_cpu(), self._watched_cpu())

    async def _progress(self, phase: _Phase, rate: float, total: float) -> None:
        assert self.publisher is not None
        interactive = sys.stderr.isatty()
        last_deliveries = sum(w.progress["deliveries"] for w in self.workers)
        last_time = time.monotonic()
        while True:
            await trio.sleep(1.0)
            now = time.monotonic()
            deliveries = sum(w.progress["deliveries"] for w in self.workers)
            elapsed = now - phase.started
            generator = (self._generator_cpu() - phase.generator_cpu) / max(elapsed, 1e-9)
            line = (
                f"[{elapsed:5.1f}/{total:g}s] {rate:g} msg/s  published {self.publisher.sent}"
                f"  deliveries {deliveries} ({(deliveries - last_deliveries) / (now - last_time):,.0f}/s)"
                f"  generator CPU {generator * 100:.0f}%"
            )
            last_deliveries, last_time = deliveries, now
            if interactive:
                sys.stderr.write("\r" + line + "\x1b[K")
                sys.stderr.flush()
            elif self.options.log_level in ("detailed", "verbose", "debug") or int(elapsed) % 5 == 0:
                self.say(line)

    async def measure(self, rate: float, duration: float, last: bool) -> dict[str, Any]:
        """Publish at `rate` for `duration`, then gather one checkpoint from every worker."""
        assert self.publisher is not None
        options = self.options
        if options.warmup > 0:
            await self.publisher.publish(rate, options.warmup)
            await self.publisher.wait_acked(options.grace)
            for worker in self.workers:
                worker.pipe.send(("reset",))
        phase = self._phase()
        deliveries_before = sum(w.progress["deliveries"] for w in self.workers)
        acked_before = self.publisher.acked
        async with trio.open_nursery() as nursery:
            if options.log_level not in ("warning", "error"):
                nursery.start_soon(self._progress, phase, rate, duration)
            await self.publisher.publish(rate, duration)
            nursery.cancel_scope.cancel()
        published_for = time.monotonic() - phase.started
        if sys.stderr.isatty() and options.log_level not in ("warning", "error"):
            sys.stderr.write("\n")
        if not await self.publisher.wait_acked(options.grace):
            self.say(f"only {self.publisher.acked} of {self.publisher.sent} publishes acknowledged")
        final = self.publisher.last_offset
        for worker in self.workers:
            worker.pipe.send(("checkpoint", final, options.grace, last))
        replies = [await worker.reply() for worker in self.workers]
        elapsed = time.monotonic() - phase.started
        server_cpu = self._server_cpu()
        watched_cpu = {name: round((cpu - phase.watched_cpu[name]) / elapsed, 3) for name, cpu in self._watched_cpu().items()}
        generator_cpu = sum(r["cpuSeconds"] for r in replies) + cpu_seconds() - phase.generator_cpu
        deliveries = sum(r["deliveries"] for r in replies) - deliveries_before
        for worker, reply in zip(self.workers, replies, strict=True):
            worker.progress = {**worker.progress, "deliveries": reply["deliveries"], "cpuSeconds": reply["cpuSeconds"]}
        return {
            "rate": rate,
            "published": self.publisher.acked - acked_before,
            "unacknowledged": self.publisher.sent - self.publisher.acked,
            "publishedFor": published_for,
            "elapsed": elapsed,
            "finalOffset": final,
            "deliveries": deliveries,
            "replies": replies,
            "generatorCpu": generator_cpu / elapsed,
            "serverCpu": None if server_cpu is None or phase.server_cpu is None else (server_cpu - phase.server_cpu) / elapsed,
            "watchedCpu": watched_cpu,
        }

    async def close(self) -> None:
        if self.publisher is not None:
            await self.publisher.aclose()
        for worker in self.workers:
            worker.process.join(timeout=0)
        with trio.move_on_after(5):
            while any(w.process.is_alive() for w in self.workers):  # noqa: ASYNC110 - processes have no event to wait on
                await trio.sleep(0.05)
        for worker in self.workers:
            if worker.process.is_alive():
                worker.process.terminate()
        if self.server is not None:
            await self.server.stop()
        if self._affinity is not None:
            os.sched_setaffinity(0, self._affinity)

    # -- results -------------------------------------------------------------------------

    def result(self, measured: dict[str, Any], steps: list[dict[str, Any]], latency: HdrHistogram) -> dict[str, Any]:
        options = self.options
        replies = measured["replies"]
        latency_sum = sum(r["latencySumUs"] for r in replies)
        connect = merge(r["connect"] for r in replies)
        connect_sum = sum(r["connectSumUs"] for r in replies)
        delivery = summary(latency, latency_sum)
        connected = sum(r["connected"] for r in replies)
        failed = sum(r["failed"] for r in replies)
        disconnected = sum(r["disconnected"] for r in replies)
        seconds = max(measured["publishedFor"], 1e-9)
        deliveries_per_second = measured["deliveries"] / seconds
        rss = self.rss_final or self.rss_connected
        per_connection = (self.rss_connected - self.rss_idle) / connected if connected and self.rss_idle else None
        generator_cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        result: dict[str, Any] = {
            "label": options.label,
            "server": self.server_label,
            "dialect": options.dialect,
            "clients": options.clients,
            "duration": options.duration,
            "messageRate": options.message_rate,
            "channel": options.channel,
            "eventDelivery": delivery,
            "throughput": {
                "eventsPerSecond": round(measured["published"] / seconds, 2),
                "deliveriesPerSecond": round(deliveries_per_second, 2),
            },
            "connections": {
                "active": connected - disconnected,
                "total": connected + failed,
                "failed": failed,
                "disconnected": disconnected,
                "avgConnectTimeMs": summary(connect, connect_sum)["avg"],
                "connectP99Ms": summary(connect, connect_sum)["p99"],
                "openedInSeconds": round(self.connect_seconds, 3),
                "churned": sum(r["churned"] for r in replies),
                "churnFailed": sum(r["churnFailed"] for r in replies),
            },
            "lost": sum(r["lost"] for r in replies),
            "duplicates": sum(r["duplicates"] for r in replies),
            "unacknowledgedPublishes": measured["unacknowledged"],
            "resources": {
                "serverRssBytes": rss,
                "serverRssIdleBytes": self.rss_idle,
                "serverRssConnectedBytes": self.rss_connected,
                "rssPerConnectionBytes": round(per_connection) if per_connection else None,
                "serverCpu": None if measured["serverCpu"] is None else round(measured["serverCpu"], 3),
                "watchedCpu": measured["watchedCpu"],
                "generatorCpu": round(measured["generatorCpu"], 3),
                "generatorProcesses": len(self.workers) + 1,
                "generatorCores": generator_cores,
                "generatorSaturated": measured["generatorCpu"] > SATURATED * generator_cores,
            },
            "verdict": verdict(delivery["avg"], deliveries_per_second) if delivery["count"] else "n/a (nothing delivered)",
        }
        if steps:
            result["steps"] = steps
            clean = [s["deliveriesPerSecond"] for s in steps if s["clean"]]
            result["maxCleanDeliveriesPerSecond"] = max(clean) if clean else 0.0
            kept = [s["deliveriesPerSecond"] for s in steps if s["clean"] and s["keptUp"]]
            result["maxKeptUpDeliveriesPerSecond"] = max(kept) if kept else 0.0
        return result


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or (443 if parts.scheme == "wss" else 80)


def _watched_pids(specs: tuple[str, ...]) -> dict[str, int]:
    """`NAME=PID` pairs of --watch-pid as a dict."""
    watched = {}
    for spec in specs:
        name, _, pid = spec.partition("=")
        if not name or not pid.isdigit():
            raise RuntimeError(f"--watch-pid: expected NAME=PID, got {spec!r}")
        watched[name] = int(pid)
    return watched


def _step(measured: dict[str, Any], clients: int, clean_p99_ms: float) -> tuple[dict[str, Any], HdrHistogram]:
    replies = measured["replies"]
    latency = merge(r["latency"] for r in replies)
    delivery = summary(latency, sum(r["latencySumUs"] for r in replies))
    seconds = max(measured["publishedFor"], 1e-9)
    connected = sum(r["connected"] - r["disconnected"] for r in replies)
    step = {
        "messageRate": measured["rate"],
        "acceptedEventsPerSecond": round(measured["published"] / seconds, 1),
        "deliveriesPerSecond": round(measured["deliveries"] / seconds, 1),
        "p50": delivery["p50"],
        "p99": delivery["p99"],
        "p999": delivery["p999"],
        "lost": sum(r["lost"] for r in replies),
        "duplicates": sum(r["duplicates"] for r in replies),
        "disconnected": sum(r["disconnected"] for r in replies),
        "serverCpu": measured["serverCpu"],
        "watchedCpu": measured.get("watchedCpu", {}),
        "generatorCpu": round(measured["generatorCpu"], 3),
    }
    step["clean"] = (
        delivery["count"] > 0 and delivery["p99"] < clean_p99_ms and step["lost"] == 0 and step["disconnected"] == 0
    )
    # Clean, and the server took every event it was offered: past this point it is saturated
    # and the publisher (at most one second of events unacknowledged) waits for it.
    step["keptUp"] = step["deliveriesPerSecond"] >= KEPT_UP * measured["rate"] * connected
    return step, latency


async def run_bench(options: BenchOptions, say: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Run one benchmark and return its result (the JSON document)."""
    run = _Run(options, say)
    try:
        async with trio.open_nursery() as nursery:
            await run.start(nursery)
            steps: list[dict[str, Any]] = []
            if options.stress_test:
                rate = options.message_rate
                lost_before = 0
                best: tuple[dict[str, Any], HdrHistogram] | None = None
                for index in range(options.max_steps):
                    last = index == options.max_steps - 1
                    measured = await run.measure(rate, options.step_duration, last=last)
                    step, latency = _step(measured, options.clients, options.clean_p99_ms)
                    step["lost"] -= lost_before
                    lost_before += step["lost"]
                    step["clean"] = step["clean"] and step["lost"] == 0
                    steps.append(step)
                    say(
                        f"step {rate:g} msg/s: {step['deliveriesPerSecond']:,.0f} deliveries/s,"
                        f" p99 {step['p99']:.2f}ms, lost {step['lost']} -> {'clean' if step['clean'] else 'not clean'}"
                    )
                    if step["clean"] or best is None:
                        best = (measured, latency)
                    if not step["clean"] or last:
                        break
                    rate = round(rate * options.step_factor)
                if not last:
                    for worker in run.workers:
                        worker.pipe.send(("checkpoint", run.publisher.last_offset if run.publisher else 0, 0.0, True))
                    for worker in run.workers:
                        await worker.reply()
                assert best is not None
                measured, latency = best
            else:
                measured = await run.measure(options.message_rate, options.duration, last=True)
                latency = merge(r["latency"] for r in measured["replies"])
            run.rss_final = await run._server_rss()
            result = run.result(measured, steps, latency)
            result["latencyHistogram"] = latency.encode().decode()  # HdrHistogram's base64 form, for merging and plots
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await run.close()
    if options.hgrm:
        write_hgrm(latency, options.hgrm)
    if options.plot:
        write_plot({options.label or run.server_label: latency}, options.plot, "kaldrix bench: delivery latency by percentile")
    return result
