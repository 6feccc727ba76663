"""Scale-out: several gateways on one Redis serve one ordered stream per channel.

Everything is real: a redis-server (tests/redis_support), gateways on their own ports and
WebSocket clients over loopback. Tests share one Redis per module, each under its own key
prefix; the tests that kill or stop Redis get a private one.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import orjson
import pytest
import trio
from trio_websocket import connect_websocket_url

from kaldrix.client import Gap, open_client
from kaldrix.server import Gateway

from .conftest import WireClient, block_event, make_config, tx_event
from .redis_support import RedisServer, running_redis
from .web_support import http_get

BROKER_TIMEOUT = 0.5
"""The outage tests' broker_timeout: how long a command may wait for Redis."""
FAST = {"reconnect_interval": 0.02, "max_reconnect_delay": 0.1, "connect_timeout": 2.0}


@pytest.fixture
def private_redis(tmp_path: Path) -> Any:
    with running_redis(tmp_path) as server:
        yield server


QUICK = {"broker_reconnect_max": 0.2, "broker_keepalive": 1.0}
"""Reconnect within a fifth of a second (not backing off up to 5 s) and check a quiet live
link every second (not every 5 s), so the outage tests stay short."""


@attrs.define
class Cluster:
    """Gateways sharing one Redis under one key prefix, started in the test's nursery."""

    nursery: trio.Nursery
    redis: RedisServer
    prefix: str = attrs.Factory(lambda: f"kx-scale-{uuid.uuid4().hex[:10]}")

    async def node(self, *, quick: bool = False, **overrides: Any) -> Gateway:
        overrides.setdefault("close_timeout", 0.3)  # the test's end closes clients that do not answer
        overrides.setdefault("broker", self.redis.url)
        if quick:
            overrides = {**QUICK, **overrides}
        gateway = Gateway(make_config(redis_prefix=self.prefix, **overrides))
        await self.nursery.start(gateway.run)
        return gateway

    async def connect(self, gateway: Gateway | int) -> WireClient:
        port = gateway if isinstance(gateway, int) else gateway.port
        wire = WireClient(await connect_websocket_url(self.nursery, f"ws://127.0.0.1:{port}/ws"))
        await wire.expect("WELCOME")
        return wire


@pytest.fixture
def cluster(nursery: trio.Nursery, redis_server: RedisServer) -> Cluster:
    return Cluster(nursery, redis_server)


@pytest.fixture
def private_cluster(nursery: trio.Nursery, private_redis: RedisServer) -> Cluster:
    return Cluster(nursery, private_redis)


def block(**extra: Any) -> dict[str, Any]:
    """A NEW_BLOCK with an id of its own (so it can be deduplicated and told apart)."""
    return {**block_event(**extra), "id": f"blk-{uuid.uuid4().hex[:12]}"}


def event_key(frame: dict[str, Any]) -> tuple[int, str, str]:
    return frame["offset"], frame["epoch"], frame["id"]


async def publish_ok(producer: WireClient, event: dict[str, Any]) -> dict[str, Any]:
    """Publish one event; its result (offsets, duplicate) from the ACK."""
    ack = await producer.publish(event)
    assert ack["type"] == "ACK", ack
    (result,) = ack["payload"]["results"]
    assert result["id"] == event["id"]
    return result


async def frames_until(wire: WireClient, done: Callable[[list[dict[str, Any]]], bool], timeout: float = 5.0) -> list[dict[str, Any]]:
    """Every frame the client receives until `done(frames)` holds."""
    frames: list[dict[str, Any]] = []
    with trio.fail_after(timeout):
        while not done(frames):
            frames.append(await wire.receive(timeout))
    return frames


def count_events(count: int) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda frames: sum("channel" in frame for frame in frames) >= count


