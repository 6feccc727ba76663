"""A hostile or broken client gets clear errors and never hurts anyone else."""

from __future__ import annotations

import json

import orjson
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed, connect_websocket_url
from wsproto.events import TextMessage

from kaldrix.server import Gateway

from .conftest import WireClient, block_event, make_config, raw_websocket


async def _still_serves(client, subscriber, producer, height: int) -> None:
    """The abused connection still answers PING; the honest subscriber still gets events."""
    ping_id = await client.send("PING", {"t": height})
    while True:
        message = await client.receive()
        if message["type"] == "PONG" and message["payload"].get("ref") == ping_id:
            assert message["payload"]["t"] == height
            break
    await producer.publish(block_event(height))
    (event,) = await subscriber.events(1)
    assert event["payload"]["height"] == height


async def test_malformed_json_gets_invalid_json(connect):
    client = await connect()
    await client.send_raw('{"type": "PING", ')
    error = await client.expect("ERROR")
    assert error["payload"]["code"] == "INVALID_JSON"


async def test_non_object_gets_invalid_message(connect):
    client = await connect()
    for raw in ("[1,2]", "42", '"PING"', "null"):
        await client.send_raw(raw)
        error = await client.expect("ERROR")
        assert error["payload"]["code"] == "INVALID_MESSAGE", raw


async def test_unknown_type_names_the_field(connect):
    client = await connect()
    await client.send("LAUNCH_ROCKET", {}, message_id="x1")
    error = await client.expect("ERROR")
    assert error["payload"] == {**error["payload"], "code": "UNKNOWN_TYPE", "path": "type", "ref": "x1"}


async def test_mistyped_field_gets_its_path(connect):
    client = await connect()
    bad = block_event(1)
    bad["payload"]["height"] = "one"
    reply = await client.request("PUBLISH", {"event": bad})
    assert reply["type"] == "ERROR"
    assert reply["payload"]["code"] == "INVALID_PAYLOAD"
    assert reply["payload"]["path"] == "payload.event.payload.height"
    assert reply["payload"]["message"] == "expected an integer"


async def test_missing_field_gets_its_path(connect):
    client = await connect()
    reply = await client.request("PUBLISH", {"events": [block_event(1), {"type": "DAG_UPDATE", "payload": {"nodeId": "n"}}]})
    assert reply["payload"]["code"] == "INVALID_PAYLOAD"
    assert reply["payload"]["path"].startswith("payload.events[1].payload.")
    assert reply["payload"]["message"] == "required field missing"


async def test_invalid_channel_names_its_index(connect):
    client = await connect()
    reply = await client.request("SUBSCRIBE", {"channels": ["blocks", "no such channel"]})
    assert reply["payload"]["code"] == "INVALID_CHANNEL"
    assert reply["payload"]["path"] == "payload.channels[1]"


async def test_binary_frame_is_refused(connect):
    client = await connect()
    await client.send_raw(b'{"type":"PING","payload":{}}')
    error = await client.expect("ERROR")
    assert error["payload"]["code"] == "INVALID_MESSAGE"
    assert "binary" in error["payload"]["message"]


async def test_private_channel_of_someone_else_is_forbidden(connect):
    client = await connect()
    reply = await client.request("SUBSCRIBE", {"channels": ["user:alice"]})
    assert reply["payload"]["code"] == "FORBIDDEN"
    assert reply["payload"]["path"] == "payload.channels[0]"


async def test_too_many_channels_is_limit_exceeded(start_gateway, nursery):
    gateway = await start_gateway(max_channels_per_connection=3)
    client = WireClient(await connect_websocket_url(nursery, gateway.url))
    await client.expect("WELCOME")
    reply = await client.request("SUBSCRIBE", {"channels": ["blocks", "dag", "nodes", "alerts"]})
    assert reply["payload"]["code"] == "LIMIT_EXCEEDED"
    assert gateway.router.subscriber_count() == 0


