"""The client library under every kind of disconnect and stall: it resumes each channel
where it stopped, so the application sees each event exactly once and in order (or an
explicit Gap), its retried publishes are delivered once, and it comes back jittered."""

from __future__ import annotations

import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import attrs
import orjson
import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from kaldrix.client import Gap, KaldrixClient, open_client
from kaldrix.client._watchdog import Freshness, stale_after
from kaldrix.protocol import CloseCode, Envelope, build_new_block_message
from kaldrix.server import Gateway
from kaldrix.server._wire import text_frame

from .conftest import block_event, make_config

FAST = {"reconnect_interval": 0.02, "max_reconnect_delay": 0.1, "connect_timeout": 2.0}
ROOT = Path(__file__).resolve().parents[1]


# -- a network the tests can break ---------------------------------------------------------


@attrs.define(eq=False)
class _Link:
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    swallow: bool = False


class Relay:
    """A TCP relay in front of a gateway: the network between clients and the server.

    `cut()` ends every current connection at both ends without a close frame (a dropped
    network); `swallow()` makes the current connections lose whatever the server sends
    from then on, while the TCP connections stay up (a path that died silently).
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._links: set[_Link] = set()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def cut(self) -> None:
        for link in list(self._links):
            link.scope.cancel()

    def swallow(self) -> None:
        for link in self._links:
            link.swallow = True

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self)
        await trio.serve_listeners(self._serve, listeners)

    async def _serve(self, downstream: trio.SocketStream) -> None:
        try:
            upstream = await trio.open_tcp_stream("127.0.0.1", self.target_port)
        except OSError:
            await downstream.aclose()
            return
        link = _Link()
        self._links.add(link)
        try:
            with link.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_pump, downstream, upstream, None, nursery.cancel_scope)
                    nursery.start_soon(_pump, upstream, downstream, link, nursery.cancel_scope)
        finally:
            self._links.discard(link)
            with trio.CancelScope(shield=True):
                await upstream.aclose()
                await downstream.aclose()


async def _pump(source: trio.SocketStream, sink: trio.SocketStream, link: _Link | None, scope: trio.CancelScope) -> None:
    try:
        while data := await source.receive_some(65536):
            if link is None or not link.swallow:
                await sink.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    scope.cancel()  # one direction ended: so does the link


# -- helpers -------------------------------------------------------------------------------


class Seen:
    """What the application got from `client.events(include_gaps=True)`."""

    def __init__(self) -> None:
        self.items: list[Any] = []

    async def collect(self, client: KaldrixClient) -> None:
        async for item in client.events(include_gaps=True):
            self.items.append(item)

    @property
    def events(self) -> list[Envelope]:
        return [item for item in self.items if isinstance(item, Envelope)]

    @property
    def gaps(self) -> list[Gap]:
        return [item for item in self.items if isinstance(item, Gap)]

    def offsets(self, channel: str) -> list[int]:
        return [event.offset for event in self.events if event.channel == channel]

    async def wait_for(self, count: int, timeout: float = 10.0) -> None:
        with trio.fail_after(timeout):
            while len(self.events) < count:
                await trio.sleep(0.005)


async def next_session(client: KaldrixClient, previous: str | None) -> str | None:
    """Wait until the client runs on a new connection, subscribed again."""
    with trio.fail_after(10):
        while client.state.session_id == previous or not client.state.is_connected:
            await trio.sleep(0.005)
    await client.wait_connected()
    return client.state.session_id


def subscribers(gateway: Gateway) -> list[Any]:
    return [conn for conn in gateway.connections if conn.channels]


# -- recovery after every kind of disconnect -------------------------------------------------


@pytest.mark.parametrize("kind", ["network-drop", "4008", "1001", "1012", "restart"])
async def test_every_kind_of_disconnect_is_recovered_without_gaps_or_duplicates(nursery, kind):
    gateway = Gateway(make_config())
    await nursery.start(gateway.run)
    relay = await nursery.start(Relay(gateway.port).run)
    total = 45
    seen = Seen()

    async def disrupt() -> None:
        nonlocal gateway
        if kind == "network-drop":
            relay.cut()
        elif kind == "restart":  # a new process on the same port, with the same broker
            old = gateway
            await old.shutdown(CloseCode.RESTART, "server restarting")
            gateway = Gateway(make_config(port=old.port), broker=old.broker)
            await nursery.start(gateway.run)
        else:
            for conn in subscribers(gateway):
                conn.kick(int(kind), "told to go")

    async with (
        open_client(relay.url, channels=["blocks", "dag"], **FAST) as subscriber,
        open_client(gateway.url, **FAST) as producer,
    ):
        async def produce() -> None:
            for height in range(1, total + 1):
                await producer.publish(block_event(height))
                await producer.publish(block_event(height), channel="dag")
                await trio.sleep(0.003)

        async with trio.open_nursery() as running:
            running.start_soon(seen.collect, subscriber)
            running.start_soon(produce)
            for round_ in range(1, 4):
                await seen.wait_for(20 * round_)
                session = subscriber.state.session_id
                await disrupt()
                await next_session(subscriber, session)
            await seen.wait_for(2 * total)
            await trio.sleep(0.1)  # room for a stray duplicate to show up
            running.cancel_scope.cancel()
    assert seen.gaps == []
    for channel in ("blocks", "dag"):
        assert seen.offsets(channel) == list(range(1, total + 1)), channel
        heights = [event.payload.height for event in seen.events if event.channel == channel]
        assert heights == list(range(1, total + 1))
    if kind == "4008":
        assert gateway.metrics.slow_consumer_closes == 0  # told, not detected: nothing to count


async def test_a_client_too_slow_for_its_stream_is_closed_with_4008_and_misses_nothing(start_gateway):
    gateway = await start_gateway(outbox_size=16)
    total, padding = 400, "p" * 20_000  # more than the socket buffers hold
    seen = Seen()
    async with (
        open_client(gateway.url, channels=["blocks"], buffer_size=1, **FAST) as subscriber,
        open_client(gateway.url) as producer,
    ):
        stream = subscriber.events()  # opened, but the application does not read it yet
        for height in range(1, total + 1):
            await producer.publish(block_event(height, signature=padding))
        with trio.fail_after(10):
            while gateway.metrics.slow_consumer_closes == 0:
                await trio.sleep(0.01)
        with trio.fail_after(20):
            async for event in stream:
                seen.items.append(event)
                if event.offset == total:
                    break
    assert seen.offsets("blocks") == list(range(1, total + 1))
    assert subscriber.state.last_offsets["blocks"][0] == total
    # It caught up through a replay larger than its whole outbox.
    assert gateway.metrics.replayed > 16


async def test_a_publish_whose_ack_is_lost_is_sent_again_and_delivered_once(start_gateway, nursery):
    gateway = await start_gateway()
    relay = await nursery.start(Relay(gateway.port).run)
    built = build_new_block_message(block_id="b1", height=1)
    async with (
        open_client(gateway.url, channels=["blocks"]) as subscriber,
        open_client(relay.url, **FAST) as producer,
    ):
        stream = subscriber.events()
        relay.swallow()  # from now on nothing the server sends the producer gets through
        acks = []

        async def publish() -> None:
            acks.append(await producer.publish(built))

        async with trio.open_nursery() as publishing:
            publishing.start_soon(publish)
            with trio.fail_after(5):
                first = await stream.__anext__()  # the server published it ...
            relay.cut()  # ... and the connection died before its ACK arrived
        (ack,) = acks
        assert (ack.results[0].id, ack.results[0].duplicate, ack.results[0].offsets) == (built.id, True, {"blocks": 1})
        await producer.publish(block_event(2))
        with trio.fail_after(5):
            second = await stream.__anext__()
    assert (first.id, first.offset, second.offset) == (built.id, 1, 2)  # the retry was not delivered
    assert gateway.metrics.duplicates == 1


async def test_reconnect_on_request_resumes_where_it_stopped(gateway):
    seen = Seen()
    async with open_client(gateway.url, channels=["blocks"], **FAST) as client, open_client(gateway.url) as producer:
        async with trio.open_nursery() as running:
            running.start_soon(seen.collect, client)
            await producer.publish(block_event(1))
            await seen.wait_for(1)
            session = client.state.session_id
            await client.reconnect()
            await producer.publish(block_event(2))  # while it is away
            await next_session(client, session)
            await producer.publish(block_event(3))
            await seen.wait_for(3)
            running.cancel_scope.cancel()
    assert seen.offsets("blocks") == [1, 2, 3] and seen.gaps == []


# -- liveness: heartbeats and the staleness watchdog -----------------------------------------


async def test_a_subscription_the_server_lost_is_resubscribed_by_the_watchdog(start_gateway):
    gateway = await start_gateway(channel_heartbeat=0.1)  # the client's patience: 0.3 s
    seen = Seen()
    async with open_client(gateway.url, channels=["blocks"], **FAST) as client, open_client(gateway.url) as producer:
        async with trio.open_nursery() as running:
            running.start_soon(seen.collect, client)
            await producer.publish(block_event(1))
            await seen.wait_for(1)
            session = client.state.session_id
            (conn,) = subscribers(gateway)
            gateway.router.detach(conn)  # the server forgets the subscription and says nothing
            await producer.publish(block_event(2), block_event(3))
            await seen.wait_for(3)
            running.cancel_scope.cancel()
    assert seen.offsets("blocks") == [1, 2, 3] and seen.gaps == []
    assert client.state.resyncs >= 1
    assert client.state.session_id == session  # a resubscribe was enough: same connection


async def test_a_heartbeat_ahead_of_the_last_event_brings_the_missed_event(start_gateway):
    gateway = await start_gateway(channel_heartbeat=0.1)
    seen = Seen()
    # stale_after=0: no silence watchdog, so only the heartbeat's offset can reveal the miss.
    async with open_client(gateway.url, channels=["blocks"], stale_after=0, **FAST) as client:
        async with trio.open_nursery() as running:
            running.start_soon(seen.collect, client)
            await client.wait_connected()
            missed = build_new_block_message(block_id="b1", height=1)

            def frame(offset: int, epoch: str) -> bytes:
                return text_frame(attrs.evolve(missed, channel="blocks", offset=offset, epoch=epoch).encode())

            # Stored in history but never sent to the subscriber: a lost delivery.
            gateway.broker.append("blocks", frame, time.monotonic())
            await seen.wait_for(1)
            running.cancel_scope.cancel()
    assert [(event.offset, event.id) for event in seen.events] == [(1, missed.id)]
    assert seen.gaps == [] and client.state.resyncs == 1


async def test_a_silent_link_is_noticed_and_replaced_without_losing_events(start_gateway, nursery):
    gateway = await start_gateway(channel_heartbeat=0.1)
    relay = await nursery.start(Relay(gateway.port).run)
    seen = Seen()
    async with (
        open_client(relay.url, channels=["blocks"], ping_interval=None, **FAST) as client,
        open_client(gateway.url) as producer,
    ):
        async with trio.open_nursery() as running:
            running.start_soon(seen.collect, client)
            await producer.publish(block_event(1))
            await seen.wait_for(1)
            session = client.state.session_id
            relay.swallow()  # the TCP connection stays up; nothing from the server arrives
            await producer.publish(block_event(2))
            await next_session(client, session)
            await producer.publish(block_event(3))
            await seen.wait_for(3)
            running.cancel_scope.cancel()
    assert seen.offsets("blocks") == [1, 2, 3] and seen.gaps == []
    assert client.state.resyncs >= 1


def test_stale_after_defaults_to_three_heartbeats() -> None:
    assert stale_after(None, 15_000) == 45.0
    assert stale_after(None, 0) is None and stale_after(None, None) is None  # no heartbeats, no watchdog
    assert stale_after(2.5, 15_000) == 2.5
    assert stale_after(0, 15_000) is None


def test_freshness_flags_silence_and_heartbeats_that_do_not_match() -> None:
    fresh = Freshness(stale_after=3.0)
    fresh.heard("blocks", 10.0)
    fresh.heard("dag", 10.0)
    assert fresh.due(["blocks", "dag"], 12.0) == []
    assert fresh.heartbeat("blocks", (4, "e"), (4, "e"), 12.5) is False  # up to date
    assert fresh.due(["blocks", "dag"], 13.5) == ["dag"]  # blocks was heard at 12.5
    assert fresh.heartbeat("blocks", (5, "e"), (4, "e"), 14.0) is True  # an event went missing
    assert fresh.heartbeat("alerts", (1, "f"), (1, "e"), 14.0) is True  # the epoch changed
    assert fresh.due(["blocks", "alerts"], 14.0) == ["blocks", "alerts"]
    fresh.paused(10.0)  # the application kept the reader waiting: not the server's silence
    assert fresh.due(["blocks", "dag", "alerts"], 20.0) == []
    assert fresh.heartbeat("dag", (2, "e"), (1, "e"), 20.0) is True
    assert fresh.due(["blocks", "dag"], 99.0, silence=False) == ["dag"]  # a miss counts even then
    assert Freshness(None).due(["blocks"], 1e9) == []


# -- spreading out after a drain -------------------------------------------------------------


class RecordingRandom(random.Random):
    """A seeded Random that remembers every backoff draw."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.draws: list[tuple[float, float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        value = super().uniform(a, b)
        self.draws.append((a, b, value))
        return value