async def settled(wire: WireClient) -> list[dict[str, Any]]:
    """What else arrives before the answer to a PING sent a little later: a stray
    (repeated) delivery would show up here."""
    await trio.sleep(0.2)
    ping = await wire.send("PING", {})
    extra = []
    while True:
        frame = await wire.receive()
        if frame["type"] == "PONG" and frame["payload"].get("ref") == ping:
            return extra
        extra.append(frame)


async def ping_answered(wire: WireClient) -> None:
    ping = await wire.send("PING", {})
    with trio.fail_after(5):
        while True:
            frame = await wire.receive()
            if frame["type"] == "PONG":
                assert frame["payload"].get("ref") == ping, frame
                return
            wire.backlog.append(frame)
            if len(wire.backlog) > 1000:
                raise AssertionError("no PONG")


async def readiness(gateway: Gateway) -> tuple[int, dict[str, Any]]:
    status, _, body = await http_get(gateway.port, "/readyz")
    return status, orjson.loads(body)


async def wait_readiness(gateway: Gateway, status: int, timeout: float) -> dict[str, Any]:
    """Poll /readyz until it answers `status`, at most `timeout` seconds."""
    with trio.fail_after(timeout):
        while True:
            code, body = await readiness(gateway)
            if code == status:
                return body
            await trio.sleep(0.05)


# -- two nodes, one stream -------------------------------------------------------------------


async def test_two_nodes_deliver_one_stream_with_the_same_offsets(cluster: Cluster) -> None:
    with trio.fail_after(20):
        a, b = await cluster.node(), await cluster.node()
        on_a, on_b = await cluster.connect(a), await cluster.connect(b)
        producer_a, producer_b = await cluster.connect(a), await cluster.connect(b)
        position_a = (await on_a.subscribe("blocks"))["payload"]["channels"]["blocks"]
        position_b = (await on_b.subscribe("blocks"))["payload"]["channels"]["blocks"]
        epoch = position_a["epoch"]
        assert position_a == position_b == {"offset": 0, "epoch": epoch, "recovered": False, "replayed": 0}

        # Published on B, seen on A with the offset and epoch B's subscriber sees.
        first = block()
        assert await publish_ok(producer_b, first) == {"id": first["id"], "offsets": {"blocks": 1}, "duplicate": False}
        (seen_a,), (seen_b,) = await on_a.events(1), await on_b.events(1)
        assert event_key(seen_a) == event_key(seen_b) == (1, epoch, first["id"])
        assert seen_a == seen_b  # the same frame on every node

        # Alternately on A and B: one gap-free order, the same on both nodes.
        published = [first]
        for number in range(10):
            event = block()
            producer = producer_a if number % 2 == 0 else producer_b
            assert (await publish_ok(producer, event))["offsets"] == {"blocks": number + 2}
            published.append(event)
        got_a, got_b = await on_a.events(10), await on_b.events(10)
        assert got_a == got_b
        assert [event_key(frame) for frame in got_a] == [(n + 2, epoch, published[n + 1]["id"]) for n in range(10)]

        # A retry of an event id on the other node is a duplicate with the first offsets.
        repeated = block()
        assert await publish_ok(producer_a, repeated) == {"id": repeated["id"], "offsets": {"blocks": 12}, "duplicate": False}
        again = {**block(), "id": repeated["id"]}
        assert await publish_ok(producer_b, again) == {"id": repeated["id"], "offsets": {"blocks": 12}, "duplicate": True}
        after = block()
        assert (await publish_ok(producer_b, after))["offsets"] == {"blocks": 13}
        for subscriber in (on_a, on_b):
            got = await subscriber.events(2)
            assert [event_key(frame) for frame in got] == [(12, epoch, repeated["id"]), (13, epoch, after["id"])]
            assert got[0]["payload"]["blockId"] == repeated["payload"]["blockId"]  # the first publication's
            assert await settled(subscriber) == []