async def test_oversized_frame_closes_with_1009_and_others_carry_on(start_gateway, nursery):
    gateway = await start_gateway(max_message_size=1024)
    async def open_client():
        client = WireClient(await connect_websocket_url(nursery, gateway.url))
        await client.expect("WELCOME")
        return client

    big, subscriber, producer = await open_client(), await open_client(), await open_client()
    await subscriber.subscribe("blocks")
    await big.send("PING", {"t": "x" * 5000})
    try:
        with trio.fail_after(5):
            while True:
                await big.ws.get_message()
    except ConnectionClosed as exc:
        assert exc.reason.code == 1009
    await producer.publish(block_event(1))
    assert (await subscriber.events(1))[0]["payload"]["height"] == 1


async def test_errors_do_not_close_the_connection(connect):
    client = await connect()
    subscriber = await connect()
    producer = await connect()
    await subscriber.subscribe("blocks")
    for raw in ("nope", "{}", '{"type":"SUBSCRIBE","payload":{"channels":"blocks"}}', b"\x00\xff"):
        await client.send_raw(raw)
        assert (await client.expect("ERROR"))["payload"]["code"]
    await _still_serves(client, subscriber, producer, 1)


async def test_slow_consumer_is_closed_with_4008_and_others_get_everything(start_gateway, nursery):
    gateway = await start_gateway(outbox_size=16)
    stream, ws = await raw_websocket(gateway.port)
    subscribe = {"type": "SUBSCRIBE", "id": "s", "payload": {"channels": ["blocks"]}}
    await stream.send_all(ws.send(TextMessage(orjson.dumps(subscribe).decode())))
    honest = WireClient(await connect_websocket_url(nursery, gateway.url))
    await honest.expect("WELCOME")
    await honest.subscribe("blocks")
    producer = WireClient(await connect_websocket_url(nursery, gateway.url))
    await producer.expect("WELCOME")
    with trio.fail_after(5):
        while gateway.router.subscriber_count("blocks") < 2:
            await trio.sleep(0.01)
    padding = "p" * 20_000  # large events fill the slow reader's socket buffers quickly
    total = 400
    received = []

    async def read_honestly():
        received.extend(await honest.events(total, timeout=20))

    async with trio.open_nursery() as readers:
        readers.start_soon(read_honestly)
        for height in range(1, total + 1):
            await producer.publish(block_event(height, signature=padding))
    assert [e["payload"]["height"] for e in received] == list(range(1, total + 1))
    assert gateway.metrics.slow_consumer_closes == 1
    assert gateway.router.subscriber_count("blocks") == 1
    await stream.aclose()


async def test_handshake_that_never_completes_is_dropped(start_gateway):
    gateway = await start_gateway(handshake_timeout=0.3)
    stream = await trio.open_tcp_stream("127.0.0.1", gateway.port)
    await stream.send_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
    with trio.fail_after(3):
        assert await stream.receive_some(1024) == b""


async def test_garbage_instead_of_http_gets_400(gateway):
    stream = await trio.open_tcp_stream("127.0.0.1", gateway.port)
    await stream.send_all(b"\x16\x03\x01 hello tls?\r\n\r\n")
    with trio.fail_after(3):
        response = await stream.receive_some(4096)
    assert response.startswith(b"HTTP/1.1 400")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
command_like = st.fixed_dictionaries(
    {"type": st.sampled_from(["SUBSCRIBE", "UNSUBSCRIBE", "PUBLISH", "PING", "AUTH", "REQUEST_METRICS", "X"]), "payload": json_values},
    optional={"id": json_values, "version": json_values, "timestamp": json_values},
)
frames = st.one_of(
    json_values.map(json.dumps),
    command_like.map(json.dumps),
    st.binary(max_size=64),
    st.text(max_size=64),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.lists(frames, min_size=1, max_size=8))
async def test_arbitrary_frames_never_break_the_server(batch):
    # Each example runs in its own trio run, so it starts its own gateway.
    async with trio.open_nursery() as nursery:
        gateway = Gateway(make_config(close_timeout=0.05))
        await nursery.start(gateway.run)

        async def open_client():
            client = WireClient(await connect_websocket_url(nursery, gateway.url))
            await client.expect("WELCOME")
            return client

        fuzzer, subscriber, producer = await open_client(), await open_client(), await open_client()
        await subscriber.subscribe("blocks")
        for frame in batch:
            await fuzzer.send_raw(frame)
        await _still_serves(fuzzer, subscriber, producer, 1)
        nursery.cancel_scope.cancel()
