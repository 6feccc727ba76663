"""kaldrix.server._wire: the raw write path beneath trio-websocket, and what it relies on."""

from __future__ import annotations

import importlib.metadata
import inspect
import socket

import orjson
import pytest
import trio
import trio_websocket
from trio_websocket import WebSocketConnection, connect_websocket_url

from kaldrix.bench._ws import OP_TEXT, client_frame, handshake_request, split_frames
from kaldrix.server._wire import DirectWriter, check_compatible, ping_frame, shed_handshake, text_frame

from .conftest import WireClient, block_event


def test_pinned_trio_websocket_version() -> None:
    version = importlib.metadata.version("trio-websocket")
    assert version.startswith("0.12."), f"kaldrix.server._wire was checked against 0.12.x, found {version}"


def test_trio_websocket_still_writes_under_the_lock_we_take() -> None:
    """Direct writes are only safe if every write of the library goes through _stream_lock
    and every close path sets `closed` before writing its close frame."""
    send = inspect.getsource(WebSocketConnection._send)
    assert "async with self._stream_lock" in send and "self._stream.send_all" in send
    for method in (
        WebSocketConnection._aclose,
        WebSocketConnection._handle_close_connection_event,
        WebSocketConnection._handle_message_event,
    ):
        source = inspect.getsource(method)
        assert source.index("self._close_reason = ") < source.index("await self._send("), method.__name__
    assert isinstance(inspect.getattr_static(WebSocketConnection, "closed"), property)
    # Only these methods write to the stream directly; a new one must be reviewed here.
    impl = inspect.getsource(trio_websocket._impl)
    assert impl.count("self._stream.send_all") == 1


async def test_check_compatible_and_direct_writer_on_a_real_connection(gateway, connect) -> None:
    client = await connect()
    await client.send("PING", {"t": 1})
    await client.expect("PONG")
    [conn] = list(gateway.connections)
    check_compatible(conn.ws)
    assert DirectWriter(conn.ws).enabled
    assert not DirectWriter(conn.ws, enabled=False).enabled


async def test_an_open_connection_keeps_nothing_of_its_handshake_and_still_works(gateway, connect) -> None:
    client = await connect()
    [conn] = list(gateway.connections)
    handshake = conn.ws._wsproto.handshake
    assert handshake._h11_connection is None  # shed at start (kaldrix.server._wire.shed_handshake)
    assert handshake._initiating_request is None
    assert not shed_handshake(conn.ws) or handshake._h11_connection is None
    await client.subscribe("blocks")
    await client.publish(block_event(1))
    (event,) = await client.events(1)
    assert event["offset"] == 1
    await client.send("PING", {"t": 2})
    await client.expect("PONG")
    await client.ws.aclose()
    with trio.fail_after(5):
        while gateway.connections:
            await trio.sleep(0.01)


async def test_direct_writes_stand_aside_for_a_write_in_progress_and_after_close(gateway, connect) -> None:
    client = await connect()
    await client.send("PING", {"t": 1})
    await client.expect("PONG")
    [conn] = list(gateway.connections)
    writer = DirectWriter(conn.ws)
    frame = text_frame(orjson.dumps({"type": "PING_ECHO", "payload": {}}))
    async with conn.ws._stream_lock:  # what trio-websocket holds while it sends a pong or a close
        assert writer.try_write(frame) == 0
    assert writer.try_write(frame) == len(frame)
    assert (await client.receive())["type"] == "PING_ECHO"
    await client.ws.aclose()
    with trio.fail_after(5):
        while conn.ws.closed is None:
            await trio.sleep(0.01)
    assert writer.try_write(frame) == 0


def test_trio_websocket_still_matches_pongs_through_its_pings_table() -> None:
    """Taskless pings (kaldrix.server._wire.expect_pong) rely on the reader setting the
    event registered under the pong's payload, and on the frame layout of a ping."""
    source = inspect.getsource(WebSocketConnection._handle_pong_event)
    assert "self._pings[payload]" in source and ".set()" in source
    assert ping_frame(b"\x00\x00\x00\x07") == b"\x89\x04\x00\x00\x00\x07"


def test_text_frame_lengths() -> None:
    for size in (0, 125, 126, 65535, 65536, 70000):
        frame = text_frame(b"x" * size)
        [(opcode, payload)], rest = split_frames(frame)
        assert opcode == OP_TEXT and payload == b"x" * size and rest == b""


async def _raw_subscriber(port: int, channel: str) -> tuple[trio.SocketStream, bytes]:
    """A subscriber with a tiny receive buffer, so the server's socket fills quickly."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", port))
    stream = trio.SocketStream(sock)
    await stream.send_all(handshake_request("127.0.0.1", port, "/ws"))
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        buffer += await stream.receive_some(4096)
    head, _, rest = buffer.partition(b"\r\n\r\n")
    assert b" 101 " in head.split(b"\r\n")[0]
    subscribe = {"type": "SUBSCRIBE", "id": "s1", "payload": {"channels": [channel]}}
    await stream.send_all(client_frame(orjson.dumps(subscribe)))
    while True:
        frames, rest = split_frames(rest)
        if any(orjson.loads(p).get("type") == "ACK" for _, p in frames):
            return stream, rest
        rest = b"".join(text_frame(p) for _, p in frames) + rest + await stream.receive_some(65536)


@pytest.mark.parametrize(
    ("direct_writes", "batch"),
    [(True, False), (True, True), (False, False)],
    ids=["direct-one-by-one", "direct-one-publish", "writer-task-only"],
)
async def test_frame_larger_than_the_socket_buffer_arrives_intact_and_in_order(
    start_gateway, nursery, direct_writes, batch
) -> None:
    gateway = await start_gateway(max_message_size=8 << 20, direct_writes=direct_writes)
    stream, rest = await _raw_subscriber(gateway.port, "blocks")
    producer = WireClient(await connect_websocket_url(nursery, gateway.url, max_message_size=16 << 20))
    await producer.expect("WELCOME")
    big = "s" * (3 << 20)  # far beyond the socket buffers on both sides
    events = [block_event(h) for h in range(1, 31)]
    events.insert(15, block_event(100, signature=big))
    # The subscriber reads nothing meanwhile: small frames go straight into the socket
    # until it is full, then queue behind it; the big one and what follows wait their turn.
    # As one PUBLISH, all of them are held during the router's batch and released in one
    # write, of which the socket takes only a part.
    if batch:
        ack = await producer.publish(*events)
        assert ack["type"] == "ACK", ack
    else:
        for event in events:
            ack = await producer.publish(event)
            assert ack["type"] == "ACK", ack
    received = []
    with trio.fail_after(10):
        while len(received) < len(events):
            frames, rest = split_frames(rest)
            received.extend(orjson.loads(payload) for _, payload in frames)
            if len(received) < len(events):
                rest += await stream.receive_some(1 << 20)
    assert [e["offset"] for e in received] == list(range(1, len(events) + 1))
    assert [e["payload"]["height"] for e in received] == [e["payload"]["height"] for e in events]
    assert received[15]["payload"]["signature"] == big
    assert gateway.metrics.slow_consumer_closes == 0
    await stream.aclose()