async def test_an_event_routed_to_several_channels_is_numbered_once_for_every_node(cluster: Cluster) -> None:
    with trio.fail_after(20):
        a, b = await cluster.node(), await cluster.node()
        sender, transactions = await cluster.connect(a), await cluster.connect(b)
        await sender.subscribe("address:0xa1")
        await transactions.subscribe("transactions", "address:0xc3")
        producer = await cluster.connect(b)
        event = {**tx_event("t1", "0xa1", "0xc3"), "id": f"tx-{uuid.uuid4().hex[:12]}"}
        result = await publish_ok(producer, event)
        assert result["offsets"] == {"transactions": 1, "address:0xa1": 1, "address:0xc3": 1}
        (on_a,) = await sender.events(1)
        assert (on_a["channel"], on_a["offset"], on_a["id"]) == ("address:0xa1", 1, event["id"])
        on_b = await transactions.events(2)
        assert sorted((frame["channel"], frame["offset"]) for frame in on_b) == [("address:0xc3", 1), ("transactions", 1)]


async def test_concurrent_publishers_on_both_nodes_make_one_gap_free_order(cluster: Cluster) -> None:
    with trio.fail_after(20):
        a, b = await cluster.node(), await cluster.node()
        on_a, on_b = await cluster.connect(a), await cluster.connect(b)
        await on_a.subscribe("blocks")
        await on_b.subscribe("blocks")
        per_producer = 25
        sent: dict[str, list[str]] = {"a": [], "b": []}
        offsets: dict[str, int] = {}

        async def produce(gateway: Gateway, name: str) -> None:
            producer = await cluster.connect(gateway)
            for _ in range(per_producer):
                event = block()
                sent[name].append(event["id"])
                offsets[event["id"]] = (await publish_ok(producer, event))["offsets"]["blocks"]

        async with trio.open_nursery() as producers:
            producers.start_soon(produce, a, "a")
            producers.start_soon(produce, b, "b")
        total = 2 * per_producer
        assert sorted(offsets.values()) == list(range(1, total + 1))
        got_a, got_b = await on_a.events(total), await on_b.events(total)
        assert [event_key(frame) for frame in got_a] == [event_key(frame) for frame in got_b]
        assert [frame["offset"] for frame in got_a] == list(range(1, total + 1))
        assert all(offsets[frame["id"]] == frame["offset"] for frame in got_a)
        for name in ("a", "b"):  # each producer's events keep its order
            assert [frame["id"] for frame in got_a if frame["id"] in set(sent[name])] == sent[name]


# -- moving between nodes ------------------------------------------------------------------------


@pytest.mark.parametrize("b_follows", [False, True], ids=["b-new-to-channel", "b-follows-channel"])
async def test_a_client_moves_to_another_node_and_recovers_without_a_gap(cluster: Cluster, b_follows: bool) -> None:
    """B either learns the channel from the recovering SUBSCRIBE, or already serves it."""
    with trio.fail_after(20):
        a, b = await cluster.node(), await cluster.node()
        producer_a, producer_b = await cluster.connect(a), await cluster.connect(b)
        if b_follows:
            await (await cluster.connect(b)).subscribe("blocks")
        client = await cluster.connect(a)
        epoch = (await client.subscribe("blocks"))["payload"]["channels"]["blocks"]["epoch"]
        ids = []
        for number in range(3):
            event = block()
            ids.append(event["id"])
            await publish_ok(producer_a if number % 2 else producer_b, event)
        received = await client.events(3)
        assert [event_key(frame) for frame in received] == [(n + 1, epoch, ids[n]) for n in range(3)]
        await client.ws.aclose()

        for number in range(4):  # missed while away, published on both nodes
            event = block()
            ids.append(event["id"])
            await publish_ok(producer_a if number % 2 else producer_b, event)

        moved = await cluster.connect(b)
        ack = await moved.subscribe("blocks", since={"blocks": {"offset": 3, "epoch": epoch}})
        assert ack["payload"]["channels"]["blocks"] == {"offset": 7, "epoch": epoch, "recovered": True, "replayed": 4}
        replay = await moved.events(4)
        assert [event_key(frame) for frame in replay] == [(n + 1, epoch, ids[n]) for n in range(3, 7)]
        live = block()
        await publish_ok(producer_a, live)
        (frame,) = await moved.events(1)
        assert event_key(frame) == (8, epoch, live["id"])
        assert await settled(moved) == []

        # Nothing missed since: recovering at the latest position replays nothing.
        await moved.ws.aclose()
        back = await cluster.connect(a)
        ack = await back.subscribe("blocks", since={"blocks": {"offset": 8, "epoch": epoch}})
        assert ack["payload"]["channels"]["blocks"] == {"offset": 8, "epoch": epoch, "recovered": True, "replayed": 0}


