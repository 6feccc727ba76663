"""The trio client against a real gateway: order, handlers, recovery, restarts, gaps, pacing."""

from __future__ import annotations

import random
import socket
from typing import Any

import pytest
import trio
import trio.lowlevel
from hypothesis import given
from hypothesis import strategies as st

from kaldrix.client import (
    ClientClosed,
    ClientOptions,
    CommandError,
    Dispatcher,
    Gap,
    GapReason,
    KaldrixClient,
    Pacer,
    Positions,
    backoff_ceiling,
    backoff_delay,
    open_client,
)
from kaldrix.protocol import ChannelPosition, Envelope, NewBlock, build_new_block_message
from kaldrix.security import issue_token
from kaldrix.server import Gateway

from .conftest import block_event, make_config, tx_event

FAST = {"reconnect_interval": 0.02, "max_reconnect_delay": 0.1, "connect_timeout": 2.0}
"""Reconnect quickly: the tests restart servers and drop connections on purpose."""

SECRET = "a-test-secret-that-is-long-enough-for-hs256"


class Recorder:
    """A handler that remembers what it got and lets a test wait for a count."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self._changed = trio.Event()

    def __call__(self, item: Any) -> None:
        self.items.append(item)
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, count: int) -> list[Any]:
        with trio.fail_after(5):
            while len(self.items) < count:
                await self._changed.wait()
        return self.items

    @property
    def offsets(self) -> list[int]:
        return [item.offset for item in self.items]


async def quiet(seconds: float = 0.1) -> None:
    """Give stray deliveries a chance to show up before asserting there are none."""
    await trio.sleep(seconds)


async def next_session(client: KaldrixClient, previous: str | None) -> str | None:
    """Wait until the client runs on a new connection, subscribed again."""
    with trio.fail_after(5):
        while client.state.session_id == previous or not client.state.is_connected:
            await trio.sleep(0.005)
    await client.wait_connected()
    return client.state.session_id


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- delivery -------------------------------------------------------------------------


async def test_events_arrive_in_order_as_decoded_envelopes(gateway):
    async with open_client(gateway.url, channels=["blocks"], **FAST) as subscriber, open_client(gateway.url) as producer:
        events = subscriber.events()
        for height in range(1, 21):
            await producer.publish(block_event(height))
        received = [await events.__anext__() for _ in range(20)]
        assert all(isinstance(event, Envelope) and isinstance(event.payload, NewBlock) for event in received)
        assert [event.offset for event in received] == list(range(1, 21))
        assert [event.payload.height for event in received] == list(range(1, 21))
        epoch = gateway.broker.position("blocks").epoch
        assert {event.epoch for event in received} == {epoch}
        assert subscriber.state.last_offsets == {"blocks": (20, epoch)}
        assert subscriber.state.is_connected and subscriber.state.session_id


async def test_subscribe_by_type_star_and_unsubscribe(gateway):
    async with open_client(gateway.url, channels=["blocks", "transactions"]) as client, open_client(gateway.url) as producer:
        blocks, everything, transactions = Recorder(), Recorder(), Recorder()
        stop_blocks = client.subscribe("NEW_BLOCK", blocks)
        client.subscribe("*", everything)

        async def on_tx(event: Envelope) -> None:  # async handlers are awaited in order
            await trio.lowlevel.checkpoint()
            transactions(event)

        client.subscribe("TX_RECEIVED", on_tx)
        await producer.publish(block_event(1))
        await producer.publish(tx_event("t1", "0xa", "0xb"))
        await everything.wait_for(2)
        stop_blocks()
        stop_blocks()  # idempotent
        await producer.publish(block_event(2))
        await everything.wait_for(3)
        await quiet()
        assert [event.payload.height for event in blocks.items] == [1]
        assert [event.payload.tx_id for event in transactions.items] == ["t1"]
        assert [event.type for event in everything.items] == ["NEW_BLOCK", "TX_RECEIVED", "NEW_BLOCK"]


async def test_a_failing_handler_does_not_stop_delivery(gateway, caplog):
    async with open_client(gateway.url, channels=["blocks"]) as client, open_client(gateway.url) as producer:
        good = Recorder()

        def broken(event: Envelope) -> None:
            raise RuntimeError("application bug")

        client.subscribe("NEW_BLOCK", broken)
        client.subscribe("NEW_BLOCK", good)
        await producer.publish(block_event(1), block_event(2))
        assert [event.offset for event in await good.wait_for(2)] == [1, 2]
    assert "application bug" in caplog.text


async def test_publish_built_envelopes_batches_and_duplicates(gateway):
    async with open_client(gateway.url, channels=["blocks"]) as client:
        built = build_new_block_message(block_id="b1", height=1)
        ack = await client.publish(built)
        assert ack.results[0].id == built.id and ack.results[0].offsets == {"blocks": 1}
        again = await client.publish(built)
        assert again.results[0].duplicate is True and again.results[0].offsets == {"blocks": 1}
        batch = await client.publish(block_event(2), block_event(3), channel="blocks")
        assert [result.offsets["blocks"] for result in batch.results] == [2, 3]
        assert all(result.id for result in batch.results)  # ids are added, so a retry is safe


async def test_publish_refused_raises_command_error(gateway):
    async with open_client(gateway.url) as client:
        with pytest.raises(CommandError) as caught:
            await client.publish({"type": "NEW_BLOCK", "payload": {"height": 1, "timestamp": "2025-08-07T10:00:00Z"}})
        assert caught.value.code == "INVALID_PAYLOAD"
        assert caught.value.error.path == "payload.event.payload.blockId"


async def test_join_and_leave(gateway):
    async with open_client(gateway.url) as client, open_client(gateway.url) as producer:
        seen = Recorder()
        client.subscribe("*", seen)
        await producer.publish(block_event(1))
        await client.join("blocks")
        await producer.publish(block_event(2))
        assert [event.offset for event in await seen.wait_for(1)] == [2]
        with pytest.raises(ValueError, match="unknown channel"):
            await client.join("nonsense")
        with pytest.raises(CommandError) as caught:
            await client.join("user:alice")  # private channels need a token
        assert caught.value.code == "FORBIDDEN"
        assert client.channels == ["blocks"]
        await client.leave("blocks")
        assert client.channels == [] and "blocks" not in client.state.last_offsets
        await producer.publish(block_event(3))
        await quiet()
        assert len(seen.items) == 1


async def test_a_refused_channel_is_dropped_and_the_rest_joined(gateway):
    async with open_client(gateway.url, channels=["user:alice", "blocks"]) as client, open_client(gateway.url) as producer:
        assert client.channels == ["blocks"]
        assert "user:alice" in client.state.connection_error
        events = client.events()
        await producer.publish(block_event(1))
        assert (await events.__anext__()).offset == 1


async def test_ping_measures_latency(gateway):
    async with open_client(gateway.url) as client:
        assert client.state.message_latency is None
        latency = await client.ping()
        assert latency > 0
        assert client.state.message_latency == latency


async def test_keepalive_pings_measure_latency_on_their_own(gateway):
    async with open_client(gateway.url, ping_interval=0.01) as client:
        with trio.fail_after(5):
            while client.state.message_latency is None:
                await trio.sleep(0.01)
        assert client.state.message_latency > 0


async def test_send_any_message_and_handle_its_reply_by_type(gateway):
    async with open_client(gateway.url) as client:
        responses = Recorder()
        client.subscribe("METRICS_RESPONSE", responses)
        await client.send("REQUEST_METRICS", {"type": "all"})
        (response,) = await responses.wait_for(1)
        assert response.payload.type == "all"
        assert response.payload.metrics["connections"]["active"] >= 1


# -- recovery -------------------------------------------------------------------------


async def test_survives_dropped_connections_while_a_producer_publishes(gateway):
    total = 60
    gaps = Recorder()
    async with open_client(gateway.url, channels=["blocks"], **FAST) as subscriber, open_client(gateway.url, **FAST) as producer:
        subscriber.on_gap(gaps)
        received = Recorder()
        subscriber.subscribe("NEW_BLOCK", received)
        sessions = {subscriber.state.session_id}

        async def produce() -> None:
            for height in range(1, total + 1):
                await producer.publish(block_event(height))
                await trio.sleep(0.002)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(produce)
            for round_ in range(4):
                await received.wait_for(10 * (round_ + 1))
                for conn in list(gateway.connections):
                    if round_ % 2:
                        conn.kick(1012, "restart")
                    else:
                        await conn.ws._stream.aclose()  # drop the socket without a close handshake
                sessions.add(await next_session(subscriber, subscriber.state.session_id))
        await received.wait_for(total)
        await quiet()
    assert received.offsets == list(range(1, total + 1))
    assert [event.payload.height for event in received.items] == list(range(1, total + 1))
    assert gaps.items == []
    assert len(sessions) >= 3, "the subscriber should have reconnected"


async def restart(nursery: trio.Nursery, old: Gateway, *, keep_history: bool, **overrides: Any) -> Gateway:
    """Stop a gateway with 1012 and start another on the same port."""
    port = old.port
    await old.shutdown(code=1012)
    new = Gateway(make_config(port=port, **overrides), broker=old.broker if keep_history else None)
    await nursery.start(new.run)
    return new


async def test_survives_a_gateway_restart_without_gaps_or_duplicates(start_gateway, nursery):
    old = await start_gateway()
    total = 40
    gaps = Recorder()
    async with open_client(old.url, channels=["blocks"], **FAST) as subscriber, open_client(old.url, **FAST) as producer:
        subscriber.on_gap(gaps)
        received = Recorder()
        subscriber.subscribe("NEW_BLOCK", received)

        async def produce() -> None:
            for height in range(1, total + 1):
                await producer.publish(block_event(height))
                await trio.sleep(0.002)

        async with trio.open_nursery() as producing:
            producing.start_soon(produce)
            await received.wait_for(15)
            new = await restart(nursery, old, keep_history=True)
        await received.wait_for(total)
        await quiet()
        assert received.offsets == list(range(1, total + 1))
        assert [event.payload.height for event in received.items] == list(range(1, total + 1))
        assert gaps.items == []
        assert {event.epoch for event in received.items} == {new.broker.position("blocks").epoch}
    await new.shutdown()


async def test_a_restart_that_loses_history_reports_a_gap(start_gateway, nursery):
    old = await start_gateway()
    async with open_client(old.url, channels=["blocks"], **FAST) as subscriber, open_client(old.url, **FAST) as producer:
        gaps = Recorder()
        subscriber.on_gap(gaps)
        stream = subscriber.events(include_gaps=True)
        await producer.publish(block_event(1), block_event(2), block_event(3))
        old_epoch = old.broker.position("blocks").epoch
        new = await restart(nursery, old, keep_history=False)
        (gap,) = await gaps.wait_for(1)
        new_epoch = new.broker.position("blocks").epoch
        assert gap == Gap("blocks", 3, old_epoch, 0, new_epoch, GapReason.EPOCH_CHANGED)
        await producer.publish(block_event(4))
        items = [await stream.__anext__() for _ in range(5)]
        assert [item.offset for item in items[:3]] == [1, 2, 3]
        assert items[3] == gap  # the gap comes in stream order, before the new epoch's events
        assert (items[4].offset, items[4].epoch, items[4].payload.height) == (1, new_epoch, 4)
        assert subscriber.state.last_offsets["blocks"] == (1, new_epoch)
    await new.shutdown()


async def test_trimmed_history_reports_the_missed_range(start_gateway):
    gateway = await start_gateway(history_size=3)
    async with open_client(gateway.url, channels=["blocks"], **FAST) as subscriber, open_client(gateway.url) as producer:
        gaps, received = Recorder(), Recorder()
        subscriber.on_gap(gaps)
        subscriber.subscribe("NEW_BLOCK", received)
        await producer.publish(*[block_event(h) for h in range(1, 4)])
        await received.wait_for(3)
        (conn,) = [c for c in gateway.connections if c.channels]
        gateway.draining = True  # new upgrades get 503 until the events below are in
        conn.kick(1012, "restart")
        await gateway.publish_events([build_new_block_message(block_id=f"b{h}", height=h) for h in range(4, 14)])
        with trio.fail_after(5):
            while gateway.broker.position("blocks").offset < 13:
                await trio.sleep(0.01)
        gateway.draining = False
        (gap,) = await gaps.wait_for(1)
        assert (gap.last_offset, gap.new_offset, gap.reason, gap.missed) == (3, 13, GapReason.HISTORY_TRIMMED, 10)
        await producer.publish(block_event(14))
        await received.wait_for(4)
        assert received.offsets == [1, 2, 3, 14]


async def test_gives_up_after_max_reconnect_attempts(start_gateway):
    gateway = await start_gateway()
    async with open_client(gateway.url, channels=["blocks"], max_reconnect_attempts=2, **FAST) as client:
        stream = client.events()
        await gateway.shutdown()
        with trio.fail_after(5):
            await client.wait_closed()
        assert client.is_closed and not client.state.is_connected
        assert client.state.reconnect_attempts == 2
        assert "gave up after 2 reconnect attempt(s)" in client.state.connection_error
        assert [event async for event in stream] == []  # iteration ends when the client stops
        with pytest.raises(ClientClosed, match="gave up"):
            await client.ping()


async def test_open_client_fails_when_nothing_listens():
    url = f"ws://127.0.0.1:{free_port()}/ws"
    with pytest.raises(ClientClosed, match="cannot connect"):
        async with open_client(url, auto_reconnect=False):
            raise AssertionError("never connected")


async def test_a_refused_token_is_not_retried(start_gateway):
    gateway = await start_gateway(jwt_secret=SECRET)
    with pytest.raises(ClientClosed, match="authentication failed"):
        async with open_client(gateway.url, token="not-a-jwt", channels=["blocks"], **FAST):
            raise AssertionError("the token was accepted")


async def test_token_callback_is_asked_on_every_connect(start_gateway):
    gateway = await start_gateway(jwt_secret=SECRET, require_auth=True)
    issued: list[str] = []

    async def token() -> str:
        issued.append(issue_token("explorer-1", "user", ttl=60, secret=SECRET))
        return issued[-1]

    async with open_client(gateway.url, token=token, channels=["blocks", "user:explorer-1"], **FAST) as client:
        first = client.state.session_id
        for conn in list(gateway.connections):
            conn.kick(1012, "restart")
        await next_session(client, first)
        assert len(issued) == 2
        assert client.channels == ["blocks", "user:explorer-1"]


# -- throttle and debounce, end to end ---------------------------------------------------------


async def test_throttle_paces_handlers_but_not_iteration(gateway):
    async with open_client(gateway.url, channels=["blocks"], enable_throttle=True, throttle_time=0.3) as client, open_client(
        gateway.url
    ) as producer:
        handled = Recorder()
        client.subscribe("NEW_BLOCK", handled)
        stream = client.events()
        await producer.publish(*[block_event(h) for h in range(1, 11)])
        assert [(await stream.__anext__()).offset for _ in range(10)] == list(range(1, 11))
        await handled.wait_for(2)
        assert handled.offsets == [1, 10]  # leading edge, then the latest at the end of the window


# -- units: backoff, positions, pacing ---------------------------------------------------------


def test_backoff_is_full_jitter_within_the_exponential_ceiling():
    rng = random.Random(1234)
    delays = [backoff_delay(attempt, 0.5, 10.0, rng) for attempt in range(12)]
    for attempt, delay in enumerate(delays):
        assert 0.0 <= delay <= min(10.0, 0.5 * 2**attempt)
    assert [backoff_ceiling(a, 0.5, 10.0) for a in range(7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    again = random.Random(1234)
    assert delays == [backoff_delay(attempt, 0.5, 10.0, again) for attempt in range(12)]
    assert backoff_ceiling(10_000, 1.0, 30.0) == 30.0


@given(
    attempt=st.integers(min_value=0, max_value=200),
    base=st.floats(min_value=0.001, max_value=60),
    cap=st.floats(min_value=0.001, max_value=600),
    seed=st.integers(),
)
def test_backoff_never_leaves_its_bounds(attempt, base, cap, seed):
    delay = backoff_delay(attempt, base, cap, random.Random(seed))
    assert 0.0 <= delay <= min(cap, base * 2.0 ** min(attempt, 64))


def test_backoff_spreads_delays_over_the_whole_window():
    rng = random.Random(7)
    delays = [backoff_delay(3, 1.0, 30.0, rng) for _ in range(2000)]
    assert max(delays) <= 8.0
    assert sum(d < 2.0 for d in delays) > 300 and sum(d > 6.0 for d in delays) > 300


@given(st.lists(st.integers(min_value=1, max_value=30), max_size=60))
def test_positions_deliver_each_offset_once_whatever_is_replayed(replays):
    """Events 1..30 in order, with already-seen offsets arriving again at random points."""
    positions = Positions({})
    positions.subscribed("blocks", ChannelPosition(0, "e1"))
    delivered = []
    pending = iter(sorted(replays))
    next_replay = next(pending, None)
    for offset in range(1, 31):
        while next_replay is not None and next_replay <= offset - 1:
            accept, gap = positions.admit("blocks", next_replay, "e1")
            assert (accept, gap) == (False, None)
            next_replay = next(pending, None)
        accept, gap = positions.admit("blocks", offset, "e1")
        assert gap is None
        if accept:
            delivered.append(offset)
    assert delivered == list(range(1, 31))


def test_positions_name_every_kind_of_gap():
    positions = Positions({})
    positions.subscribed("blocks", ChannelPosition(5, "e1"))
    assert positions.table == {"blocks": (5, "e1")}
    assert positions.since(["blocks", "dag"]) == {"blocks": {"offset": 5, "epoch": "e1"}}
    assert positions.subscribed("blocks", ChannelPosition(9, "e1", recovered=True, replayed=4)) is None
    assert positions.table["blocks"] == (5, "e1")  # the replay advances it
    assert positions.admit("blocks", 8, "e1") == (True, Gap("blocks", 5, "e1", 7, "e1", GapReason.OFFSET_SKIPPED))
    gap = positions.subscribed("blocks", ChannelPosition(20, "e1", recovered=False))
    assert gap == Gap("blocks", 8, "e1", 20, "e1", GapReason.HISTORY_TRIMMED) and gap.missed == 12
    accept, gap = positions.admit("blocks", 1, "e2")
    assert accept and gap == Gap("blocks", 20, "e1", 0, "e2", GapReason.EPOCH_CHANGED) and gap.missed is None


def test_pacer_throttle_is_leading_and_trailing_per_type():
    pacer = Pacer.from_settings(throttle=1.0)
    assert pacer.offer("A", "a1", 0.0) == ["a1"]
    assert pacer.offer("A", "a2", 0.1) == []
    assert pacer.offer("B", "b1", 0.2) == ["b1"]  # each type has its own window
    assert pacer.offer("A", "a3", 0.5) == []
    assert pacer.deadline() == 1.0
    assert pacer.due(0.99) == []
    assert pacer.due(1.0) == ["a3"]  # the latest of the window, at its end
    assert pacer.offer("A", "a4", 1.5) == []  # the trailing release opened a new window
    assert pacer.due(2.0) == ["a4"]
    assert pacer.offer("A", "a5", 3.5) == ["a5"]  # quiet long enough: leading edge again


def test_pacer_debounce_waits_for_quiet():
    pacer = Pacer.from_settings(debounce=0.5)
    assert [pacer.offer("A", f"a{i}", i * 0.1) for i in range(5)] == [[]] * 5
    assert pacer.deadline() == pytest.approx(0.9)
    assert pacer.due(0.8) == []
    assert pacer.due(0.9) == ["a4"]
    assert pacer.deadline() == float("inf")


def test_pacer_debounce_then_throttle():
    pacer = Pacer.from_settings(throttle=2.0, debounce=0.5)
    pacer.offer("A", "a1", 0.0)
    assert pacer.due(0.5) == ["a1"]  # debounced, then the throttle's leading edge
    pacer.offer("A", "a2", 1.0)
    assert pacer.due(1.5) == []  # debounced, but inside the throttle window
    assert pacer.due(2.5) == ["a2"]
    pacer.offer("A", "a3", 3.0)
    assert pacer.flush() == ["a3"]


def _event(event_type: str, offset: int) -> Envelope:
    return Envelope(type=event_type, payload={}, channel="blocks", offset=offset, epoch="e")


async def _feed_at(send: trio.MemorySendChannel[Any], schedule: list[tuple[float, Any]], end_at: float) -> None:
    async with send:
        for at, item in schedule:
            await trio.sleep_until(at)
            await send.send(item)
        await trio.sleep_until(end_at)


async def test_dispatcher_throttle_under_a_virtual_clock(autojump_clock):
    dispatcher = Dispatcher(Pacer.from_settings(throttle=1.0))
    calls: list[tuple[float, int]] = []
    dispatcher.subscribe("NEW_BLOCK", lambda event: calls.append((trio.current_time(), event.offset)))
    stream = dispatcher.open_stream()
    send, receive = trio.open_memory_channel[Any](10)
    start = trio.current_time()
    schedule = [(start + t, _event("NEW_BLOCK", n)) for n, t in enumerate([0.0, 0.2, 0.4, 0.6, 2.5, 2.7], 1)]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(dispatcher.run, receive)
        nursery.start_soon(_feed_at, send, schedule, start + 5.0)
        assert [event.offset async for event in stream] == [1, 2, 3, 4, 5, 6]
    assert [(round(at - start, 3), offset) for at, offset in calls] == [(0.0, 1), (1.0, 4), (2.5, 5), (3.5, 6)]


async def test_dispatcher_debounce_under_a_virtual_clock(autojump_clock):
    dispatcher = Dispatcher(Pacer.from_settings(debounce=0.2))
    calls: list[tuple[float, str, int]] = []
    dispatcher.subscribe("*", lambda event: calls.append((trio.current_time(), event.type, event.offset)))
    send, receive = trio.open_memory_channel[Any](10)
    start = trio.current_time()
    times = [(0.0, "NEW_BLOCK"), (0.1, "NEW_BLOCK"), (0.15, "DAG_UPDATE"), (0.25, "NEW_BLOCK"), (1.0, "NEW_BLOCK")]
    schedule = [(start + t, _event(kind, n)) for n, (t, kind) in enumerate(times, 1)]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(dispatcher.run, receive)
        nursery.start_soon(_feed_at, send, schedule, start + 1.0)
    assert [(round(at - start, 3), kind, offset) for at, kind, offset in calls] == [
        (0.35, "DAG_UPDATE", 3),
        (0.45, "NEW_BLOCK", 4),
        (1.0, "NEW_BLOCK", 5),  # held when the stream ended: released, not dropped
    ]


async def test_an_abandoned_stream_does_not_stall_dispatch():
    dispatcher = Dispatcher(buffer_size=1)
    handled = Recorder()
    dispatcher.subscribe("NEW_BLOCK", handled)
    dispatcher.open_stream()  # never read, never closed, and dropped at once
    send, receive = trio.open_memory_channel[Any](10)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(dispatcher.run, receive)
        async with send:
            for offset in range(1, 6):
                await send.send(_event("NEW_BLOCK", offset))
        await handled.wait_for(5)


def test_options_validate_and_client_checks_channels():
    with pytest.raises(ValueError):
        ClientOptions(url="ws://x", reconnect_interval=0)
    with pytest.raises(ValueError, match="unknown channel"):
        KaldrixClient(ClientOptions(url="ws://x"), channels=["nope"])
