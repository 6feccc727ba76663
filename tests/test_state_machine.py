"""A hypothesis rule-based state machine over a live gateway.

Rules connect and disconnect clients (cleanly, abruptly, mid-frame), subscribe and
unsubscribe (with and without `since`, including a stale epoch and a position the stream
never reached), publish valid, invalid, batched and repeated events, reconnect clients
with `since`, and restart the server on the same broker. After every step each connected
client is synchronised (a PING whose PONG comes after everything queued before it) and
checked against a model of what it must have received: exactly the events published to
its channels after it joined, in offset order, each once; after a recovery, exactly what
it missed; every HEARTBEAT at the offset of the last event before it.

The same machine runs on two nodes sharing a Redis in tests/test_state_machine_redis.py:
clients connect to the nodes in turn (so a reconnect may land on the other node), a restart
restarts one node, and the model is unchanged, since the nodes share one stream per channel.

The gateway runs in a trio loop of its own thread and the rules drive it through
`trio.from_thread`, so hypothesis runs a real RuleBasedStateMachine (steps, shrinking,
the failing sequence printed as code) while the server runs undisturbed between steps.

CI runs a modest number of examples; ``HYPOTHESIS_PROFILE=nightly`` runs many more.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import attrs
import orjson
import trio
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from trio_websocket import ConnectionClosed, connect_websocket_url

from kaldrix.server import Gateway

from .conftest import WireClient, make_config

T = TypeVar("T")

NIGHTLY = os.environ.get("HYPOTHESIS_PROFILE") == "nightly"
MACHINE_SETTINGS = settings(
    max_examples=500 if NIGHTLY else 40,
    stateful_step_count=80 if NIGHTLY else 40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
STEP_TIMEOUT = 10.0
MAX_CLIENTS = 4
MAX_RESTARTS = 2
"""Per example: a restart ends every connection, so more would leave little else to see."""
CHANNELS = ["blocks", "dag", "alerts", "transactions", "address:0xa", "address:0xb"]
SERVER_CONFIG = {
    "channel_heartbeat": 0.05,  # heartbeats interleave with everything, and are checked too
    "handshake_rate_limit": 0,
    "max_connections_per_ip": 0,
    "message_rate": 0,
    "close_timeout": 0.5,
}
STAMP = "2025-08-07T10:00:00Z"


# -- the server, in its own thread ------------------------------------------------------------


class LiveGateway:
    """Gateways in a trio loop of its own thread; `call` runs a coroutine there.

    One gateway by default; with a shared broker (``broker=redis://...`` in `overrides`)
    several nodes that serve the same channels.
    """

    def __init__(self, nodes: int = 1, **overrides: Any) -> None:
        self.config = {**SERVER_CONFIG, **overrides}
        self.nodes = nodes
        self.gateways: list[Gateway] = []
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError(f"the gateway did not start: {self._failure!r}")

    def _main(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException as exc:  # noqa: BLE001 - reported by the next call
            self._failure = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            for _ in range(self.nodes):
                self.gateways.append(await nursery.start(Gateway(make_config(**self.config)).run))
            self._ready.set()

    def call(self, function: Callable[..., Awaitable[T]], *args: Any) -> T:
        async def bounded() -> T:
            with trio.fail_after(STEP_TIMEOUT):
                return await function(*args)

        return trio.from_thread.run(bounded, trio_token=self._token)

    async def restart(self, node: int) -> None:
        """Stop a gateway with 1012 and start a new one on the same port and broker."""
        old = self.gateways[node]
        await old.shutdown(1012, "server restarting")
        config = make_config(**self.config, port=old.port)
        self.gateways[node] = await self.nursery.start(Gateway(config, broker=old.broker).run)

    async def settle(self, offsets: dict[str, int]) -> None:
        """Wait until every node that follows these channels delivered them up to `offsets`:
        through a shared broker, the other nodes get an event a moment after the ACK."""
        while any(
            (position := gateway.router.position(name)) is not None and position.offset < offset
            for gateway in self.gateways
            for name, offset in offsets.items()
        ):
            await trio.sleep(0.001)

    def close(self) -> None:
        try:
            trio.from_thread.run_sync(self.nursery.cancel_scope.cancel, trio_token=self._token)
        except trio.RunFinishedError:
            pass
        self._thread.join(10)


# -- the model ------------------------------------------------------------------------------------


@attrs.define
class Client:
    """One client as the model sees it."""

    name: int
    wire: WireClient | None = None
    node: int = 0
    """The gateway its connection is on."""
    subscribed: set[str] = attrs.Factory(set)
    last: dict[str, int] = attrs.Factory(dict)
    """The last offset the client processed per channel (kept across disconnects)."""
    epochs: dict[str, str] = attrs.Factory(dict)
    pending: dict[str, list[int]] = attrs.Factory(dict)
    """Offsets it must still receive per channel, in order."""


_ids = itertools.count(1)


def _block(valid: bool = True) -> dict[str, Any]:
    height = next(_ids)
    payload = {"blockId": f"b{height}", "height": height if valid else str(height), "timestamp": STAMP}
    return {"type": "NEW_BLOCK", "id": f"blk-{height}", "payload": payload}


def _tx(sender: str, receiver: str, valid: bool = True) -> dict[str, Any]:
    number = next(_ids)
    payload = {"txId": f"t{number}", "from": sender, "to": receiver, "amount": "1" if valid else "-1",
               "status": "pending", "timestamp": STAMP}
    return {"type": "TX_RECEIVED", "id": f"tx-{number}", "payload": payload}


def _dag() -> dict[str, Any]:
    number = next(_ids)
    return {"type": "DAG_UPDATE", "id": f"dag-{number}",
            "payload": {"updateType": "NODE_ADDED", "nodeId": f"n{number}", "timestamp": STAMP}}


def _routes(event: dict[str, Any], override: str | None) -> list[str]:
    if override is not None:
        return [override]
    payload = event["payload"]
    match event["type"]:
        case "NEW_BLOCK":
            return ["blocks"]
        case "DAG_UPDATE":
            return ["dag"]
        case "TX_RECEIVED":
            return list(dict.fromkeys(["transactions", f"address:{payload['from']}", f"address:{payload['to']}"]))
    raise AssertionError(event)


EVENT_KINDS = ["block", "dag", "tx-a-b", "tx-b-c", "block-to-alerts"]


def _make(kind: str) -> tuple[dict[str, Any], str | None]:
    match kind:
        case "block":
            return _block(), None
        case "dag":
            return _dag(), None
        case "tx-a-b":
            return _tx("0xa", "0xb"), None
        case "tx-b-c":
            return _tx("0xb", "0xc"), None
        case "block-to-alerts":
            return _block(), "alerts"
    raise AssertionError(kind)


class GatewayMachine(RuleBasedStateMachine):
    """The model: one stream per channel, whichever node a client is on (connections go
    to the nodes in turn)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.start_gateways()
        self.opened = itertools.count()
        self.log: dict[str, list[str]] = {}
        """Per channel, the ids of the events published on it; offset = index + 1."""
        self.published: dict[str, dict[str, int]] = {}
        """Event id -> the offsets it got (for duplicate publishes)."""
        self.clients: list[Client] = []
        self.restarts = 0

    def teardown(self) -> None:
        async def drop_clients() -> None:
            # Without a peer to answer its close frames, the server would wait out
            # close_timeout for each connection when it stops.
            for client in self.connected:
                await client.wire.ws._stream.aclose()
            while any(gateway.connections for gateway in self.live.gateways):
                await trio.sleep(0.001)

        try:
            self.call(drop_clients)
        finally:
            self.live.close()

    def start_gateways(self) -> LiveGateway:
        return LiveGateway()

    # -- helpers -----------------------------------------------------------------------------

    @property
    def connected(self) -> list[Client]:
        return [client for client in self.clients if client.wire is not None]

    @property
    def away(self) -> list[Client]:
        return [client for client in self.clients if client.wire is None]

    def offset(self, channel: str) -> int:
        return len(self.log.get(channel, ()))

    def call(self, function: Callable[..., Awaitable[T]], *args: Any) -> T:
        return self.live.call(function, *args)

    def _open(self, client: Client) -> None:
        client.node = next(self.opened) % len(self.live.gateways)
        client.wire = self.call(self._handshake, self.live.gateways[client.node].url)

    async def _handshake(self, url: str) -> WireClient:
        wire = WireClient(await connect_websocket_url(self.live.nursery, url))
        await wire.expect("WELCOME")
        return wire

    def _subscribe(self, client: Client, channels: list[str], since: dict[str, dict[str, Any]] | None) -> None:
        assert client.wire is not None
        payload: dict[str, Any] = {"channels": channels}
        if since:
            payload["since"] = since
        ack = self.call(client.wire.request, "SUBSCRIBE", payload)
        assert ack["type"] == "ACK", ack
        positions = ack["payload"]["channels"]
        assert list(positions) == channels
        for name in channels:
            position, current = positions[name], self.offset(name)
            assert position["offset"] == current, (name, position)
            asked = (since or {}).get(name)
            # Recoverable: the same epoch, within the stream (history is never trimmed here).
            recoverable = asked is not None and asked["epoch"] == client.epochs.get(name) and asked["offset"] <= current
            if name in client.epochs and asked is not None and asked["epoch"] == client.epochs[name]:
                assert position["epoch"] == client.epochs[name]  # the broker outlives restarts
            assert position["recovered"] is recoverable, (name, asked, position)
            replayed = list(range(asked["offset"] + 1, current + 1)) if recoverable else []
            assert position["replayed"] == len(replayed), (name, position)
            client.epochs[name] = position["epoch"]
            client.pending.setdefault(name, []).extend(replayed)
            if not replayed:
                client.last[name] = current
            client.subscribed.add(name)

    async def _sync(self, client: Client) -> None:
        """Read everything sent before a PING's PONG and check it against the model."""
        wire = client.wire
        assert wire is not None
        ping = await wire.send("PING", {"t": client.name})
        while True:
            message = await wire.receive()
            if message["type"] == "PONG" and message["payload"].get("ref") == ping:
                return
            if "channel" in message:
                self._check_event(client, message)
            elif message["type"] == "HEARTBEAT":
                self._check_heartbeat(client, message["payload"])
            else:
                raise AssertionError(f"client {client.name} got an unexpected message: {message}")

    def _check_event(self, client: Client, event: dict[str, Any]) -> None:
        name, offset = event["channel"], event["offset"]
        expected = client.pending.get(name) or [None]
        assert offset == expected[0], f"client {client.name} on {name}: got offset {offset}, expected {expected}"
        client.pending[name].pop(0)
        assert event["id"] == self.log[name][offset - 1], (name, offset)
        assert event["epoch"] == client.epochs[name]
        client.last[name] = offset

    def _check_heartbeat(self, client: Client, beat: dict[str, Any]) -> None:
        name = beat["channel"]
        # Every event up to a heartbeat's offset came before it. (One may precede the ACK of
        # an UNSUBSCRIBE of its channel; it is still checked.)
        assert beat["offset"] == client.last.get(name), (client.name, beat, client.last)
        assert beat["epoch"] == client.epochs[name]

    async def _closed_with(self, wire: WireClient) -> int | None:
        while True:
            try:
                message = orjson.loads(await wire.ws.get_message())
            except ConnectionClosed as exc:
                return None if exc.reason is None else exc.reason.code
            assert message["type"] == "HEARTBEAT", message

    def _deliver(self, offsets: dict[str, int]) -> None:
        for client in self.connected:
            for name, offset in offsets.items():
                if name in client.subscribed:
                    client.pending.setdefault(name, []).append(offset)

    def _gone(self, client: Client) -> None:
        client.wire = None
        client.pending.clear()  # what was on its way is recovered with `since`, or not at all

    # -- rules --------------------------------------------------------------------------------

    @precondition(lambda self: len(self.clients) < MAX_CLIENTS)  # then `reconnect` brings them back
    @rule(channels=st.lists(st.sampled_from(CHANNELS), max_size=3, unique=True))
    def connect(self, channels: list[str]) -> None:
        client = Client(name=len(self.clients))
        self._open(client)
        self.clients.append(client)
        if channels:
            self._subscribe(client, channels, None)

    @precondition(lambda self: self.connected)
    @rule(pick=st.integers(0, 99), channels=st.lists(st.sampled_from(CHANNELS), min_size=1, max_size=3, unique=True),
          how=st.sampled_from(["plain", "since", "stale-epoch", "beyond"]))
    def subscribe(self, pick: int, channels: list[str], how: str) -> None:
        client = self.connected[pick % len(self.connected)]
        since = None
        if how != "plain":
            since = {}
            for name in channels:
                if name not in client.last:
                    continue
                offset, epoch = client.last[name], client.epochs[name]
                if how == "stale-epoch":
                    epoch = "not-this-epoch"
                elif how == "beyond":
                    offset = self.offset(name) + 3
                since[name] = {"offset": offset, "epoch": epoch}
        self._subscribe(client, channels, since)

    @precondition(lambda self: any(client.subscribed for client in self.connected))
    @rule(pick=st.integers(0, 99), data=st.data())
    def unsubscribe(self, pick: int, data: st.DataObject) -> None:
        holders = [client for client in self.connected if client.subscribed]
        client = holders[pick % len(holders)]
        channels = data.draw(st.lists(st.sampled_from(sorted(client.subscribed)), min_size=1, unique=True))
        ack = self.call(client.wire.request, "UNSUBSCRIBE", {"channels": channels})
        assert ack["type"] == "ACK", ack
        client.subscribed.difference_update(channels)

    @precondition(lambda self: self.connected)
    @rule(pick=st.integers(0, 99), kinds=st.lists(st.sampled_from(EVENT_KINDS), min_size=1, max_size=3))
    def publish(self, pick: int, kinds: list[str]) -> None:
        producer = self.connected[pick % len(self.connected)]
        made = [_make(kind) for kind in kinds]
        overrides = {override for _, override in made}
        if len(made) > 1 and len(overrides) > 1:
            made = [made[0]]  # a batch shares one channel override
        self._publish(producer, [event for event, _ in made], made[0][1])

    def _publish(self, producer: Client, events: list[dict[str, Any]], override: str | None) -> None:
        assert producer.wire is not None
        payload: dict[str, Any] = {"event": events[0]} if len(events) == 1 else {"events": events}
        if override is not None:
            payload["channel"] = override
        ack = self.call(producer.wire.request, "PUBLISH", payload)
        assert ack["type"] == "ACK", ack
        results = ack["payload"]["results"]
        assert [result["id"] for result in results] == [event["id"] for event in events]
        for event, result in zip(events, results, strict=True):
            expected = {}
            for name in _routes(event, override):
                self.log.setdefault(name, []).append(event["id"])
                expected[name] = self.offset(name)
            assert result == {"id": event["id"], "offsets": expected, "duplicate": False}
            self.published[event["id"]] = expected
            self._deliver(expected)
            if len(self.live.gateways) > 1:
                self.call(self.live.settle, expected)

    @precondition(lambda self: len(self.connected) >= 2 and any(client.subscribed for client in self.connected))
    @rule(pick=st.integers(0, 99), how=st.sampled_from(["close", "drop", "mid-frame"]), count=st.integers(1, 3))
    def miss_events_while_away(self, pick: int, how: str, count: int) -> None:
        """A subscriber leaves and events go to its channels while it is away (so that a
        later `reconnect` has something to recover)."""
        holders = [client for client in self.connected if client.subscribed]
        client = holders[pick % len(holders)]
        self._leave(client, how)
        producer = self.connected[pick % len(self.connected)]
        wanted = sorted(client.subscribed)
        for number in range(count):
            name = wanted[number % len(wanted)]
            kind = {"blocks": "block", "dag": "dag", "alerts": "block-to-alerts"}.get(name, "tx-a-b")
            event, override = _make(kind)
            self._publish(producer, [event], override)

    @precondition(lambda self: self.connected and self.published)
    @rule(pick=st.integers(0, 99), which=st.integers(0, 999))
    def publish_again(self, pick: int, which: int) -> None:
        producer = self.connected[pick % len(self.connected)]
        event_id = sorted(self.published)[which % len(self.published)]
        event = _block()
        event["id"] = event_id  # a retry: same id, whatever the payload
        ack = self.call(producer.wire.request, "PUBLISH", {"event": event})
        assert ack["payload"]["results"] == [{"id": event_id, "offsets": self.published[event_id], "duplicate": True}]

    @precondition(lambda self: self.connected)
    @rule(pick=st.integers(0, 99), kind=st.sampled_from(["bad-height", "bad-amount", "bad-in-batch", "unknown-channel"]))
    def publish_invalid(self, pick: int, kind: str) -> None:
        producer = self.connected[pick % len(self.connected)]
        match kind:
            case "bad-height":
                payload, code = {"event": _block(valid=False)}, "INVALID_PAYLOAD"
            case "bad-amount":
                payload, code = {"event": _tx("0xa", "0xb", valid=False)}, "INVALID_PAYLOAD"
            case "bad-in-batch":  # one bad event refuses the whole batch
                payload, code = {"events": [_block(), _block(valid=False)]}, "INVALID_PAYLOAD"
            case _:
                payload, code = {"event": _block(), "channel": "nowhere"}, "INVALID_CHANNEL"
        reply = self.call(producer.wire.request, "PUBLISH", payload)
        assert (reply["type"], reply["payload"]["code"]) == ("ERROR", code), reply

    @precondition(lambda self: self.connected)
    @rule(pick=st.integers(0, 99), how=st.sampled_from(["close", "drop", "mid-frame"]))
    def disconnect(self, pick: int, how: str) -> None:
        self._leave(self.connected[pick % len(self.connected)], how)

    def _leave(self, client: Client, how: str) -> None:
        wire = client.wire
        assert wire is not None

        async def leave() -> None:
            if how == "close":
                await wire.ws.aclose()
            elif how == "drop":
                await wire.ws._stream.aclose()  # no close frame: the network just ends
            else:
                await wire.ws._stream.send_all(bytes([0x81, 0xFE, 0x02, 0x00, 1, 2, 3, 4]) + b"{\"ty")
                await wire.ws._stream.aclose()

        self.call(leave)
        self._gone(client)

    @precondition(lambda self: self.away)
    @rule(pick=st.integers(0, 99))
    def reconnect(self, pick: int) -> None:
        client = self.away[pick % len(self.away)]
        self._open(client)
        channels = sorted(client.subscribed)
        client.subscribed = set()
        if not channels:
            return
        since = {name: {"offset": client.last[name], "epoch": client.epochs[name]} for name in channels}
        self._subscribe(client, channels, since)
        for name in channels:  # a recovered subscriber has no gap: it gets exactly what it missed
            assert client.pending.get(name, []) == list(range(client.last[name] + 1, self.offset(name) + 1))

    @precondition(lambda self: self.clients and self.restarts < MAX_RESTARTS)
    @rule(pick=st.integers(0, 99))
    def restart_server(self, pick: int) -> None:
        self.restarts += 1
        node = pick % len(self.live.gateways)
        connected = [client for client in self.connected if client.node == node]

        async def restart() -> list[int | None]:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.live.restart, node)
                codes = [await self._closed_with(client.wire) for client in connected]
            return codes

        assert self.call(restart) == [1012] * len(connected)
        for client in connected:
            self._gone(client)

    # -- the check after every step -------------------------------------------------------------

    @invariant()
    def every_client_got_exactly_what_the_model_expects(self) -> None:
        for client in self.connected:
            self.call(self._sync, client)
            assert all(not offsets for offsets in client.pending.values()), (client.name, client.pending)


def test_the_gateway_keeps_its_delivery_promises_under_any_sequence_of_steps() -> None:
    run_state_machine_as_test(GatewayMachine, settings=MACHINE_SETTINGS)
