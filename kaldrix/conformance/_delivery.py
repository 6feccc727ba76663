"""Delivery: order, offsets, routing, recovery, dedup, batches and unsubscribing.

Each scenario works on channels with random names, so that other traffic on the
server (a simulator, other clients) cannot disturb it. "Nothing else arrived" is
checked with a sentinel event published afterwards, never by waiting a while: the
server delivers a channel's events in order, so what is not there before the
sentinel will not come.
"""

from __future__ import annotations

from typing import Any

from ._checks import is_int, require, show
from ._context import Context
from ._events import node_event, tx_event, validator_event
from ._peer import Frame, Peer
from ._registry import SCENARIOS

ORDERED_EVENTS = 20
BATCH_SIZE = 5


def _single_result(ack: Frame, event: dict[str, Any]) -> dict[str, Any]:
    """The one per-event result of a PUBLISH ACK; its id is the event's when it had one."""
    results = ack.get("results")
    require(isinstance(results, list) and len(results) == 1, "the ACK of a single PUBLISH needs `results` with one entry", ack)
    result = results[0]
    require(isinstance(result, dict) and isinstance(result.get("offsets"), dict), "a PUBLISH result needs `offsets` (object)", ack)
    if "id" in event:
        require(result.get("id") == event["id"], f"the PUBLISH result must carry the event id {event['id']!r}", ack)
    return result


def _offset(ack: Frame, event: dict[str, Any], channel: str) -> int:
    offsets = _single_result(ack, event)["offsets"]
    require(is_int(offsets.get(channel)), f"the PUBLISH result must give the offset on {channel}", ack)
    return offsets[channel]


def _check_same(received: Frame, event: dict[str, Any], channel: str, who: str) -> None:
    """A delivered event is the published one: type, id, payload and channel."""
    require(received.get("channel") == channel, f"{who}: event delivered on the wrong channel", received)
    require(received["type"] == event["type"], f"{who}: delivered type differs from the published {event['type']}", received)
    if "id" in event:
        require(received["id"] == event["id"], f"{who}: delivered id differs from the published {event['id']!r}", received)
    require(
        received["payload"] == event["payload"],
        f"{who}: delivered payload differs from the published {show(event['payload'])}",
        received,
    )


async def _subscribe_position(peer: Peer, channel: str, since: dict[str, Any] | None = None) -> Frame:
    ack = await peer.subscribe(channel, since=since)
    positions = ack.get("channels")
    require(isinstance(positions, dict) and isinstance(positions.get(channel), dict), f"the ACK must give the position of {channel}", ack)
    return positions[channel]


@SCENARIOS.add("ordering-and-offsets")
async def ordering_and_offsets(ctx: Context) -> None:
    """Two subscribers get every event in order, with the same contiguous offsets, ids and payloads."""
    validator = ctx.fresh()
    channel = f"validator:{validator}"
    first = await ctx.connect(label="subscriber A")
    second = await ctx.connect(label="subscriber B")
    position = await _subscribe_position(first, channel)
    await _subscribe_position(second, channel)
    producer = await ctx.publisher()
    published = []
    for height in range(1, ORDERED_EVENTS + 1):
        event = validator_event(validator, height, event_id=ctx.new_id())
        ack = await ctx.publish(producer, {"event": event})
        published.append((event, _offset(ack, event, channel)))
    expected_offsets = list(range(position["offset"] + 1, position["offset"] + ORDERED_EVENTS + 1))
    acked_offsets = [offset for _, offset in published]
    require(acked_offsets == expected_offsets, f"PUBLISH ACK offsets must continue the SUBSCRIBE offset: {acked_offsets}")
    for peer in (first, second):
        received = await peer.events_on(channel, ORDERED_EVENTS)
        offsets = [frame["offset"] for frame in received]
        require(offsets == expected_offsets, f"{peer.label}: offsets must be {expected_offsets}, got {offsets}")
        for frame, (event, _) in zip(received, published, strict=True):
            _check_same(frame, event, channel, peer.label)
            require(frame["epoch"] == position["epoch"], f"{peer.label}: event epoch differs from the ACK's {position['epoch']!r}", frame)