@attrs.define(eq=False)
class Forwarder:
    """A TCP forwarder: each new connection goes to `backend`.

    In front of the nodes it is a load balancer (the client library takes one URL, which
    reaches whichever node serves: that is how a client moves between nodes). Between a
    node and Redis it is the network, which a test can cut or hold up.
    """

    backend: int
    port: int = 0
    refusing: bool = False
    flowing: trio.Event = attrs.Factory(trio.Event)
    links: set[trio.CancelScope] = attrs.Factory(set)

    def __attrs_post_init__(self) -> None:
        self.flowing.set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def cut(self) -> None:
        """Drop every connection and refuse new ones (a partition)."""
        self.refusing = True
        for scope in self.links:
            scope.cancel()

    def heal(self) -> None:
        self.refusing = False

    def hold(self) -> None:
        """Keep what arrives from now on, in both directions, until `release`."""
        if self.flowing.is_set():
            self.flowing = trio.Event()

    def release(self) -> None:
        self.flowing.set()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self)
        await trio.serve_listeners(self._forward, listeners)

    async def _forward(self, downstream: trio.SocketStream) -> None:
        async with downstream:
            if self.refusing:
                return
            try:
                upstream = await trio.open_tcp_stream("127.0.0.1", self.backend)
            except OSError:
                return
            link = trio.CancelScope()
            self.links.add(link)
            try:
                with link:
                    async with upstream, trio.open_nursery() as pipes:
                        pipes.start_soon(self._pipe, downstream, upstream, link)
                        pipes.start_soon(self._pipe, upstream, downstream, link)
            finally:
                self.links.discard(link)

    async def _pipe(self, source: trio.SocketStream, sink: trio.SocketStream, done: trio.CancelScope) -> None:
        try:
            while data := await source.receive_some(65536):
                await self.flowing.wait()
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            done.cancel()


async def test_the_client_library_resumes_on_another_node_when_its_node_drains(cluster: Cluster, nursery: trio.Nursery) -> None:
    with trio.fail_after(20):
        a, b = await cluster.node(), await cluster.node()
        balancer = await nursery.start(Forwarder(a.port).run)
        producer = await cluster.connect(b)
        total = 40
        async with open_client(f"ws://127.0.0.1:{balancer.port}/ws", channels=["blocks"], **FAST) as subscriber:
            gaps: list[Gap] = []
            subscriber.on_gap(gaps.append)
            stream = subscriber.events()
            first_session = subscriber.state.session_id
            assert (len(a.connections), len(b.connections)) == (1, 1)  # the subscriber on A, the producer on B

            async def produce() -> None:
                for _ in range(total):
                    await publish_ok(producer, block())
                    await trio.sleep(0.005)

            received = []
            async with trio.open_nursery() as producing:
                producing.start_soon(produce)
                while len(received) < 10:
                    received.append(await stream.__anext__())
                balancer.backend = b.port  # new connections go to B from now on
                producing.start_soon(a.shutdown, 1012, "node restarting")
                while len(received) < total:
                    received.append(await stream.__anext__())
            assert [event.offset for event in received] == list(range(1, total + 1))
            assert len({event.epoch for event in received}) == 1
            assert gaps == []
            assert subscriber.state.session_id != first_session
            assert len(b.connections) == 2  # the producer, and the subscriber through the balancer