@pytest.mark.parametrize("code", [CloseCode.GOING_AWAY, CloseCode.RESTART])
async def test_the_first_reconnect_after_the_server_closes_is_jittered(gateway, code):
    interval = 0.2
    rngs = [RecordingRandom(seed) for seed in range(6)]
    clients = []
    async with trio.open_nursery() as running:
        for rng in rngs:
            client = KaldrixClient(open_client_options(gateway.url, interval, rng), ["blocks"])
            await running.start(client.run)
            await client.wait_connected()
            clients.append(client)
        sessions = [client.state.session_id for client in clients]
        for conn in list(gateway.connections):
            conn.kick(code, "told to go")
        for client, session in zip(clients, sessions, strict=True):
            await next_session(client, session)
        for client in clients:
            await client.close()
    first = [rng.draws[0] for rng in rngs]
    # Each client drew its first delay from the whole window [0, reconnect_interval] ...
    assert all((low, high) == (0.0, interval) and 0.0 <= value <= interval for low, high, value in first)
    # ... so a fleet told to leave at once does not come back at once.
    delays = sorted(value for _, _, value in first)
    assert delays[-1] - delays[0] > interval / 4


def open_client_options(url: str, interval: float, rng: random.Random) -> Any:
    from kaldrix.client import ClientOptions

    return ClientOptions(url=url, reconnect_interval=interval, max_reconnect_delay=1.0, rng=rng)