@SCENARIOS.add("routing")
async def routing(ctx: Context) -> None:
    """TX_RECEIVED from a to b reaches `transactions`, `address:a` and `address:b`, not `address:c`."""
    a, b, c, d = (ctx.fresh() for _ in range(4))
    listeners = {name: await ctx.connect(label=f"subscriber of {name}") for name in ("transactions", f"address:{a}", f"address:{b}", f"address:{c}")}
    for name, peer in listeners.items():
        await _subscribe_position(peer, name)
    producer = await ctx.publisher()
    transfer = tx_event(ctx.fresh("tx-"), a, b, event_id=ctx.new_id())
    ack = await ctx.publish(producer, {"event": transfer})
    routed = set(_single_result(ack, transfer)["offsets"])
    wanted = {"transactions", f"address:{a}", f"address:{b}"}
    require(routed == wanted, f"TX_RECEIVED {a} -> {b} must be routed to exactly {sorted(wanted)}", ack)
    sentinel = tx_event(ctx.fresh("tx-"), c, d, event_id=ctx.new_id())
    await ctx.publish(producer, {"event": sentinel})
    tx_id = transfer["payload"]["txId"]
    found = await listeners["transactions"].event_on("transactions", lambda frame: frame["payload"].get("txId") == tx_id)
    _check_same(found, transfer, "transactions", "subscriber of transactions")
    for name in (f"address:{a}", f"address:{b}"):
        _check_same(await listeners[name].event_on(name), transfer, name, f"subscriber of {name}")
    bystander = await listeners[f"address:{c}"].event_on(f"address:{c}")
    require(
        bystander["id"] == sentinel["id"],
        f"address:{c} got an event of a transaction between {a} and {b}",
        bystander,
    )


@SCENARIOS.add("recovery-with-since")
async def recovery_with_since(ctx: Context) -> None:
    """SUBSCRIBE with `since` replays exactly the missed events, in order, after its ACK; then live ones."""
    node = ctx.fresh()
    channel = f"node:{node}"
    producer = await ctx.publisher()
    reader = await ctx.connect(label="first connection")
    position = await _subscribe_position(reader, channel)
    epoch = position["epoch"]
    for height in range(1, 4):
        await ctx.publish(producer, {"event": node_event(node, height, event_id=ctx.new_id())})
    seen = await reader.events_on(channel, 3)
    last = seen[-1]["offset"]
    await reader.close()
    missed = [node_event(node, height, event_id=ctx.new_id()) for height in range(4, 8)]
    for event in missed:
        await ctx.publish(producer, {"event": event})
    again = await ctx.connect(label="reconnected")
    since = {channel: {"offset": last, "epoch": epoch}}
    recovered = await _subscribe_position(again, channel, since=since)
    expected = {"offset": last + len(missed), "epoch": epoch, "recovered": True, "replayed": len(missed)}
    actual = {key: recovered.get(key) for key in expected}
    require(actual == expected, f"SUBSCRIBE since {show(since)} must answer {show(expected)}", recovered)
    early = again.kept_events(channel)
    require(not early, "replayed events must follow the ACK, not precede it", early[0] if early else None)
    replayed = await again.events_on(channel, len(missed))
    offsets = [frame["offset"] for frame in replayed]
    require(offsets == list(range(last + 1, last + len(missed) + 1)), f"replayed offsets must follow {last}: got {offsets}")
    for frame, event in zip(replayed, missed, strict=True):
        _check_same(frame, event, channel, "replay")
    live = node_event(node, 8, event_id=ctx.new_id())
    await ctx.publish(producer, {"event": live})
    after = await again.event_on(channel)
    _check_same(after, live, channel, "after the replay")
    require(after["offset"] == last + len(missed) + 1, "the live event must come right after the replayed ones", after)


@SCENARIOS.add("recovery-bogus-epoch")
async def recovery_bogus_epoch(ctx: Context) -> None:
    """SUBSCRIBE with `since` in an unknown epoch is not recovered: recovered false, replayed 0, nothing replayed."""
    node = ctx.fresh()
    channel = f"node:{node}"
    producer = await ctx.publisher()
    for height in range(1, 3):
        await ctx.publish(producer, {"event": node_event(node, height, event_id=ctx.new_id())})
    peer = await ctx.connect()
    bogus = "conformance-bogus-epoch"
    position = await _subscribe_position(peer, channel, since={channel: {"offset": 1, "epoch": bogus}})
    require(position.get("recovered") is False, "a bogus epoch cannot be recovered", position)
    require(position.get("replayed") == 0, "a bogus epoch replays nothing", position)
    require(position.get("epoch") != bogus, "the ACK must give the channel's real epoch", position)
    sentinel = node_event(node, 3, event_id=ctx.new_id())
    await ctx.publish(producer, {"event": sentinel})
    _check_same(await peer.event_on(channel), sentinel, channel, "after a refused recovery")