# -- Redis outages ----------------------------------------------------------------------------------


def distinct(frames: list[dict[str, Any]]) -> bool:
    """No (channel, offset, epoch) delivered twice."""
    keys = [(frame["channel"], frame["offset"], frame["epoch"]) for frame in frames if "channel" in frame]
    return len(keys) == len(set(keys))


async def test_a_redis_restart_keeps_nodes_up_refuses_publishes_and_shows_the_new_epoch(private_cluster: Cluster) -> None:
    """Redis without persistence restarts empty: every channel starts a new epoch."""
    redis = private_cluster.redis
    with trio.fail_after(30):
        a = await private_cluster.node(quick=True, broker_timeout=BROKER_TIMEOUT)
        b = await private_cluster.node(quick=True, broker_timeout=BROKER_TIMEOUT)
        on_a, on_b = await private_cluster.connect(a), await private_cluster.connect(b)
        producer_a, producer_b = await private_cluster.connect(a), await private_cluster.connect(b)
        epoch = (await on_a.subscribe("blocks"))["payload"]["channels"]["blocks"]["epoch"]
        await on_b.subscribe("blocks")
        for producer in (producer_a, producer_b, producer_a):
            await publish_ok(producer, block())
        before = {wire: await wire.events(3) for wire in (on_a, on_b)}
        assert all([frame["offset"] for frame in got] == [1, 2, 3] for got in before.values())

        redis.kill()
        for gateway in (a, b):
            assert await wait_readiness(gateway, 503, 5) == {"ready": False, "reason": "broker unavailable"}
        for wire in (on_a, on_b, producer_a, producer_b):
            await ping_answered(wire)
        refused = [block(), block()]
        for producer, event in zip((producer_a, producer_b), refused, strict=True):
            with trio.fail_after(4 * BROKER_TIMEOUT + 1):
                reply = await producer.publish(event)
            assert reply["type"] == "ERROR" and reply["payload"]["code"] == "UNAVAILABLE", reply

        redis.start()
        for gateway in (a, b):
            assert await wait_readiness(gateway, 200, 5) == {"ready": True}
        # The refused events, retried with the same ids: stored now, in the new epoch.
        retried = [await publish_ok(producer, event) for producer, event in zip((producer_b, producer_a), refused, strict=True)]
        assert retried == [{"id": event["id"], "offsets": {"blocks": n + 1}, "duplicate": False} for n, event in enumerate(refused)]

        for wire in (on_a, on_b):
            frames = await frames_until(wire, count_events(2))
            frames += await settled(wire)
            events = [frame for frame in frames if "channel" in frame]
            new_epochs = {frame["epoch"] for frame in events}
            assert len(new_epochs) == 1 and epoch not in new_epochs  # a client can tell it has a gap
            assert [(frame["offset"], frame["id"]) for frame in events] == [(1, refused[0]["id"]), (2, refused[1]["id"])]
            # Anything else is a HEARTBEAT of the new epoch's position, before its events.
            others = [frame for frame in frames if "channel" not in frame]
            assert all(frame["type"] == "HEARTBEAT" for frame in others), others
            assert all(frame["payload"]["epoch"] in new_epochs for frame in others), others
            assert distinct(before[wire] + frames)


