"""The gateway end to end: real server on port 0, real WebSocket clients over loopback."""

from __future__ import annotations

import orjson
import trio
from trio_websocket import ConnectionClosed

from .conftest import block_event, tx_event


async def test_connect_gets_welcome(gateway, connect):
    client = await connect(welcome=False)
    welcome = await client.expect("WELCOME")
    payload = welcome["payload"]
    assert payload["protocolVersion"] == "1.0.0"
    assert payload["authenticated"] is False
    assert payload["heartbeatInterval"] == 20000
    assert payload["sessionId"]
    assert welcome["version"] == "1.0.0" and welcome["id"] and welcome["timestamp"].endswith("Z")


async def test_root_path_also_upgrades(gateway, connect):
    client = await connect(f"ws://127.0.0.1:{gateway.port}/")
    await client.send("PING", {"t": 7})
    assert (await client.expect("PONG"))["payload"]["t"] == 7


async def test_subscribe_ack_then_events_in_offset_order(connect):
    subscriber = await connect()
    producer = await connect()
    ack = await subscriber.subscribe("blocks")
    position = ack["payload"]["channels"]["blocks"]
    assert position["offset"] == 0 and position["epoch"] and position["recovered"] is False
    for height in range(1, 21):
        result = await producer.publish(block_event(height))
        assert result["type"] == "ACK"
        assert result["payload"]["results"][0]["offsets"] == {"blocks": height}
    events = await subscriber.events(20)
    assert [e["offset"] for e in events] == list(range(1, 21))
    assert [e["payload"]["height"] for e in events] == list(range(1, 21))
    assert {e["epoch"] for e in events} == {position["epoch"]}
    assert all(e["channel"] == "blocks" and e["type"] == "NEW_BLOCK" for e in events)


async def test_ack_carries_current_offset_of_a_busy_channel(connect):
    producer = await connect()
    for height in range(1, 4):
        await producer.publish(block_event(height))
    late = await connect()
    ack = await late.subscribe("blocks")
    assert ack["payload"]["channels"]["blocks"]["offset"] == 3


async def test_channels_are_isolated_and_address_channels_route_by_party(connect):
    blocks = await connect()
    alice = await connect()
    bob = await connect()
    await blocks.subscribe("blocks")
    await alice.subscribe("address:0xalice")
    await bob.subscribe("address:0xbob")
    producer = await connect()
    await producer.publish(tx_event("t1", "0xalice", "0xbob"))
    await producer.publish(tx_event("t2", "0xcarol", "0xalice"))
    await producer.publish(tx_event("t3", "0xcarol", "0xdave"))
    await producer.publish(block_event(1))
    alice_events = await alice.events(2)
    assert [e["payload"]["txId"] for e in alice_events] == ["t1", "t2"]
    bob_events = await bob.events(1)
    assert [e["payload"]["txId"] for e in bob_events] == ["t1"]
    block_events = await blocks.events(1)
    assert block_events[0]["type"] == "NEW_BLOCK"
    # Nothing else is pending for any of them.
    for client in (alice, bob, blocks):
        with trio.move_on_after(0.2) as scope:
            extra = await client.receive()
            raise AssertionError(f"unexpected frame {extra}")
        assert scope.cancelled_caught


async def test_every_subscriber_gets_each_event_exactly_once(connect):
    subscribers = [await connect() for _ in range(5)]
    for client in subscribers:
        await client.subscribe("blocks", "transactions")
    producer = await connect()
    event = block_event(42, validator="validator_1")
    ack = await producer.publish(event)
    for client in subscribers:
        (received,) = await client.events(1)
        assert received["payload"] == {**event["payload"], "transactions": []}
        with trio.move_on_after(0.2) as scope:
            await client.receive()
        assert scope.cancelled_caught, "the event was delivered twice"
    assert ack["payload"]["results"][0]["duplicate"] is False


async def test_event_id_repeated_is_acknowledged_not_broadcast_twice(connect):
    subscriber = await connect()
    await subscriber.subscribe("blocks")
    producer = await connect()
    event = {**block_event(7), "id": "block-7"}
    first = await producer.publish(event)
    second = await producer.publish(event)
    assert first["payload"]["results"][0] == {"id": "block-7", "offsets": {"blocks": 1}, "duplicate": False}
    assert second["payload"]["results"][0] == {"id": "block-7", "offsets": {"blocks": 1}, "duplicate": True}
    (only,) = await subscriber.events(1)
    assert only["id"] == "block-7"
    with trio.move_on_after(0.2) as scope:
        await subscriber.receive()
    assert scope.cancelled_caught


async def test_batch_publish_is_ordered_and_acknowledged_once(connect):
    subscriber = await connect()
    await subscriber.subscribe("blocks")
    producer = await connect()
    ack = await producer.publish(*[block_event(h) for h in range(1, 6)])
    assert [r["offsets"]["blocks"] for r in ack["payload"]["results"]] == [1, 2, 3, 4, 5]
    events = await subscriber.events(5)
    assert [e["payload"]["height"] for e in events] == [1, 2, 3, 4, 5]