@SCENARIOS.add("dedup")
async def dedup(ctx: Context) -> None:
    """An event id published twice is acknowledged as a duplicate and delivered once."""
    validator = ctx.fresh()
    channel = f"validator:{validator}"
    subscriber = await ctx.connect(label="subscriber")
    await _subscribe_position(subscriber, channel)
    producer = await ctx.publisher()
    event = validator_event(validator, 1, event_id=ctx.new_id())
    first = _single_result(await ctx.publish(producer, {"event": event}), event)
    second = _single_result(await ctx.publish(producer, {"event": event}), event)
    require(not first.get("duplicate"), "the first PUBLISH of an id is not a duplicate", first)
    require(second.get("duplicate") is True, "the second PUBLISH of the same id must say duplicate: true", second)
    require(second.get("offsets") == first.get("offsets"), "a duplicate must report the original offsets", second)
    sentinel = validator_event(validator, 2, event_id=ctx.new_id())
    await ctx.publish(producer, {"event": sentinel})
    _check_same(await subscriber.event_on(channel), event, channel, "subscriber")
    _check_same(await subscriber.event_on(channel), sentinel, channel, "subscriber (the duplicate was delivered twice)")


@SCENARIOS.add("batch")
async def batch(ctx: Context) -> None:
    """PUBLISH {events: [...]} gets one ACK with the results in order and increasing offsets."""
    node = ctx.fresh()
    channel = ctx.fresh("node:")
    subscriber = await ctx.connect(label="subscriber")
    position = await _subscribe_position(subscriber, channel)
    producer = await ctx.publisher()
    events = [node_event(node, height, event_id=ctx.new_id()) for height in range(1, BATCH_SIZE + 1)]
    ack = await ctx.publish(producer, {"events": events, "channel": channel})
    results = ack.get("results")
    require(isinstance(results, list) and len(results) == BATCH_SIZE, f"the ACK of a batch of {BATCH_SIZE} needs {BATCH_SIZE} results", ack)
    require([r.get("id") for r in results] == [e["id"] for e in events], "batch results must follow the events' order", ack)
    expected = [{channel: position["offset"] + i} for i in range(1, BATCH_SIZE + 1)]
    require([r.get("offsets") for r in results] == expected, f"batch offsets on {channel} must be {expected}", ack)
    received = await subscriber.events_on(channel, BATCH_SIZE)
    for frame, event, offset in zip(received, events, expected, strict=True):
        _check_same(frame, event, channel, "subscriber")
        require(frame["offset"] == offset[channel], f"delivered offset must be {offset[channel]}", frame)


@SCENARIOS.add("unsubscribe")
async def unsubscribe(ctx: Context) -> None:
    """After UNSUBSCRIBE's ACK no event of that channel arrives; other subscriptions go on."""
    left, kept = ctx.fresh("node:"), ctx.fresh("node:")
    node = ctx.fresh()
    subscriber = await ctx.connect(label="subscriber")
    await subscriber.subscribe(left, kept)
    producer = await ctx.publisher()
    before = node_event(node, 1, event_id=ctx.new_id())
    await ctx.publish(producer, {"event": before, "channel": left})
    _check_same(await subscriber.event_on(left), before, left, "subscriber")
    message_id, reply = await subscriber.request("UNSUBSCRIBE", {"channels": [left]})
    require(reply["type"] == "ACK", f"UNSUBSCRIBE {message_id!r} was refused", reply)
    await ctx.publish(producer, {"event": node_event(node, 2, event_id=ctx.new_id()), "channel": left})
    sentinel = node_event(node, 3, event_id=ctx.new_id())
    await ctx.publish(producer, {"event": sentinel, "channel": kept})
    following = await subscriber.wait_for(lambda frame: frame.get("channel") in (left, kept), f"the sentinel on {kept}")
    require(following.get("channel") == kept, f"an event on {left} arrived after UNSUBSCRIBE was acknowledged", following)
    _check_same(following, sentinel, kept, "subscriber")