async def test_a_hung_redis_makes_nodes_unready_and_the_stream_continues_in_its_epoch(private_cluster: Cluster) -> None:
    """A stopped Redis (SIGSTOP) keeps its data: after it resumes, the same epoch goes on."""
    redis = private_cluster.redis
    with trio.fail_after(40):
        a = await private_cluster.node(quick=True, broker_timeout=BROKER_TIMEOUT)
        b = await private_cluster.node(quick=True, broker_timeout=BROKER_TIMEOUT)
        on_a, on_b = await private_cluster.connect(a), await private_cluster.connect(b)
        producer_a, producer_b = await private_cluster.connect(a), await private_cluster.connect(b)
        epoch = (await on_a.subscribe("blocks"))["payload"]["channels"]["blocks"]["epoch"]
        await on_b.subscribe("blocks")
        ids = []
        for producer in (producer_a, producer_b):
            event = block()
            ids.append(event["id"])
            await publish_ok(producer, event)
        seen = {wire: await wire.events(2) for wire in (on_a, on_b)}

        redis.pause()
        try:
            # A publish during the pause is refused in bounded time; Redis may still run it
            # once it resumes (it is in its socket buffer), so its retry below is safe.
            stuck = block()
            with trio.fail_after(4 * BROKER_TIMEOUT + 1):
                reply = await producer_b.publish(stuck)
            assert reply["type"] == "ERROR" and reply["payload"]["code"] == "UNAVAILABLE", reply
            for gateway in (a, b):
                assert await wait_readiness(gateway, 503, 5) == {"ready": False, "reason": "broker unavailable"}
            for wire in (on_a, on_b):
                await ping_answered(wire)
        finally:
            redis.resume()
        for gateway in (a, b):
            assert await wait_readiness(gateway, 200, 5) == {"ready": True}

        retry = await publish_ok(producer_a, stuck)
        assert retry["offsets"] == {"blocks": 3}  # stored once, whether during the pause or now
        ids.append(stuck["id"])
        for producer in (producer_b, producer_a):
            event = block()
            ids.append(event["id"])
            assert (await publish_ok(producer, event))["duplicate"] is False
        for wire in (on_a, on_b):
            frames = await frames_until(wire, count_events(3))
            frames += await settled(wire)
            events = seen[wire] + [frame for frame in frames if "channel" in frame]
            assert [event_key(frame) for frame in events] == [(n + 1, epoch, ids[n]) for n in range(5)]
            others = [frame for frame in frames if "channel" not in frame]
            assert all(frame["type"] == "HEARTBEAT" and frame["payload"]["epoch"] == epoch for frame in others), others


async def test_subscribe_while_redis_is_down_is_refused_and_works_once_it_is_back(private_cluster: Cluster) -> None:
    redis = private_cluster.redis
    with trio.fail_after(30):
        a = await private_cluster.node(quick=True, broker_timeout=BROKER_TIMEOUT)
        client = await private_cluster.connect(a)
        await client.subscribe("blocks")  # held across the outage
        redis.kill()
        await wait_readiness(a, 503, 5)

        payload = {"channels": ["blocks", "dag"]}
        with trio.fail_after(4 * BROKER_TIMEOUT + 1):
            reply = await client.request("SUBSCRIBE", payload)
        assert reply["type"] == "ERROR" and reply["payload"]["code"] == "UNAVAILABLE", reply
        await ping_answered(client)  # the connection stays open

        redis.start()
        await wait_readiness(a, 200, 5)
        producer = await private_cluster.connect(a)
        first = block()
        await publish_ok(producer, first)  # the channel held before still delivers
        (frame,) = await client.events(1)
        assert (frame["channel"], frame["offset"], frame["id"]) == ("blocks", 1, first["id"])
        ack = await client.request("SUBSCRIBE", payload)
        assert ack["type"] == "ACK" and list(ack["payload"]["channels"]) == ["blocks", "dag"], ack
        update = {"type": "DAG_UPDATE", "id": f"dag-{uuid.uuid4().hex[:8]}",
                  "payload": {"updateType": "NODE_ADDED", "nodeId": "n1", "timestamp": "2025-08-07T10:00:00Z"}}
        await publish_ok(producer, update)
        (frame,) = await client.events(1)
        assert (frame["channel"], frame["offset"], frame["id"]) == ("dag", 1, update["id"])
        assert [frame for frame in await settled(client) if "channel" in frame] == []


