"""One load-generator process: many subscribed clients read through a single epoll set.

A trio task per client would cost a task wake-up per delivery, the very cost the server
avoids; here one trio task waits for the epoll descriptor and then reads every socket
that has data, so a busy worker reads many frames per wake-up. Frames are cut with
slices; an event's offset and timestamp are decoded once per distinct frame (all
subscribers of a worker get the same bytes) and looked up after that.

The parent talks to a worker over a multiprocessing pipe:
    parent -> worker: ("reset",) drops the latency recorded so far (after a warm-up);
                      ("checkpoint", final_offset, grace_seconds, last) asks for a result
                      once every client has seen `final_offset` (or the grace ran out),
                      then starts a new latency histogram, or exits when `last`.
    worker -> parent: ("ready", {...}), ("progress", {...}), ("result", {...})
"""

from __future__ import annotations

import os
import random
import resource
import select
import time
from datetime import datetime
from multiprocessing.connection import Connection
from typing import Any

import attrs
import trio

from ..metrics import LatencyRecorder
from ._dialect import DIALECTS, Dialect
from ._session import Session, SessionError, open_session
from ._ws import OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, HandshakeError, client_frame

READ_SIZE = 256 * 1024
PROGRESS_INTERVAL = 0.5
CACHE_LIMIT = 8192


@attrs.frozen
class WorkerSpec:
    index: int
    host: str
    port: int
    channel: str
    clients: int
    dialect: str = "kaldrix"
    connect_concurrency: int = 64
    cpus: tuple[int, ...] = ()
    churn_rate: float = 0.0
    """Extra connections per second opened, subscribed and closed while the test runs."""
    headers: tuple[tuple[str, str], ...] = ()


class _Client:
    __slots__ = ("closed", "deliveries", "duplicates", "fd", "last", "lost", "rest", "session")

    def __init__(self, session: Session) -> None:
        self.session = session
        self.fd = session.stream.socket.fileno()
        self.rest = session.rest
        self.last = session.start_offset
        self.lost = 0
        self.duplicates = 0
        self.deliveries = 0
        self.closed = False