async def test_channel_override_routes_to_that_channel_only(connect):
    blocks = await connect()
    await blocks.subscribe("blocks")
    custom = await connect()
    await custom.subscribe("node:archive-1")
    producer = await connect()
    ack = await producer.publish(block_event(1), channel="node:archive-1")
    assert ack["payload"]["results"][0]["offsets"] == {"node:archive-1": 1}
    (event,) = await custom.events(1)
    assert event["channel"] == "node:archive-1"
    with trio.move_on_after(0.2) as scope:
        await blocks.receive()
    assert scope.cancelled_caught


async def test_recovery_with_since_replays_exactly_what_was_missed(connect):
    producer = await connect()
    first = await connect()
    ack = await first.subscribe("blocks")
    epoch = ack["payload"]["channels"]["blocks"]["epoch"]
    for height in range(1, 4):
        await producer.publish(block_event(height))
    seen = await first.events(3)
    await first.ws.aclose()
    for height in range(4, 8):
        await producer.publish(block_event(height))
    again = await connect()
    ack = await again.subscribe("blocks", since={"blocks": {"offset": seen[-1]["offset"], "epoch": epoch}})
    position = ack["payload"]["channels"]["blocks"]
    assert position == {"offset": 7, "epoch": epoch, "recovered": True, "replayed": 4}
    await producer.publish(block_event(8))
    events = await again.events(5)
    assert [e["offset"] for e in events] == [4, 5, 6, 7, 8]


async def test_recovery_from_another_epoch_is_refused_explicitly(connect):
    producer = await connect()
    await producer.publish(block_event(1))
    client = await connect()
    ack = await client.subscribe("blocks", since={"blocks": {"offset": 0, "epoch": "not-this-one"}})
    position = ack["payload"]["channels"]["blocks"]
    assert position["recovered"] is False and position["replayed"] == 0 and position["offset"] == 1


async def test_recovery_beyond_history_is_refused(start_gateway, nursery):
    gateway = await start_gateway(history_size=3)
    from trio_websocket import connect_websocket_url

    from .conftest import WireClient

    async def open_client():
        client = WireClient(await connect_websocket_url(nursery, gateway.url))
        await client.expect("WELCOME")
        return client

    producer = await open_client()
    for height in range(1, 8):
        await producer.publish(block_event(height))
    client = await open_client()
    epoch = gateway.broker.position("blocks").epoch
    ack = await client.subscribe("blocks", since={"blocks": {"offset": 2, "epoch": epoch}})
    assert ack["payload"]["channels"]["blocks"]["recovered"] is False
    ack = await client.subscribe("blocks", since={"blocks": {"offset": 4, "epoch": epoch}})
    assert ack["payload"]["channels"]["blocks"] == {"offset": 7, "epoch": epoch, "recovered": True, "replayed": 3}
    assert [e["offset"] for e in await client.events(3)] == [5, 6, 7]


async def test_unsubscribe_stops_delivery(connect):
    client = await connect()
    producer = await connect()
    await client.subscribe("blocks")
    await producer.publish(block_event(1))
    await client.events(1)
    ack = await client.request("UNSUBSCRIBE", {"channels": ["blocks"]})
    assert ack["type"] == "ACK"
    await producer.publish(block_event(2))
    with trio.move_on_after(0.2) as scope:
        await client.receive()
    assert scope.cancelled_caught


async def test_client_vanishing_mid_stream_leaves_others_untouched(gateway, connect):
    honest = await connect()
    doomed = await connect()
    await honest.subscribe("blocks")
    await doomed.subscribe("blocks")
    producer = await connect()
    for height in range(1, 11):
        await producer.publish(block_event(height))
        if height == 5:
            await doomed.ws._stream.aclose()  # vanish without a close handshake
    events = await honest.events(10)
    assert [e["offset"] for e in events] == list(range(1, 11))
    with trio.fail_after(5):
        while gateway.router.subscriber_count("blocks") != 1:
            await trio.sleep(0.01)


async def test_ping_pong_carries_server_time(connect):
    client = await connect()
    ident = await client.send("PING", {"t": 123.5})
    pong = await client.expect("PONG")
    assert pong["payload"]["t"] == 123.5
    assert pong["payload"]["serverTime"].endswith("Z")
    assert ident


async def test_request_metrics_in_open_mode(connect):
    client = await connect()
    await client.send("REQUEST_METRICS", {"type": "all"})
    response = await client.expect("METRICS_RESPONSE")
    assert response["payload"]["type"] == "all"
    assert response["payload"]["metrics"]["connections"]["active"] >= 1


async def test_shutdown_closes_clients_with_1001(gateway, connect):
    client = await connect()
    await gateway.shutdown()
    try:
        with trio.fail_after(5):
            while True:
                await client.ws.get_message()
    except ConnectionClosed as exc:
        assert exc.reason.code == 1001


async def test_simulator_publishes_blocks(start_gateway, nursery):
    gateway = await start_gateway(simulate=True, sim_block_interval=0.05, sim_seed=1)
    from trio_websocket import connect_websocket_url

    from .conftest import WireClient

    client = WireClient(await connect_websocket_url(nursery, gateway.url))
    await client.expect("WELCOME")
    await client.subscribe("blocks")
    events = await client.events(3)
    heights = [e["payload"]["height"] for e in events]
    assert heights == list(range(heights[0], heights[0] + 3))
    assert events[1]["payload"]["previousHash"] == events[0]["payload"]["hash"]
    assert orjson.dumps(events[0])