async def test_a_node_cut_off_from_redis_catches_up_from_history_once_it_is_back(
    private_cluster: Cluster, nursery: trio.Nursery
) -> None:
    """A partition between one node and Redis: the other node goes on publishing in the same
    epoch, and the cut-off node delivers what it missed, in order, once it reaches Redis."""
    with trio.fail_after(30):
        network = await nursery.start(Forwarder(private_cluster.redis.port).run)
        a = await private_cluster.node(quick=True, broker_timeout=BROKER_TIMEOUT, broker=network.url)
        b = await private_cluster.node(quick=True, broker_timeout=BROKER_TIMEOUT)
        on_a, on_b = await private_cluster.connect(a), await private_cluster.connect(b)
        producer_a, producer_b = await private_cluster.connect(a), await private_cluster.connect(b)
        epoch = (await on_a.subscribe("blocks"))["payload"]["channels"]["blocks"]["epoch"]
        await on_b.subscribe("blocks")
        ids = []
        for producer in (producer_a, producer_b):
            event = block()
            ids.append(event["id"])
            await publish_ok(producer, event)
        frames = {wire: await frames_until(wire, count_events(2)) for wire in (on_a, on_b)}

        network.cut()
        assert await wait_readiness(a, 503, 5) == {"ready": False, "reason": "broker unavailable"}
        assert await readiness(b) == (200, {"ready": True})
        refused = block()
        with trio.fail_after(4 * BROKER_TIMEOUT + 1):
            reply = await producer_a.publish(refused)
        assert reply["type"] == "ERROR" and reply["payload"]["code"] == "UNAVAILABLE", reply
        for number in range(3):
            event = block()
            ids.append(event["id"])
            assert (await publish_ok(producer_b, event))["offsets"] == {"blocks": number + 3}
        await ping_answered(on_a)

        network.heal()
        assert await wait_readiness(a, 200, 5) == {"ready": True}
        assert (await publish_ok(producer_a, refused))["offsets"] == {"blocks": 6}  # it was never stored
        ids.append(refused["id"])
        for wire in (on_a, on_b):
            frames[wire] += await frames_until(wire, count_events(4))
            frames[wire] += await settled(wire)
            events = [frame for frame in frames[wire] if "channel" in frame]
            assert [event_key(frame) for frame in events] == [(n + 1, epoch, ids[n]) for n in range(6)]
            others = [frame["payload"] for frame in frames[wire] if "channel" not in frame]
            assert all(beat["epoch"] == epoch for beat in others), others


async def test_a_client_moving_to_a_node_that_lags_behind_is_not_told_it_has_a_gap(
    cluster: Cluster, nursery: trio.Nursery
) -> None:
    """The node a client moves to may not have received the latest events yet (its link to
    Redis is slower): the stream did reach the client's position, so nothing is lost."""
    with trio.fail_after(20):
        network = await nursery.start(Forwarder(cluster.redis.port).run)
        a, b = await cluster.node(broker=network.url), await cluster.node()
        watcher, client, producer = await cluster.connect(a), await cluster.connect(b), await cluster.connect(b)
        epoch = (await watcher.subscribe("blocks"))["payload"]["channels"]["blocks"]["epoch"]  # A follows blocks
        await client.subscribe("blocks")
        for _ in range(2):
            await publish_ok(producer, block())
        await watcher.events(2)

        network.hold()  # A's link to Redis is slow from now on
        await publish_ok(producer, block())
        assert [frame["offset"] for frame in await client.events(3)] == [1, 2, 3]
        await client.ws.aclose()

        async def release_soon() -> None:
            await trio.sleep(0.3)
            network.release()

        nursery.start_soon(release_soon)
        moved = await cluster.connect(a)
        ack = await moved.subscribe("blocks", since={"blocks": {"offset": 3, "epoch": epoch}})
        position = ack["payload"]["channels"]["blocks"]
        assert position["epoch"] == epoch and position["recovered"] is True, position
        assert position["offset"] >= 3 and position["replayed"] == position["offset"] - 3, position
        after = block()
        await publish_ok(producer, after)
        frames = await frames_until(moved, lambda got: any(frame.get("id") == after["id"] for frame in got))
        assert [frame["offset"] for frame in frames if "channel" in frame] == list(range(4, 5))