# -- SIGTERM / SIGINT drain of a real process -------------------------------------------------

LISTENING = re.compile(r"listening on ws://127\.0\.0\.1:(\d+)/ws")


async def _serve_process(*flags: str) -> tuple[trio.Process, int]:
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "kaldrix", "serve", "--port", "0", "--no-simulate", *flags],
        stderr=subprocess.PIPE, env=env,
    )
    buffer = b""
    with trio.fail_after(15):
        while not (match := LISTENING.search(buffer.decode(errors="replace"))):
            chunk = await process.stderr.receive_some(4096)
            assert chunk, f"serve exited early: {buffer.decode(errors='replace')}"
            buffer += chunk
    return process, int(match.group(1))


@pytest.mark.parametrize(("signum", "expected"), [(signal.SIGTERM, 1012), (signal.SIGINT, 1001)])
async def test_a_signal_drains_with_the_configured_code_and_exits_0(signum, expected):
    process, port = await _serve_process("--drain-close-code", "1012")
    output: list[bytes] = []

    async def drain_stderr() -> None:
        while chunk := await process.stderr.receive_some(4096):
            output.append(chunk)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain_stderr)
            async with open_websocket_url(f"ws://127.0.0.1:{port}/ws") as ws:
                assert orjson.loads(await ws.get_message())["type"] == "WELCOME"
                process.send_signal(signum)
                with pytest.raises(ConnectionClosed) as closed, trio.fail_after(10):
                    while True:
                        await ws.get_message()
                assert closed.value.reason.code == expected
            with trio.fail_after(10):
                assert await process.wait() == 0
    finally:
        process.kill()
    log = b"".join(output).decode()
    assert f"closing every client with {expected}" in log and "Traceback" not in log
