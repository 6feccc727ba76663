"""Faults and hostile peers on the server side: slow consumers (by count and by bytes), a
client killed mid-frame, half-open TCP, handshakes that never finish, channel heartbeats,
the graceful drain, and what is left behind after hundreds of clients come and go."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
from trio_websocket import ConnectionClosed, connect_websocket_url
from wsproto import ConnectionType, WSConnection
from wsproto.events import CloseConnection, Ping, Request

from kaldrix.server import Gateway
from kaldrix.server._heartbeat import ChannelClock

from .conftest import WireClient, block_event, raw_websocket, send_text

ROOT = Path(__file__).resolve().parents[1]

UNLIMITED = {"handshake_rate_limit": 0, "max_connections_per_ip": 0, "message_rate": 0}
"""Many connections from one address, as these tests make, are not abuse here."""

FAST_LIVENESS = {"ping_interval": 0.2, "ping_timeout": 0.2, "close_timeout": 0.2, "handshake_timeout": 0.3}


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


async def open_wire(nursery: trio.Nursery, gateway: Gateway) -> WireClient:
    client = WireClient(await connect_websocket_url(nursery, gateway.url))
    await client.expect("WELCOME")
    return client




async def until_closed(ws: Any, timeout: float = 10.0) -> tuple[list[dict[str, Any]], int | None]:
    """Every message a trio-websocket peer receives until the close, and the close code."""
    messages = []
    try:
        with trio.fail_after(timeout):
            while True:
                messages.append(orjson.loads(await ws.get_message()))
    except ConnectionClosed as exc:
        return messages, None if exc.reason is None else exc.reason.code


# -- slow consumers ------------------------------------------------------------------------


async def test_a_slow_consumer_over_the_byte_limit_is_closed_with_4008_and_others_get_everything(
    start_gateway, nursery, caplog
):
    # The count limit is far away: only the byte limit can trip.
    gateway = await start_gateway(outbox_size=100_000, outbox_max_bytes=128 * 1024)
    stream, ws = await raw_websocket(gateway.port)
    await send_text(stream, ws, {"type": "SUBSCRIBE", "id": "s", "payload": {"channels": ["blocks"]}})
    honest, producer = await open_wire(nursery, gateway), await open_wire(nursery, gateway)
    await honest.subscribe("blocks")
    await wait_until(lambda: gateway.router.subscriber_count("blocks") == 2)
    padding = "p" * 20_000
    total = 400
    received: list[dict[str, Any]] = []

    async def read_honestly() -> None:
        received.extend(await honest.events(total, timeout=20))

    with caplog.at_level(logging.WARNING, logger="kaldrix.router"):
        async with trio.open_nursery() as readers:
            readers.start_soon(read_honestly)
            for height in range(1, total + 1):
                await producer.publish(block_event(height, signature=padding))
    assert [event["payload"]["height"] for event in received] == list(range(1, total + 1))
    assert gateway.metrics.slow_consumer_closes == 1
    assert "closing with 4008" in caplog.text
    await wait_until(lambda: gateway.router.subscriber_count("blocks") == 1)
    await wait_until(lambda: len(gateway.connections) == 2)  # honest and producer remain
    await stream.aclose()


async def test_an_empty_outbox_takes_an_event_larger_than_the_byte_limit(start_gateway, nursery):
    gateway = await start_gateway(outbox_max_bytes=1024)
    subscriber, producer = await open_wire(nursery, gateway), await open_wire(nursery, gateway)
    await subscriber.subscribe("blocks")
    for height in range(1, 4):
        await producer.publish(block_event(height, signature="s" * 5000))
        (event,) = await subscriber.events(1)
        assert event["offset"] == height
    assert gateway.metrics.slow_consumer_closes == 0
    assert all(conn.queued_bytes == 0 for conn in gateway.connections)


# -- peers that die or never finish --------------------------------------------------------

_KILLED_MID_FRAME = textwrap.dedent(
    """
    import socket, sys, time
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import Request, TextMessage

    sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
    ws = WSConnection(ConnectionType.CLIENT)
    sock.sendall(ws.send(Request(host="127.0.0.1", target="/ws")))
    head = b""
    while b"\\r\\n\\r\\n" not in head:
        head += sock.recv(65536)
    ws.receive_data(head)
    list(ws.events())
    sock.sendall(ws.send(TextMessage('{"type":"SUBSCRIBE","id":"s","payload":{"channels":["blocks"]}}')))
    frame = ws.send(TextMessage('{"type":"PING","payload":{"t":"' + "x" * 4000 + '"}}'))
    sock.sendall(frame[:100])  # the head of a frame and a little of its payload
    print("mid-frame", flush=True)
    time.sleep(60)
    """
)


async def test_a_client_killed_mid_frame_is_freed(start_gateway):
    gateway = await start_gateway(**FAST_LIVENESS)
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", _KILLED_MID_FRAME, str(gateway.port)], stdout=subprocess.PIPE, cwd=ROOT
    )
    try:
        with trio.fail_after(15):
            assert b"mid-frame" in await process.stdout.receive_some(100)
        await wait_until(lambda: gateway.router.subscriber_count("blocks") == 1)
        assert len(gateway.connections) == 1
        process.kill()  # SIGKILL: no close frame, the kernel just drops the socket
        await process.wait()
        await wait_until(lambda: not gateway.connections)
        assert gateway.router.subscriber_count() == 0
        assert gateway.metrics.connections_active == 0
    finally:
        process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()


async def test_a_half_open_peer_that_stops_answering_pings_is_dropped(start_gateway, nursery):
    gateway = await start_gateway(**FAST_LIVENESS)
    stream, ws = await raw_websocket(gateway.port)
    await send_text(stream, ws, {"type": "SUBSCRIBE", "id": "s", "payload": {"channels": ["blocks"]}})
    await wait_until(lambda: gateway.router.subscriber_count("blocks") == 1)
    # From here on the peer is gone as far as the network can tell: nothing it receives
    # is ever answered, and no FIN ever comes (the socket stays open on our side).
    producer = await open_wire(nursery, gateway)
    await producer.publish(block_event(1))
    await wait_until(lambda: len(gateway.connections) == 1)  # only the producer
    assert gateway.router.subscriber_count() == 0
    await stream.aclose()


@pytest.mark.parametrize("direct_writes", [True, False])
async def test_a_peer_that_answers_pings_is_kept(start_gateway, direct_writes):
    # Pings are pre-framed writes: straight into the socket, or through the writer task.
    gateway = await start_gateway(**FAST_LIVENESS, direct_writes=direct_writes)
    stream, ws = await raw_websocket(gateway.port)
    pings = 0
    with trio.move_on_after(1.0):  # several ping intervals and timeouts
        while True:
            data = await stream.receive_some(65536)
            assert data, "the server closed a connection that answered its pings"
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, Ping):
                    pings += 1
                    await stream.send_all(ws.send(event.response()))
    assert pings >= 2 and len(gateway.connections) == 1
    await stream.aclose()


async def test_a_handshake_head_trickled_byte_by_byte_is_dropped(start_gateway):
    gateway = await start_gateway(**FAST_LIVENESS)
    stream = await trio.open_tcp_stream("127.0.0.1", gateway.port)
    head = b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    closed = False
    with trio.fail_after(5):
        for byte in head:  # slowloris: every byte in time to look alive, the head never done
            try:
                await stream.send_all(bytes([byte]))
            except trio.BrokenResourceError:
                closed = True
                break
            with trio.move_on_after(0.05):
                if await stream.receive_some(1024) == b"":
                    closed = True
                    break
    assert closed, "the server waited for the whole trickled head"
    assert gateway.metrics.connections_failed >= 1
    assert not gateway.connections


async def test_an_upgrade_whose_peer_never_reads_a_byte_is_dropped(start_gateway):
    gateway = await start_gateway(**FAST_LIVENESS)
    stream = await trio.open_tcp_stream("127.0.0.1", gateway.port)
    await stream.send_all(WSConnection(ConnectionType.CLIENT).send(Request(host="127.0.0.1", target="/ws")))
    # It never reads the 101, the WELCOME or a ping: the handshake is never finished on its side.
    await wait_until(lambda: len(gateway.connections) == 1)
    await wait_until(lambda: not gateway.connections)
    assert gateway.metrics.connections_active == 0
    await stream.aclose()


# -- channel heartbeats ---------------------------------------------------------------------


async def test_a_quiet_channel_gets_heartbeats_with_its_latest_position(start_gateway, nursery):
    gateway = await start_gateway(channel_heartbeat=0.1)
    subscriber, producer = await open_wire(nursery, gateway), await open_wire(nursery, gateway)
    ack = await subscriber.subscribe("blocks", "dag")
    epochs = {name: position["epoch"] for name, position in ack["payload"]["channels"].items()}
    await producer.publish(block_event(1), block_event(2))
    last = {"blocks": 0, "dag": 0}
    beats: dict[str, list[dict[str, Any]]] = {"blocks": [], "dag": []}
    with trio.fail_after(5):
        while min(len(found) for found in beats.values()) < 2:
            message = await subscriber.receive()
            if "channel" in message:
                last[message["channel"]] = message["offset"]
            elif message["type"] == "HEARTBEAT":
                payload = message["payload"]
                # Every event up to the heartbeat's offset came before it.
                assert payload == {"channel": payload["channel"], "offset": last[payload["channel"]], "epoch": epochs[payload["channel"]]}
                beats[payload["channel"]].append(payload)
    assert [beat["offset"] for beat in beats["blocks"]][-1] == 2
    assert {beat["offset"] for beat in beats["dag"]} == {0}
    assert gateway.metrics.deliveries == 2  # heartbeats are not counted as event deliveries


async def test_welcome_announces_the_channel_heartbeat_and_zero_turns_it_off(start_gateway, nursery):
    gateway = await start_gateway(channel_heartbeat=0)
    client = WireClient(await connect_websocket_url(nursery, gateway.url))
    welcome = await client.expect("WELCOME")
    assert welcome["payload"]["channelHeartbeat"] == 0
    await client.subscribe("blocks")
    await trio.sleep(0.3)
    ping = await client.send("PING", {"t": 1})
    while (message := await client.receive())["type"] != "PONG":
        assert message["type"] != "HEARTBEAT"
    assert message["payload"]["ref"] == ping
    other = await start_gateway()
    client = WireClient(await connect_websocket_url(nursery, other.url))
    assert (await client.expect("WELCOME"))["payload"]["channelHeartbeat"] == 15000


async def test_heartbeat_bookkeeping_follows_the_subscriptions(start_gateway, nursery):
    gateway = await start_gateway(channel_heartbeat=0.05)
    client = await open_wire(nursery, gateway)
    await client.subscribe("blocks", "alerts")
    assert len(gateway.router.heartbeats) == 2
    await client.request("UNSUBSCRIBE", {"channels": ["blocks"]})
    assert len(gateway.router.heartbeats) == 1
    await client.ws.aclose()
    await wait_until(lambda: len(gateway.router.heartbeats) == 0 and not gateway.connections)


def test_channel_clock_hands_out_the_quiet_channels_oldest_first() -> None:
    clock = ChannelClock()
    clock.touch("a", 1.0)
    clock.touch("b", 2.0)
    clock.touch("c", 3.0)
    clock.touch("a", 4.0)  # activity moves a channel to the back
    assert clock.next_due(10.0) == 12.0
    assert clock.take_due(13.5, 10.0) == ["b", "c"]
    assert clock.take_due(13.5, 10.0) == []  # handed out until touched again
    clock.forget("a")
    assert len(clock) == 0 and clock.next_due(10.0) is None


# -- graceful drain ------------------------------------------------------------------------


async def test_a_drain_flushes_queued_frames_before_closing_with_1012(start_gateway, nursery):
    gateway = await start_gateway(outbox_max_bytes=64 << 20)
    subscriber = await open_wire(nursery, gateway)
    producer = await open_wire(nursery, gateway)
    await subscriber.subscribe("blocks")
    total, padding = 100, "q" * 100_000  # 10 MB: more than the socket buffers hold
    for height in range(1, total + 1):
        await producer.publish(block_event(height, signature=padding))
    (conn,) = [conn for conn in gateway.connections if conn.channels]
    assert conn.queued_bytes > 0, "the subscriber was meant to have a backlog at the drain"
    async with trio.open_nursery() as draining:
        draining.start_soon(gateway.shutdown, 1012, "server restarting")
        await wait_until(lambda: gateway.draining)
        messages, code = await until_closed(subscriber.ws)
    assert [m["offset"] for m in messages if "channel" in m] == list(range(1, total + 1))
    assert code == 1012


# -- resource hygiene ----------------------------------------------------------------------


async def test_hundreds_of_clients_come_and_go_and_leave_nothing_behind(start_gateway, nursery):
    gateway = await start_gateway(history_ttl=0.3, dedup_window=0.3, channel_heartbeat=0.05, **UNLIMITED)
    count = 200

    async def one_client(index: int) -> None:
        client = WireClient(await connect_websocket_url(nursery, gateway.url))
        await client.expect("WELCOME")
        await client.subscribe("blocks", f"address:0x{index:x}", "alerts")
        if index % 10 == 0:
            tx = {"type": "TX_RECEIVED", "id": f"tx-{index}", "payload": {
                "txId": f"t{index}", "from": f"0x{index:x}", "to": "0xsink", "amount": "1",
                "status": "pending", "timestamp": "2025-08-07T10:00:00Z"}}
            assert (await client.publish(tx))["type"] == "ACK"
        match index % 3:
            case 0:
                await client.ws.aclose()  # a clean close
            case 1:
                await client.ws._stream.aclose()  # the TCP connection just drops
            case 2:  # dies in the middle of a frame
                await client.ws._stream.send_all(bytes([0x81, 0xFE, 0x10, 0x00]) + b"\x00" * 10)
                await client.ws._stream.aclose()

    async with trio.open_nursery() as clients:
        for index in range(count):
            clients.start_soon(one_client, index)
    await wait_until(lambda: not gateway.connections, timeout=15)
    await trio.testing.wait_all_tasks_blocked()  # the router has taken the last detach
    assert gateway.metrics.connections_active == 0
    assert gateway.metrics.connections_total >= count
    assert gateway.metrics.slow_consumer_closes == 0  # leaving is not being slow
    assert gateway.router.subscriber_count() == 0
    assert gateway.router.channel_count == 0
    assert len(gateway.router.heartbeats) == 0
    # Only channels that carried an event have broker state (the 200 quiet address channels
    # have none): transactions, address:0xsink and one address per publisher.
    assert gateway.broker.statistics()["channels"] == 2 + count // 10
    # History and dedup ids age out by themselves, with nobody publishing any more.
    await wait_until(lambda: gateway.broker.statistics()["storedEvents"] == 0)
    await wait_until(lambda: gateway.broker.statistics()["dedupIds"] == 0)


@pytest.mark.parametrize("code", [1001, 1012])
async def test_during_a_drain_readyz_is_503_upgrades_are_refused_and_clients_get_the_code(start_gateway, code):
    gateway = await start_gateway(close_timeout=1.0)
    # A peer that never answers the close frame keeps the drain waiting for close_timeout.
    stream, ws = await raw_websocket(gateway.port)
    early = [await trio.open_tcp_stream("127.0.0.1", gateway.port) for _ in range(2)]
    await trio.sleep(0.1)  # let the listener accept them before it stops
    async with trio.open_nursery() as draining:
        draining.start_soon(gateway.shutdown, code)
        await wait_until(lambda: gateway.draining)
        answers = []
        for early_stream, head in zip(early, [b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n", ws_upgrade()], strict=True):
            await early_stream.send_all(head)
            with trio.fail_after(5):
                answers.append(await early_stream.receive_some(4096))
        assert answers[0].startswith(b"HTTP/1.1 503") and b'"draining"' in answers[0]
        assert answers[1].startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in answers[1]
        close = None
        with trio.fail_after(5):
            while close is None:
                data = await stream.receive_some(65536)
                assert data, "the TCP connection ended without a close frame"
                ws.receive_data(data)
                close = next((e for e in ws.events() if isinstance(e, CloseConnection)), None)
        assert close.code == code
    assert not gateway.connections
    await stream.aclose()


def ws_upgrade() -> bytes:
    return WSConnection(ConnectionType.CLIENT).send(Request(host="127.0.0.1", target="/ws"))


async def test_the_dedup_memory_keeps_only_ids_a_producer_sent(gateway, connect) -> None:
    """An event without an id gets one from the server, which nobody can send again: the
    dedup window remembers only the ids producers chose."""
    producer = await connect()
    await producer.publish(block_event(1), block_event(2))  # no ids
    await producer.publish({**block_event(3), "id": "chosen-by-the-producer"})
    assert gateway.broker.statistics()["dedupIds"] == 1
    again = await producer.publish({**block_event(4), "id": "chosen-by-the-producer"})
    assert again["payload"]["results"][0]["duplicate"] is True