async def test_a_node_that_falls_far_behind_its_live_stream_catches_up_from_history(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Live events reaching a node long after they were published mean it fell behind:
    it stops working through the backlog and delivers from history, once each, in order."""
    from kaldrix.broker import _redis

    monkeypatch.setattr(_redis, "MAX_LIVE_LAG", 1.0)
    with trio.fail_after(20):
        a, b = await cluster.node(), await cluster.node()
        subscriber, producer = await cluster.connect(b), await cluster.connect(a)
        epoch = (await subscriber.subscribe("blocks"))["payload"]["channels"]["blocks"]["epoch"]
        published = [block() for _ in range(8)]
        for event in published[:3]:
            await publish_ok(producer, event)
        assert [frame["offset"] for frame in await subscriber.events(3)] == [1, 2, 3]

        # A live message published long ago (accepted_at 0: 1970), as a lagging node finds
        # them at the head of its queue. Its offset 4 is not what history holds: the node
        # must drop it and take offset 4 onwards from Redis, not from its queue.
        stale = orjson.dumps(["NEW_BLOCK", "not-in-history", "2025-08-07T10:00:00Z", 0.0])
        message = f"{epoch}\n4 {len(stale) + 3}\n".encode() + stale + b"\n{}"
        overruns = b.engine.counters.overruns
        assert cluster.redis.command("PUBLISH", f"{cluster.prefix}:{{blocks}}:live", message.decode()) == 1  # node B
        for event in published[3:]:
            await publish_ok(producer, event)
        got = await subscriber.events(5)
        assert [event_key(frame) for frame in got] == [(n + 1, epoch, published[n]["id"]) for n in range(3, 8)]
        assert await settled(subscriber) == []
        assert b.engine.counters.overruns == overruns + 1


async def test_a_channel_nobody_uses_is_unfollowed_and_can_be_followed_again_at_once(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node stops following a channel its clients left; following it again in the same
    instant (its unsubscribe and subscribe start in either order) leaves it subscribed."""
    import time

    import trio.testing

    from kaldrix.server import _feeds

    monkeypatch.setattr(_feeds, "IDLE_FEED_SECONDS", 0.0)
    live = f"{cluster.prefix}:{{blocks}}:live"
    with trio.fail_after(30):
        node = await cluster.node()
        client, producer = await cluster.connect(node), await cluster.connect(node)
        await client.subscribe("blocks")
        assert (await client.request("UNSUBSCRIBE", {"channels": ["blocks"]}))["type"] == "ACK"
        assert node.link is not None
        feeds = node.link.feeds
        node.router.sweep()
        assert "blocks" not in feeds.feeds
        while cluster.redis.command("PUBSUB", "NUMSUB", live) != [live, 0]:  # within fail_after
            await trio.sleep(0.01)

        for _ in range(10):
            feeds.follow("blocks").idle_since = 0.0
            await feeds.feeds["blocks"].established.wait()
            feeds.sweep(time.monotonic())  # dropped...
            feeds.follow("blocks")  # ...and wanted again, before anything ran
            await feeds.feeds["blocks"].established.wait()
            await trio.testing.wait_all_tasks_blocked()
            assert cluster.redis.command("PUBSUB", "NUMSUB", live) == [live, 1]

        await client.subscribe("blocks")
        event = block()
        await publish_ok(producer, event)
        (got,) = await client.events(1)
        assert got["id"] == event["id"]