def raise_open_files_limit() -> int:
    """Lift the soft RLIMIT_NOFILE to the hard limit (10,000 clients need 10,000 sockets)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Worker:
    """The clients of one process and everything they measured."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.dialect: Dialect = DIALECTS[spec.dialect]()
        self.latency = LatencyRecorder()
        self.connect = LatencyRecorder()
        self.clients: dict[int, _Client] = {}
        self.failed = 0
        self.failures: dict[str, int] = {}
        self.disconnected = 0
        self.churned = 0
        self.churn_failed = 0
        self._cache: dict[bytes, tuple[int, float] | None] = {}
        self._epoll = select.epoll()

    # -- opening ---------------------------------------------------------------------

    async def _open_one(self, limiter: trio.CapacityLimiter) -> None:
        async with limiter:
            try:
                session = await open_session(
                    self.spec.host, self.spec.port, self.dialect, self.spec.channel, self.spec.headers
                )
            except (OSError, HandshakeError, SessionError, trio.BrokenResourceError) as exc:
                self.failed += 1
                key = type(exc).__name__ + (f": {exc}" if not isinstance(exc, OSError) else f": {exc.strerror}")
                self.failures[key] = self.failures.get(key, 0) + 1
                return
        client = _Client(session)
        self.connect.record(session.connect_seconds)
        self.clients[client.fd] = client
        self._epoll.register(client.fd, select.EPOLLIN)

    async def open_all(self) -> None:
        limiter = trio.CapacityLimiter(self.spec.connect_concurrency)
        async with trio.open_nursery() as nursery:
            for _ in range(self.spec.clients):
                nursery.start_soon(self._open_one, limiter)

    # -- receiving -------------------------------------------------------------------

    def _event(self, payload: bytes) -> tuple[int, float] | None:
        """(offset, accepted at, epoch seconds) of an event frame; None for anything else."""
        cache = self._cache
        if payload in cache:
            return cache[payload]
        message = self.dialect.decode(payload)
        found = None
        if isinstance(message, dict) and "offset" in message and "timestamp" in message and "channel" in message:
            found = (int(message["offset"]), datetime.fromisoformat(message["timestamp"]).timestamp())
        if len(cache) >= CACHE_LIMIT:
            cache.clear()
        cache[payload] = found
        return found

    def _consume(self, client: _Client, data: bytes, now: float) -> None:
        if client.rest:
            data = client.rest + data
        pos = 0
        end = len(data)
        record = self.latency.record
        event = self._event
        while end - pos >= 2:
            opcode = data[pos] & 0x0F
            length = data[pos + 1] & 0x7F
            start = pos + 2
            if length == 126:
                if end - pos < 4:
                    break
                length = (data[pos + 2] << 8) | data[pos + 3]
                start = pos + 4
            elif length == 127:
                if end - pos < 10:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 10], "big")
                start = pos + 10
            stop = start + length
            if stop > end:
                break
            pos = stop
            payload = data[start:stop]
            if opcode == OP_TEXT:
                found = event(payload)
                if found is None:
                    reply = self.dialect.ping_reply(payload)
                    if reply is not None:
                        self._write(client, client_frame(reply))
                    continue
                offset, stamp = found
                record(now - stamp)
                client.deliveries += 1
                last = client.last
                if offset == last + 1:
                    client.last = offset
                elif offset <= last:
                    client.duplicates += 1
                else:
                    client.lost += offset - last - 1
                    client.last = offset
            elif opcode == OP_PING:
                self._write(client, client_frame(payload, OP_PONG))
            elif opcode == OP_CLOSE:
                self._close(client)
                return
        client.rest = data[pos:]

    def _write(self, client: _Client, frame: bytes) -> None:
        try:
            os.write(client.fd, frame)
        except OSError:
            pass  # a full or broken socket; the read side will tell

    def _close(self, client: _Client) -> None:
        if client.closed:
            return
        client.closed = True
        self.disconnected += 1
        try:
            self._epoll.unregister(client.fd)
        except (OSError, ValueError):
            pass

    async def receive_forever(self) -> None:
        epoll = self._epoll
        clients = self.clients
        while True:
            await trio.lowlevel.wait_readable(epoll.fileno())
            ready = epoll.poll(0, 4096)
            now = time.time()
            for fd, _ in ready:
                client = clients.get(fd)
                if client is None or client.closed:
                    continue
                try:
                    data = os.read(fd, READ_SIZE)
                except BlockingIOError:
                    continue
                except OSError:
                    self._close(client)
                    continue
                if not data:
                    self._close(client)
                    continue
                self._consume(client, data, now)

    # -- churn -------------------------------------------------------------------------

    async def churn_forever(self) -> None:
        """Open, subscribe and close extra clients at `churn_rate` per second (a storm)."""
        rate = self.spec.churn_rate
        limiter = trio.CapacityLimiter(self.spec.connect_concurrency)

        async def one() -> None:
            async with limiter:
                try:
                    session = await open_session(
                        self.spec.host, self.spec.port, self.dialect, self.spec.channel, self.spec.headers
                    )
                except (OSError, HandshakeError, SessionError, trio.BrokenResourceError):
                    self.churn_failed += 1
                    return
                self.connect.record(session.connect_seconds)
                self.churned += 1
                await trio.sleep(random.uniform(0.0, 0.5))
                await trio.aclose_forcefully(session.stream)

        async with trio.open_nursery() as nursery:
            started = trio.current_time()
            opened = 0
            while True:
                due = int((trio.current_time() - started) * rate) - opened
                for _ in range(due):
                    nursery.start_soon(one)
                opened += max(due, 0)
                await trio.sleep(0.01)

    # -- reporting ---------------------------------------------------------------------

    def progress(self) -> dict[str, Any]:
        clients = self.clients.values()
        return {
            "deliveries": sum(c.deliveries for c in clients),
            "cpuSeconds": cpu_seconds(),
            "disconnected": self.disconnected,
        }

    def caught_up(self, final_offset: int) -> bool:
        return all(c.closed or c.last >= final_offset for c in self.clients.values())

    def result(self, final_offset: int) -> dict[str, Any]:
        clients = list(self.clients.values())
        lost = sum(c.lost + max(0, final_offset - c.last) for c in clients)
        return {
            "connected": len(clients),
            "failed": self.failed,
            "failures": self.failures,
            "disconnected": self.disconnected,
            "deliveries": sum(c.deliveries for c in clients),
            "lost": lost,
            "duplicates": sum(c.duplicates for c in clients),
            "latency": self.latency.histogram().encode(),
            "latencySumUs": self.latency.sum_us,
            "connect": self.connect.histogram().encode(),
            "connectSumUs": self.connect.sum_us,
            "churned": self.churned,
            "churnFailed": self.churn_failed,
            "cpuSeconds": cpu_seconds(),
        }


async def _serve_parent(pipe: Connection, spec: WorkerSpec) -> None:
    worker = Worker(spec)
    async with trio.open_nursery() as opening:
        # Clients opened early must answer the server's pings while the rest connect.
        opening.start_soon(worker.receive_forever)
        await worker.open_all()
        opening.cancel_scope.cancel()
    pipe.send(
        (
            "ready",
            {
                "connected": len(worker.clients),
                "failed": worker.failed,
                "failures": worker.failures,
                "cpuSeconds": cpu_seconds(),
            },
        )
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker.receive_forever)

        async def report() -> None:
            while True:
                await trio.sleep(PROGRESS_INTERVAL)
                pipe.send(("progress", worker.progress()))

        nursery.start_soon(report)
        if spec.churn_rate > 0:
            nursery.start_soon(worker.churn_forever)
        while True:
            await trio.lowlevel.wait_readable(pipe.fileno())
            message = pipe.recv()
            if message[0] == "checkpoint":
                _, final_offset, grace, last = message
                with trio.move_on_after(grace):
                    while not worker.caught_up(final_offset):  # noqa: ASYNC110 - polled, the receive loop stays lean
                        await trio.sleep(0.02)
                pipe.send(("result", worker.result(final_offset)))
                worker.latency.reset()
                if last:
                    nursery.cancel_scope.cancel()
            elif message[0] == "reset":
                worker.latency.reset()
    for client in worker.clients.values():
        await trio.aclose_forcefully(client.session.stream)


def worker_main(pipe: Connection, spec: WorkerSpec) -> None:
    """Entry point of a worker process."""
    if spec.cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, spec.cpus)
    raise_open_files_limit()
    try:
        trio.run(_serve_parent, pipe, spec)
    except KeyboardInterrupt:
        pass
    finally:
        pipe.close()
